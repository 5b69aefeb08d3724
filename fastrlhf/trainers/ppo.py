"""PPO for language models (Ziegler et al. 2019 / Ouyang et al. 2022, TRL-style) on one shared base.

Per iteration: rollout -> old log-probs (policy), reference log-probs (adapters off), values (value
role), score at the last response token (reward role or reward_fn) -> per-token rewards
(-beta * KL + score at the last token; or KL in the loss with kl_in_reward=False) -> GAE ->
advantages whitened over the response tokens of all ranks -> ppo_epochs x num_minibatches steps of
clipped policy loss + vf_coef * clipped value loss, one optimizer over the policy and value params
-> adaptive KL update.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fastrlhf
from fastrlhf._checks import check_number
from fastrlhf.distributed import whiten_global
from fastrlhf.options import option_help
from fastrlhf.trainers._policy_gradient import (
    PolicyGradientConfig,
    PolicyGradientTrainer,
    sequence_mean,
)
from fastrlhf.trainers.kl_control import make_kl_controller


@dataclass
class PPOConfig(PolicyGradientConfig):
    ppo_epochs: int = field(default=4, metadata=option_help("passes over each batch of experience"))
    kl_in_reward: bool = field(default=True, metadata=option_help(
        "subtract kl_coef * KL per token from the rewards (classic RLHF); false: put kl_coef * KL in the loss"))
    adaptive_kl: bool = field(default=False, metadata=option_help("adapt kl_coef towards kl_target (Ziegler et al.)"))
    kl_target: float = field(default=6.0, metadata=option_help("target per-sequence KL (nats) of the adaptive controller"))
    kl_horizon: float = field(default=10000.0, metadata=option_help("adaptive KL horizon, in samples"))
    vf_coef: float = field(default=0.1, metadata=option_help("weight of the value loss"))
    value_clip_eps: float = field(default=0.2, metadata=option_help("value clip range around the rollout values"))
    gamma: float = field(default=1.0, metadata=option_help("discount factor of GAE"))
    lam: float = field(default=0.95, metadata=option_help("lambda of GAE"))
    whiten_rewards: bool = field(default=False, metadata=option_help("whiten the per-token rewards before GAE"))

    def validate(self) -> None:
        super().validate()
        check_number("kl_target", self.kl_target, low=0, low_open=True)
        check_number("kl_horizon", self.kl_horizon, low=0, low_open=True)
        check_number("vf_coef", self.vf_coef, low=0)
        check_number("value_clip_eps", self.value_clip_eps, low=0, low_open=True)
        check_number("gamma", self.gamma, low=0, high=1)
        check_number("lam", self.lam, low=0, high=1)


class PPOTrainer(PolicyGradientTrainer):
    """PPO on prompt records; trains the "policy" and "value" roles (reward: the "reward" role or reward_fn).

    Logged per iteration: objective/scores, objective/kl, objective/non_score_reward,
    objective/rlhf_reward, kl_coef, completions/mean_length, completions/clipped_ratio, loss, pg_loss,
    clipfrac, approx_kl, ratio_mean, entropy, vf_loss, vf_clipfrac, vpred, grad_norm, lr.
    """

    config_class = PPOConfig
    trained_roles = ("policy", "value")
    progress_keys = ("objective/scores", "objective/kl", "vf_loss")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.kl_ctl = make_kl_controller(cfg.kl_coef, adaptive=cfg.adaptive_kl, target=cfg.kl_target, horizon=cfg.kl_horizon)
        self.kl_in_loss = not cfg.kl_in_reward

    @torch.no_grad()
    def make_experience(self, prompts):
        cfg = self.config
        batch = self.rollout(prompts)
        mask = batch["response_mask"]
        with self.autocast():  # one trunk forward for both without LoRA (value head on the policy trunk)
            old_logps, values = self.model.token_logprobs_and_values(
                batch["input_ids"], batch["attention_mask"], temperature=cfg.temperature)
        old_logps = old_logps.float() * mask
        values = values[:, :-1].float() * mask  # V(s_t) aligned with the token t+1 that logps[:, t] scores
        ref_logps = self.logps("reference", batch).float() * mask
        scores = self.score(batch)

        beta = self.kl_ctl.value
        kl = fastrlhf.kl_penalty(old_logps, ref_logps, estimator=cfg.kl_estimator) * mask
        non_score = -beta * kl if cfg.kl_in_reward else torch.zeros_like(kl)
        has_response = (batch["response_length"] > 0).float()
        rewards = non_score.scatter_add(1, batch["last_index"][:, None], (scores * has_response)[:, None])
        if cfg.whiten_rewards:
            rewards = whiten_global(rewards, mask, self.ctx, shift_mean=False) * mask
        advantages, returns = fastrlhf.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        advantages = whiten_global(advantages, mask, self.ctx) * mask

        experience = {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "mask": mask,
            "old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages,
            "values": values, "returns": returns,
        }
        if "rollout_logps" in batch:  # the engine's log-probs, for the IS correction
            experience["rollout_logps"] = batch["rollout_logps"]
        seq_kl = (kl * mask).sum(-1)
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": seq_kl.mean(),
            "objective/non_score_reward": sequence_mean(non_score, mask),
            "objective/rlhf_reward": scores.mean() + sequence_mean(non_score, mask),
            "kl_coef": torch.tensor(beta),
            **self.rollout_metrics(batch, scores),
        }
        return experience, metrics

    def policy_forward(self, micro):
        logps, entropy, values = self.model.token_logprobs_and_values(
            micro["input_ids"], micro["attention_mask"], temperature=self.config.temperature, return_entropy=True)
        return logps, entropy, {"values": values[:, :-1]}

    def policy_head(self, micro):
        head, values = self.model.head_inputs_and_values(micro["input_ids"], micro["attention_mask"])
        return head, {"values": values[:, :-1]}

    def extra_loss(self, micro, extras, loss, metrics):
        vf_loss, vf_metrics = self.value_loss(micro, extras["values"])
        return loss + self.config.vf_coef * vf_loss, {**metrics, **vf_metrics}

    def value_loss(self, micro, values):
        """(vf_loss, metrics): the clipped value loss of `values` [B, T-1], with the step's totals."""
        cfg = self.config
        return fastrlhf.value_loss(values, micro["values"], micro["returns"], micro["mask"],
                                   clip_eps=cfg.value_clip_eps, loss_agg=cfg.loss_agg, **(self.step_totals or {}))

    def policy_loss(self, micro):
        """With LoRA the value role runs a trunk pass of its own: it goes first, forward AND backward
        (its gradients are the value adapter's and head's alone), so its saved activations are freed
        before the policy's pass instead of adding to them (Qwen2.5-7B, B=8, T=2048, checkpointing:
        27.97 -> 24.69 GiB predicted). The gradients equal those of the joint loss. Without LoRA one
        trunk pass serves both and the joint loss is kept. Only with whole-step totals (in
        `optimize`), where the loss needs no re-weighting after the call."""
        if self.model.value_shares_policy_forward or self.step_totals is None:
            return super().policy_loss(micro)
        cfg = self.config
        values = self.model.values(micro["input_ids"], micro["attention_mask"])[:, :-1]
        vf_loss, vf_metrics = self.value_loss(micro, values)
        (cfg.vf_coef * vf_loss).backward()
        del values
        loss, metrics, _ = self.policy_term(micro, super().policy_head, super().policy_forward)
        return loss + cfg.vf_coef * vf_loss.detach(), {**metrics, **vf_metrics}

    def after_update(self, experience, metrics) -> None:
        if self.config.adaptive_kl:
            kl = self.metrics_log.to_floats({"kl": metrics["objective/kl"]})["kl"]  # mean over ranks
            self.kl_ctl.update(kl, n_steps=experience["input_ids"].shape[0] * self.ctx.world_size)

    def extra_state(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl_ctl.load_state_dict(state["kl_controller"])
