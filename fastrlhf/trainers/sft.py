"""Supervised fine-tuning: masked NLL of the completion tokens under the policy role.

The loss comes straight from the policy's hidden states (`RoleModel.head_inputs` ->
`fastrlhf.sft_loss_from_hidden`, the LM head's gradients made in its forward); with
`fused_head=False` from `RoleModel.token_logprobs("policy", ...)` and the masked NLL. Either way the
[B, T, V] logits are never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_choice
from fastrlhf.contracts import SFT_LOSS_AGGS
from fastrlhf.options import option_help
from fastrlhf.trainers.base import Trainer
from fastrlhf.trainers.config import SupervisedConfig


@dataclass
class SFTConfig(SupervisedConfig):
    loss_agg: str = field(default="token-mean", metadata=option_help(
        "token-mean: mean NLL over all completion tokens of the optimizer step; "
        "seq-mean-token-mean: mean over sequences of each sequence's mean token NLL"))
    packing: bool = field(default=False, metadata=option_help(
        "concatenate the tokenised examples and cut them into rows of max_length (no padding; attention "
        "crosses example boundaries, TRL's packing_strategy='wrapped')"))

    def validate(self) -> None:
        super().validate()
        check_choice("loss_agg", self.loss_agg, SFT_LOSS_AGGS)


class SFTTrainer(Trainer):
    """SFT on {"prompt", "completion"}, {"messages"} or {"text"} records; trains the "policy" role."""

    config_class = SFTConfig
    data_kind = "sft"
    trained_roles = ("policy",)

    def prepare(self, records):
        from fastrlhf.data import pack_examples, tokenize_sft

        if not self.config.packing:
            return tokenize_sft(records, self.tokenizer, max_length=self.config.max_length)
        # packed: each example whole (up to the length of a row), then cut into rows
        return pack_examples(tokenize_sft(records, self.tokenizer, max_length=self.config.max_length),
                             self.config.max_length)

    def collate(self, examples):
        from fastrlhf.data import collate_sft

        return self.to_device(collate_sft(examples, self.pad_token_id))

    def batch_weight(self, batch):
        if self.config.loss_agg == "token-mean":
            return batch["loss_mask"][:, 1:].sum().float()
        return super().batch_weight(batch)

    def whole_step_totals(self, micro_batches):
        """token-mean: the step's completion tokens; seq-mean-token-mean: its sequences (every
        row counts, an empty one as 0), over all micro-batches and ranks, per rank."""
        local = sum(self.batch_weight(mb) for mb in micro_batches)
        total = self.ctx.all_reduce_sum(torch.as_tensor(local, dtype=torch.float32, device=self.device).clone())
        total = total.clamp(min=1) / self.ctx.world_size
        return {"total_tokens": total} if self.config.loss_agg == "token-mean" else {"total_sequences": total}

    def compute_loss(self, batch):
        """Mean NLL of the completion tokens (or of each sequence's mean), over the whole optimizer
        step when `step_totals` are set (in training), else over this batch (evaluation)."""
        totals = self.step_totals or {}
        if self.config.fused_head:  # the loss is the final node: gradients made in the head's forward
            head = self.model.head_inputs(batch["input_ids"], batch["attention_mask"], loss_mask=batch["loss_mask"])
            return fastrlhf.sft_loss_from_hidden(head.hidden, head.weight, head.targets, loss_agg=self.config.loss_agg,
                                                 **totals, **head.head_kwargs())
        logps = self.model.token_logprobs("policy", batch["input_ids"], batch["attention_mask"])
        mask = batch["loss_mask"][:, 1:]
        if self.config.loss_agg == "token-mean":
            tokens = totals.get("total_tokens", mask.sum().clamp(min=1))
            loss = -fastrlhf.sequence_logps(logps, mask).sum() / tokens
        else:
            sequences = totals.get("total_sequences", max(mask.shape[0], 1))
            loss = -fastrlhf.sequence_logps(logps, mask, average=True).sum() / sequences
        return loss, {}
