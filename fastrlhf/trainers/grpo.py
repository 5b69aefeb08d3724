"""GRPO (Shao et al. 2024, DeepSeekMath): group_size samples per prompt, advantages normalised within
each group, broadcast over the response tokens; no value model. The KL to the reference (k3 by
default, as verl and TRL) goes into the loss with weight kl_coef.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_choice, check_int
from fastrlhf.contracts import ADVANTAGE_ESTIMATOR_ALIASES
from fastrlhf.distributed import whiten_global
from fastrlhf.options import option_help
from fastrlhf.trainers._policy_gradient import (
    PolicyGradientConfig,
    PolicyGradientTrainer,
)


# TRL's GRPO loss_type values, which choose the aggregation of the (PPO-clipped) policy term:
# grpo = per-sequence mean then mean; bnpo / dapo = mean over all tokens; dr_grpo = token sum / max length
TRL_LOSS_AGGS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                 "dr_grpo": "seq-mean-token-sum-norm"}

# Every estimator but GAE (GRPO trains no value model), with its aliases.
OUTCOME_ESTIMATORS = tuple(name for name, canonical in ADVANTAGE_ESTIMATOR_ALIASES.items() if canonical != "gae")


@dataclass
class GRPOConfig(PolicyGradientConfig):
    group_size: int = field(default=4, metadata=option_help("completions sampled per prompt (>= 2)"))
    scale_rewards: bool = field(default=True, metadata=option_help("divide group-centred rewards by the group std"))
    kl_coef: float = field(default=0.04, metadata=option_help("weight of the k3 KL to the reference in the loss; 0 = no reference pass"))
    kl_estimator: str = field(default="k3", metadata=option_help("KL estimator in the loss: k1, k2, k3"))
    advantage_estimator: str = field(default="grpo", metadata=option_help(
        f"advantages from the group's scores: {', '.join(OUTCOME_ESTIMATORS)}"))

    def samples_per_prompt(self) -> int:
        return self.group_size

    def validate(self) -> None:
        # TRL's spellings of these two: loss_type names an aggregation there, scale_rewards a level
        if self.loss_type in TRL_LOSS_AGGS:
            self.loss_type, self.loss_agg = "ppo", TRL_LOSS_AGGS[self.loss_type]
        if isinstance(self.scale_rewards, str):
            if self.scale_rewards not in ("group", "none"):
                raise ValueError(f"scale_rewards must be true/false (TRL: 'group' / 'none'; 'batch' is not offered), "
                                 f"got {self.scale_rewards!r}")
            self.scale_rewards = self.scale_rewards == "group"
        super().validate()
        check_int("group_size", self.group_size, 2)
        check_choice("advantage_estimator", self.advantage_estimator, OUTCOME_ESTIMATORS)


class GRPOTrainer(PolicyGradientTrainer):
    """GRPO on prompt records; trains the "policy" role (reward: reward_fn or the "reward" role).

    Logged per iteration: reward, reward_std (mean within-group std), frac_reward_zero_std,
    completions/mean_length, completions/clipped_ratio, loss, pg_loss, kl, clipfrac, approx_kl,
    entropy, grad_norm, lr.
    """

    config_class = GRPOConfig
    trained_roles = ("policy",)

    @property
    def samples_per_prompt(self) -> int:
        return self.config.group_size
    progress_keys = ("reward", "kl")

    @torch.no_grad()
    def make_experience(self, prompts):
        cfg = self.config
        batch = self.rollout(prompts, repeat=cfg.group_size)
        mask = batch["response_mask"]
        scores = self.score(batch)
        estimator = cfg.advantage_estimator
        if ADVANTAGE_ESTIMATOR_ALIASES[estimator] == "grpo" and not cfg.scale_rewards:
            estimator = "dr_grpo"
        has_response = (batch["response_length"] > 0).float()
        rewards = torch.zeros_like(mask).scatter(1, batch["last_index"][:, None], (scores * has_response)[:, None])
        advantages, _ = fastrlhf.compute_advantages(
            estimator, rewards, mask, group_size=cfg.group_size,
            whiten_fn=lambda x, m: whiten_global(x, m, self.ctx) * m)
        experience = {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "mask": mask,
            "advantages": advantages.float() * mask,
        }
        if "rollout_logps" in batch:  # the engine's log-probs, for the IS correction
            experience["rollout_logps"] = batch["rollout_logps"]
        if cfg.ppo_epochs * cfg.num_minibatches > 1:  # off-policy after the first step: need the rollout logps
            experience["old_logps"] = self.logps("policy", batch).float() * mask
        if self.loss_kl_coef > 0:
            experience["ref_logps"] = self.logps("reference", batch).float() * mask
        group_std = scores.reshape(-1, cfg.group_size).std(dim=1)  # the sample std, as the advantages use
        metrics = {
            "reward": scores.mean(),
            "reward_std": group_std.mean(),
            "frac_reward_zero_std": (group_std < 1e-6).float().mean(),
            **self.rollout_metrics(batch, scores),
        }
        return experience, metrics
