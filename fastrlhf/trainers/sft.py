"""Supervised fine-tuning: masked NLL of the completion tokens under the policy role.

Log-probs come from `RoleModel.token_logprobs("policy", ...)`, i.e. the fused kernel on the hidden
states: the [B, T, V] logits are never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

    def compute_loss(self, batch):
        logps = self.model.token_logprobs("policy", batch["input_ids"], batch["attention_mask"])
        mask = batch["loss_mask"][:, 1:]
        if self.config.loss_agg == "token-mean":
            loss = -fastrlhf.sequence_logps(logps, mask).sum() / mask.sum().clamp(min=1)
        else:
            loss = -fastrlhf.sequence_logps(logps, mask, average=True).mean()
        return loss, {}
