"""Reward model: Bradley-Terry loss on the reward role's scores of chosen vs rejected completions.

`collate_preferences` stacks chosen rows then rejected rows, so both are scored in one forward.
An optional "margin" column (float per pair) is subtracted inside the sigmoid (Llama-2 style).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_number
from fastrlhf.options import option_help
from fastrlhf.trainers.base import Trainer
from fastrlhf.trainers.config import PreferenceConfig


@dataclass
class RewardConfig(PreferenceConfig):
    center_coef: float = field(default=0.0, metadata=option_help(
        "weight of mean((r_chosen + r_rejected)^2), keeps rewards centred at 0 (TRL center_rewards_coefficient)"))
    use_margin: bool = field(default=True, metadata=option_help("use the records' 'margin' column when present"))

    def validate(self) -> None:
        super().validate()
        check_number("center_coef", self.center_coef, low=0)


class RewardTrainer(Trainer):
    """Trains the "reward" role (adapter + score head) on {"prompt", "chosen", "rejected"} records.
    Logged: loss, accuracy, margin, rewards/chosen, rewards/rejected (eval/ prefixed on eval data)."""

    config_class = RewardConfig
    data_kind = "preference"
    trained_roles = ("reward",)
    progress_keys = ("loss", "accuracy")

    def prepare(self, records):
        return tokenize_preference_examples(self, records, extra_fields=("margin",) if self.config.use_margin else ())

    def collate(self, examples):
        from fastrlhf.data import collate_preferences

        batch = collate_preferences(examples, self.pad_token_id)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(e["margin"]) for e in examples], dtype=torch.float32)
        return self.to_device(batch)

    def compute_loss(self, batch):
        rewards = self.model.rewards(batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        return fastrlhf.reward_loss(chosen, rejected, margin=batch.get("margin"), center_coef=self.config.center_coef)


def tokenize_preference_examples(trainer: Trainer, records: list[dict], extra_fields=()) -> list[dict]:
    """`fastrlhf.data.tokenize_preferences` plus per-record fields (e.g. "margin") carried along.

    tokenize_preferences drops pairs that truncation emptied (and identical pairs with
    drop_identical_pairs) and does not keep extra columns, so
    when a field is wanted and pairs were dropped, records are re-tokenised one by one to realign.
    """
    from fastrlhf.data import tokenize_preferences

    lengths = {"max_length": trainer.config.max_length, "max_prompt_length": trainer.config.max_prompt_length,
               "drop_identical": trainer.config.drop_identical_pairs}
    examples = tokenize_preferences(records, trainer.tokenizer, **lengths)
    fields = [f for f in extra_fields if records and f in records[0]]
    if not fields:
        return examples
    missing = [i for i, r in enumerate(records) if any(f not in r for f in fields)]
    if missing:
        raise ValueError(f"records: column {fields[0]!r} is present in record 0 but missing in record {missing[0]}")
    if len(examples) != len(records):
        import warnings

        aligned = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # already warned once above
            for record in records:
                aligned.append(tokenize_preferences([record], trainer.tokenizer, **lengths))
        pairs = [(ex[0], rec) for ex, rec in zip(aligned, records) if ex]
    else:
        pairs = list(zip(examples, records))
    return [{**ex, **{f: rec[f] for f in fields}} for ex, rec in pairs]
