"""KTO (Ethayarajh et al. 2024) on the policy role, from unpaired data: one completion per record
and a label, {"prompt", "completion", "label": true | false} (TRL's format).

The reference point. KTO compares each completion's implied reward beta (log pi - log pi_ref) with
z0 = max(0, KL(pi || pi_ref)), estimated, as TRL does, from mismatched pairs: every example also
carries its prompt with another example's completion (its KL row), the completions of a batch
rotated by one (`fastrlhf.data.add_kl_rows`). z0 is the mean log-ratio of the batch's KL rows
(over all ranks), clamped at 0 and detached (`fastrlhf.kto_kl`); the KL rows go through the policy
under no_grad.

Batches. The rotation is fixed when the data is prepared, within consecutive groups of
`batch_size` examples, and those groups ARE the training batches: each epoch visits them in a
seeded order (`_GroupStream`). So a batch's KL rows hold exactly its own completions (what TRL gets
by sampling its data sequentially, without shuffling), and each KL row's reference log-prob is a
property of its example: it can be precomputed once, saved with checkpoints, and a resumed run
finds the same batches from the number of groups consumed (a resume with another batch size is
refused: it would make other groups). Evaluation uses groups of `eval_batch_size` (in a
single process, its batches; under torchrun the ranks' strided shards mix them, so there the KL
rows pair a batch's prompts with completions from other batches: still mismatched pairs).

Reference log-probs come from the "reference" role (LoRA: the base with adapters off) in the same
step under no_grad, one forward for the matched and the KL rows, or are precomputed once before
training (`precompute_ref_logps`, automatic without LoRA, where there is then no reference copy at
all: the untrained policy is the reference, as in DPO).

loss_type="apo_zero_unpaired" (TRL's name) is KTO with z0 = 0: no KL rows at all.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_choice, check_number
from fastrlhf.contracts import KTO_LOSS_TYPES
from fastrlhf.options import option_help
from fastrlhf.trainers.base import Trainer
from fastrlhf.trainers.config import SupervisedConfig
from fastrlhf.trainers.data_stream import BatchStream, DataPositionError
from fastrlhf.trainers.precomputed_reference import PrecomputedReference


@dataclass
class KTOConfig(SupervisedConfig):
    beta: float = field(default=0.1, metadata=option_help(
        "inverse temperature of the implied reward beta (log pi - log pi_ref); higher = closer to the reference"))
    loss_type: str = field(default="kto", metadata=option_help(
        f"{', '.join(KTO_LOSS_TYPES)} (apo_zero_unpaired: KTO with reference point 0, no KL rows)"))
    desirable_weight: float = field(default=1.0, metadata=option_help(
        "weight of the desirable rows' loss (lambda_D; the paper advises "
        "desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3])"))
    undesirable_weight: float = field(default=1.0, metadata=option_help(
        "weight of the undesirable rows' loss (lambda_U)"))
    precompute_ref_logps: bool = field(default=False, metadata=option_help(
        "compute reference log-probs once before training instead of every step (always done without LoRA)"))

    def validate(self) -> None:
        super().validate()
        check_choice("loss_type", self.loss_type, KTO_LOSS_TYPES)
        check_number("beta", self.beta, low=0, low_open=True)
        check_number("desirable_weight", self.desirable_weight, low=0)
        check_number("undesirable_weight", self.undesirable_weight, low=0)
        if self.loss_type == "kto" and self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 for loss_type='kto': its reference point is estimated from "
                             f"the batch's mismatched prompt-completion pairs, got {self.batch_size}")


class _GroupStream(BatchStream):
    """The training batches as fixed groups of `batch_size` consecutive examples (the groups whose
    completions were rotated into KL rows), in the seeded order of a `BatchStream` over the groups:
    the same batches per epoch (and per rank under torchrun) as a `BatchStream` over the examples
    would give, ceil(N / (world_size x batch_size)) of them, but never mixing two groups."""

    def __init__(self, examples, batch_size: int, *, ctx, seed: int, epochs: int | None) -> None:
        groups = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        super().__init__(groups, 1, ctx=ctx, seed=seed, epochs=epochs)
        self.group_size = batch_size

    def take(self, n: int) -> list[list]:
        """Up to `n` groups; the position counts groups (the stream's examples)."""
        return [group for (group,) in super().take(n)]

    def state_dict(self, position: int | None = None) -> dict:
        return dict(super().state_dict(position), group_size=self.group_size)

    def load_state_dict(self, state: dict) -> None:
        """As BatchStream's, but the batch size cannot change: it fixed the groups and their KL rows."""
        saved = state.get("group_size", self.group_size)
        if saved != self.group_size:
            raise DataPositionError(
                f"KTO's batches are fixed groups of batch_size examples (their KL rows are rotated within them): "
                f"the checkpoint was written with batch_size={saved}, this run has {self.group_size}; resume with "
                f"batch_size={saved}")
        super().load_state_dict(state)


class KTOTrainer(PrecomputedReference, Trainer):
    """Trains the "policy" role on {"prompt", "completion", "label"} records. Logged (TRL names):
    loss, rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected, kl,
    count/chosen, count/rejected ("chosen" = desirable). Per step, metrics of several micro-batches
    are averaged with each micro-batch's row count as its weight (the loop's rule), not its class count."""

    config_class = KTOConfig
    data_kind = "unpaired"
    trained_roles = ("policy",)
    progress_keys = ("loss", "kl", "rewards/margins")

    def __init__(self, *args, **kwargs) -> None:
        from fastrlhf.data import add_kl_rows

        super().__init__(*args, **kwargs)
        if self.uses_kl:  # KL rows rotate completions within the groups that become the batches
            add_kl_rows(self.train_examples, self.tokenizer, group_size=self.config.batch_size,
                        max_length=self.config.max_length, source="train_records")
            if self.eval_examples:
                add_kl_rows(self.eval_examples, self.tokenizer, group_size=self.config.eval_batch_size,
                            max_length=self.config.max_length, source="eval_records")
        groups = _GroupStream(self.train_examples, self.config.batch_size, ctx=self.ctx, seed=self.config.seed,
                              epochs=None if self.config.max_steps > 0 else self.config.epochs)
        if groups.batches_per_epoch != self.data.batches_per_epoch:  # the step count and LR schedule rely on it
            raise RuntimeError(f"KTO batches per epoch {groups.batches_per_epoch} != {self.data.batches_per_epoch}")
        self.data = groups

    @property
    def uses_kl(self) -> bool:
        return self.config.loss_type == "kto"

    @property
    def precompute(self) -> bool:
        return self.config.precompute_ref_logps or not getattr(self.model, "use_lora", True)

    def check_config_against_data(self) -> None:
        """TRL's warning: with unequal class sizes the weights should satisfy the paper's eq. 8."""
        n_desirable = sum(1 for r in self.train_records if r["label"])
        n_undesirable = len(self.train_records) - n_desirable
        if n_desirable and n_undesirable and n_desirable != n_undesirable:
            undesirable_mass = self.config.undesirable_weight * n_undesirable
            ratio = self.config.desirable_weight * n_desirable / undesirable_mass if undesirable_mass else float("inf")
            if not 1.0 <= ratio <= 4 / 3:
                warnings.warn(
                    f"train_records: {n_desirable} desirable and {n_undesirable} undesirable examples give "
                    f"desirable_weight x n_desirable / (undesirable_weight x n_undesirable) = {ratio:.3g}; "
                    "KTO (Ethayarajh et al. 2024, eq. 8) advises a value in [1, 4/3], e.g. desirable_weight = "
                    f"{n_undesirable * self.config.undesirable_weight / n_desirable:.3g}", stacklevel=2)

    def prepare(self, records):
        from fastrlhf.data import tokenize_unpaired

        return tokenize_unpaired(records, self.tokenizer, max_length=self.config.max_length)

    def collate(self, examples):
        """input_ids / attention_mask / loss_mask [B (+ B KL rows), T]: the matched rows first, then
        (kto) the KL rows, padded together so that the reference scores all of them in one forward;
        label bool [B]; ref_logps / ref_kl_logps [B] when precomputed."""
        from fastrlhf.data import collate_sft

        rows = [{"input_ids": e["input_ids"], "loss_mask": e["loss_mask"]} for e in examples]
        if self.uses_kl:
            rows += [{"input_ids": e["kl_input_ids"], "loss_mask": e["kl_loss_mask"]} for e in examples]
        batch = collate_sft(rows, self.pad_token_id)
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        # the longest matched / KL row: each part's policy forward reads only its own columns (right padding)
        batch["widths"] = (max(len(e["input_ids"]) for e in examples),
                           max(len(e["kl_input_ids"]) for e in examples) if self.uses_kl else 0)
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([e["ref_logps"] for e in examples], dtype=torch.float32)
            if self.uses_kl:
                batch["ref_kl_logps"] = torch.tensor([e["ref_kl_logps"] for e in examples], dtype=torch.float32)
        return self.to_device(batch)

    def batch_weight(self, batch) -> torch.Tensor:
        return torch.tensor(float(batch["label"].shape[0]), device=self.device)

    def sequence_logps(self, role: str, batch, part: str | None = None) -> torch.Tensor:
        """Summed completion log-probs under `role` of the batch's "matched" rows, its "kl" rows, or
        (None) all of its rows."""
        ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        if part is not None:
            B = batch["label"].shape[0]
            rows = slice(0, B) if part == "matched" else slice(B, None)
            width = batch["widths"][0 if part == "matched" else 1]
            ids, mask, loss_mask = ids[rows, :width], mask[rows, :width], loss_mask[rows, :width]
        logps = self.model.token_logprobs(role, ids, mask)
        return fastrlhf.sequence_logps(logps, loss_mask[:, 1:])

    def reference_logps(self, batch, role: str = "reference") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ref_logps [B], ref_kl_logps [B] or None): precomputed, or one no_grad forward of every row."""
        if "ref_logps" in batch:
            return batch["ref_logps"], batch.get("ref_kl_logps")
        with torch.no_grad():
            ref = self.sequence_logps(role, batch)
        B = batch["label"].shape[0]
        return ref[:B], (ref[B:] if self.uses_kl else None)

    def compute_loss(self, batch):
        policy = self.sequence_logps("policy", batch, "matched")
        ref, ref_kl = self.reference_logps(batch)
        kl = None
        if self.uses_kl:
            with torch.no_grad():  # z0 is a constant: the KL rows need no graph
                policy_kl = self.sequence_logps("policy", batch, "kl")
            all_reduce = self.ctx.all_reduce_sum if self.ctx.distributed else None  # z0 over every rank's KL rows
            kl = fastrlhf.kto_kl(policy_kl, ref_kl, all_reduce=all_reduce)
        cfg = self.config
        return fastrlhf.kto_loss(policy, ref, batch["label"], kl=kl, beta=cfg.beta,
                                 desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                                 loss_type=cfg.loss_type)

    # ---- precomputed reference log-probs (PrecomputedReference)
    reference_keys = ("ref_logps", "ref_kl_logps")
    reference_state_key = "kto_ref_logps"

    def reference_values(self, batch, role: str) -> list[list[float | None]]:
        ref, ref_kl = self.reference_logps(batch, role)
        ref_kl = ref_kl.float().cpu().tolist() if ref_kl is not None else [None] * ref.shape[0]
        return [[r, k] for r, k in zip(ref.float().cpu().tolist(), ref_kl)]
