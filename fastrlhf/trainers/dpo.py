"""Direct preference optimisation (and IPO, hinge, robust, SimPO, ORPO) on the policy role.

Chosen and rejected rows go through the policy in ONE forward (`collate_preferences`), and the loss
comes straight from its hidden states (`fastrlhf.dpo_loss_from_hidden`, the LM head's gradients made
in its forward; `fused_head=False`: `token_logprobs` -> `sequence_logps` -> `dpo_loss`). Reference
log-probs come from the "reference" role (LoRA: the same base with adapters disabled) in the same
step under no_grad, or are precomputed once before training (`precompute_ref_logps`, automatic
without LoRA, where the reference is a separate frozen copy): then they are saved in checkpoints,
so a resumed run does not need the reference model again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_choice, check_number
from fastrlhf.contracts import (
    DPO_LOSS_TYPES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LENGTH_AVERAGED_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
)
from fastrlhf.options import option_help
from fastrlhf.trainers.base import Trainer
from fastrlhf.trainers.config import PreferenceConfig
from fastrlhf.trainers.precomputed_reference import PrecomputedReference


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float = field(default=0.1, metadata=option_help("inverse temperature of the implicit reward (ORPO: weight of the odds-ratio term)"))
    loss_type: str = field(default="sigmoid", metadata=option_help(f"preference loss: {', '.join(DPO_LOSS_TYPES)}"))
    label_smoothing: float = field(default=0.0, metadata=option_help(
        f"assumed fraction of flipped labels, in [0, 0.5) ({', '.join(LABEL_SMOOTHING_LOSS_TYPES)} only)"))
    simpo_gamma: float = field(default=0.0, metadata=option_help("SimPO target reward margin (simpo only; TRL's simpo_gamma)"))
    precompute_ref_logps: bool = field(default=False, metadata=option_help(
        "compute reference log-probs once before training instead of every step (always done without LoRA)"))

    def validate(self) -> None:
        super().validate()
        check_choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        check_number("beta", self.beta, low=0, low_open=True)
        check_number("label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        if self.label_smoothing and self.loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
            raise ValueError(f"label_smoothing must be 0 for loss_type={self.loss_type!r} "
                             f"(it applies to {LABEL_SMOOTHING_LOSS_TYPES})")
        check_number("simpo_gamma", self.simpo_gamma)
        if self.simpo_gamma and self.loss_type != "simpo":
            raise ValueError(f"simpo_gamma must be 0 unless loss_type='simpo', got {self.simpo_gamma}")


class DPOTrainer(PrecomputedReference, Trainer):
    """Trains the "policy" role on {"prompt", "chosen", "rejected"} records. Logged (TRL names):
    loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected."""

    config_class = DPOConfig
    data_kind = "preference"
    trained_roles = ("policy",)
    progress_keys = ("loss", "rewards/accuracies", "rewards/margins")

    @property
    def reference_free(self) -> bool:
        return self.config.loss_type in REFERENCE_FREE_LOSS_TYPES

    @property
    def precompute(self) -> bool:
        return not self.reference_free and (self.config.precompute_ref_logps or not getattr(self.model, "use_lora", True))

    def prepare(self, records):
        from fastrlhf.data import tokenize_preferences

        return tokenize_preferences(records, self.tokenizer, max_length=self.config.max_length,
                                    max_prompt_length=self.config.max_prompt_length,
                                    drop_identical=self.config.drop_identical_pairs)

    def collate(self, examples):
        from fastrlhf.data import collate_preferences

        batch = collate_preferences(examples, self.pad_token_id)
        if "ref_chosen_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor(
                [e["ref_chosen_logps"] for e in examples] + [e["ref_rejected_logps"] for e in examples],
                dtype=torch.float32,
            )
        return self.to_device(batch)

    def sequence_logps(self, role: str, batch) -> torch.Tensor:
        """[2B] (length-averaged for ipo/simpo/orpo) sequence log-probs of the completions under `role`."""
        logps = self.model.token_logprobs(role, batch["input_ids"], batch["attention_mask"])
        average = self.config.loss_type in LENGTH_AVERAGED_LOSS_TYPES
        return fastrlhf.sequence_logps(logps, batch["loss_mask"][:, 1:], average=average)

    def reference_logps(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ref_chosen [B], ref_rejected [B]): precomputed, or the reference role's without grad;
        (None, None) for the reference-free losses."""
        if self.reference_free:
            return None, None
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref = self.sequence_logps("reference", batch)
        return ref.chunk(2)

    def compute_loss(self, batch):
        cfg = self.config
        options = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                       gamma=cfg.simpo_gamma)
        if cfg.fused_head:
            # The reference pass first: its no-grad activations are gone before the policy's graph exists.
            ref_chosen, ref_rejected = self.reference_logps(batch)
            head = self.model.head_inputs(batch["input_ids"], batch["attention_mask"], loss_mask=batch["loss_mask"])
            return fastrlhf.dpo_loss_from_hidden(head.hidden, head.weight, head.targets, ref_chosen, ref_rejected,
                                                 **head.head_kwargs(), **options)
        chosen, rejected = self.sequence_logps("policy", batch).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        return fastrlhf.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **options)

    # ---- precomputed reference log-probs (PrecomputedReference)
    reference_keys = ("ref_chosen_logps", "ref_rejected_logps")
    reference_state_key = "ref_logps"

    def reference_values(self, batch, role: str) -> list[list[float]]:
        ref = self.sequence_logps(role, batch).float().cpu().tolist()
        half = len(ref) // 2
        return [[c, r] for c, r in zip(ref[:half], ref[half:])]
