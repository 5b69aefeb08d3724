"""Named advantage estimators with one signature, and `compute_advantages`, which picks one by name.

Each estimator is a few of the advantage primitives of `fastrlhf.losses.advantages` (the GAE scan,
group statistics, whitening), so it runs the Triton scan where `gae` does and torch ops elsewhere;
it has no PyTorch twin of its own. The names are the contract's (`ADVANTAGE_ESTIMATORS`, verl's),
with other libraries' spellings as aliases.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastrlhf._checks import check_advantage_args
from fastrlhf.contracts import ADVANTAGE_ESTIMATOR_ALIASES
from fastrlhf.losses.advantages import gae, group_advantages, whiten
from fastrlhf.twins import advantages as twin

__all__ = ["compute_advantages", "advantage_estimator", "register_advantage_estimator", "ADVANTAGE_ESTIMATOR_FNS"]


# Every estimator has ONE signature:
#     fn(rewards [B, T], mask [B, T], *, values [B, T] | None, group_size: int, gamma: float,
#        lam: float, eps: float, whiten_fn: (x, mask) -> x, backend: str) -> (advantages, returns)
# rewards are per-token rewards (an outcome score sits at the last response token; a row's score is
# its masked sum, as verl's outcome estimators take it); groups are consecutive blocks of
# group_size rows (the samples of one prompt). whiten_fn whitens over the batch (the trainers pass
# a cross-rank one). Advantages and returns are [B, T], 0 outside the mask, detached.

AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGE_ESTIMATOR_FNS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: add `fn` to the registry under `name` (the contract's names are registered here)."""

    def decorate(fn: AdvantageEstimator) -> AdvantageEstimator:
        ADVANTAGE_ESTIMATOR_FNS[name] = fn
        return fn

    return decorate


def _scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A row's outcome score: the masked sum of its token rewards (NaN padding ignored)."""
    rewards, m = twin.masked_input(rewards, mask)
    return (rewards * m).sum(-1)


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(per_row.dtype)
    return per_row[:, None] * m


@register_advantage_estimator("gae")
def gae_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """GAE (Schulman et al. 2016, eq. 16) with tool-observation holes skipped, advantages whitened
    over the batch, returns = raw advantages + values: verl's compute_gae_advantage_return."""
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, skip_masked=True, backend=backend)
    return whiten_fn(advantages, mask), returns


@register_advantage_estimator("grpo")
def grpo_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """GRPO (Shao et al. 2024, sec. 4.1.2): (s - group mean) / (group sample std + eps), on every token
    of the row; returns = advantages (verl's compute_grpo_outcome_advantage, TRL, OpenRLHF group_norm)."""
    advantages = _broadcast(group_advantages(_scores(rewards, mask), group_size, eps=eps, backend=backend), mask)
    return advantages, advantages


@register_advantage_estimator("dr_grpo")
def dr_grpo_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2): s - group mean, no
    std division (verl's norm_adv_by_std_in_grpo=False, OpenRLHF dr_grpo, TRL scale_rewards="none").
    Its other half is the loss normalisation: loss_agg="seq-mean-token-sum-norm" with a constant
    norm_length (see `ppo_loss`)."""
    scores = _scores(rewards, mask)
    advantages = _broadcast(group_advantages(scores, group_size, scale=False, eps=eps, backend=backend), mask)
    return advantages, advantages


@register_advantage_estimator("rloo")
def rloo_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", sec. 3.2): s_i minus the mean of the OTHER samples of its group,
    = G / (G - 1) (s_i - group mean) (verl's compute_rloo_outcome_advantage, OpenRLHF rloo). A
    one-sample group gives 0 (verl keeps the raw score there)."""
    scores = _scores(rewards, mask)
    centred = group_advantages(scores, group_size, scale=False, eps=eps, backend=backend)
    factor = group_size / (group_size - 1) if group_size > 1 else 0.0
    advantages = _broadcast(centred * factor, mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """REINFORCE++ (Hu 2025, "REINFORCE++", sec. 3): discounted return-to-go G_t = r_t + gamma m_{t+1} G_{t+1} (a
    masked token ends the sum), whitened over the batch; returns = G (verl's
    compute_reinforce_plus_plus_outcome_advantage). Runs on the GAE scan (values 0, lambda 1)."""
    _, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, skip_masked=False,
                     backend=backend)
    return whiten_fn(returns, mask), returns


@register_advantage_estimator("reinforce_plus_plus_baseline")
def reinforce_plus_plus_baseline_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn,
                                           backend):
    """REINFORCE++ with a group baseline (Hu 2025, sec. 3.2): s - group mean on every token, whitened
    over the batch (verl's compute_reinforce_plus_plus_baseline_outcome_advantage, OpenRLHF
    reinforce_baseline up to its population variance)."""
    scores = _scores(rewards, mask)
    centred = _broadcast(group_advantages(scores, group_size, scale=False, eps=eps, backend=backend), mask)
    advantages = whiten_fn(centred, mask)
    return advantages, advantages


def advantage_estimator(name: str) -> AdvantageEstimator:
    """The registered estimator `name` (or an alias: group_norm, reinforce++, ...); ValueError listing
    the valid names otherwise."""
    canonical = ADVANTAGE_ESTIMATOR_ALIASES.get(name, name)
    if canonical not in ADVANTAGE_ESTIMATOR_FNS:
        valid = sorted(set(ADVANTAGE_ESTIMATOR_FNS) | set(ADVANTAGE_ESTIMATOR_ALIASES))
        raise ValueError(f"advantage estimator must be one of {tuple(valid)}, got {name!r}")
    return ADVANTAGE_ESTIMATOR_FNS[canonical]


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    eps: float = 1e-6,
    whiten_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns `[B, T]` by a named estimator (see ADVANTAGE_ESTIMATOR_FNS):
    "gae" (needs values), "grpo", "dr_grpo", "rloo", "reinforce_plus_plus",
    "reinforce_plus_plus_baseline" (verl's names; aliases "group_norm", "dr-grpo", "reinforce++",
    "reinforce++-baseline", "reinforce_baseline"). An unknown name raises a ValueError listing them.

    rewards: `[B, T]` per-token rewards (put an outcome score at the last response token: a row's
    score is its masked sum); mask: `[B, T]` response tokens; values: `[B, T]` (gae only);
    group_size: samples per prompt, consecutive rows (must divide B); gamma, lam: discount and GAE
    lambda (rloo / grpo ignore them, as verl); eps: the group std's epsilon; whiten_fn(x, mask): the
    batch whitening of gae / reinforce++ (default `whiten`; the trainers pass a cross-rank one).
    Returns `(advantages, returns)`, 0 outside the mask, detached float32 (float64 inputs may stay
    float64 on the torch backend).
    """
    fn = advantage_estimator(estimator)
    check_advantage_args(rewards, mask, values, group_size, needs_values=fn is gae_estimator)
    whiten_fn = whiten_fn or (lambda x, m: whiten(x, m, backend=backend))
    with torch.no_grad():
        return fn(rewards, mask, values=values, group_size=group_size, gamma=gamma, lam=lam, eps=eps,
                  whiten_fn=whiten_fn, backend=backend)
