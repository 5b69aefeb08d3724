"""Advantages for PPO and GRPO: GAE (one parallel scan, Triton), masked whitening, group advantages,
and the registry of named advantage estimators behind `compute_advantages`.

`gae` runs the Triton scan in `fastrlhf.kernels.gae` on CUDA (or under TRITON_INTERPRET=1), else
its PyTorch twin in `fastrlhf.twins.advantages`. All outputs are detached targets.

`whiten` and `group_advantages` run the same few torch ops on every backend: each is a tiny global
reduction done once per RL step (a handful of launches on `[B, T]` or `[B]`), so a kernel would
save microseconds, while a single-program Triton reduction over a whole `[B, T]` batch would be
slower than torch's multi-block one. `whiten`'s reductions all go through
`fastrlhf.twins.advantages.masked_sum`, where a cross-rank all-reduce belongs.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastrlhf._checks import check_advantage_args, check_gae_args, check_group_args, check_whiten_args
from fastrlhf._dispatch import resolve_backend
from fastrlhf.contracts import ADVANTAGE_ESTIMATOR_ALIASES
from fastrlhf.twins import advantages as twin


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    skip_masked: bool = True,
    whiten: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control
    Using Generalized Advantage Estimation", eq. 16) over `[B, T]` in one kernel launch.

    rewards, values: `[B, T]` float (any float dtype, fp32 accumulation);
    mask: `[B, T]` bool/int/float, nonzero = a token the policy generated.
    skip_masked=True (default, verl's `compute_gae_advantage_return`): masked tokens INSIDE a row
    (tool observations between the turns of a multi-turn response) are skipped: for a counted
    token t, with n(t) the next counted token (none past the end: V = A = 0 there),
        delta_t = r_t + gamma * V_{n(t)} - V_t,    A_t = delta_t + gamma * lam * A_{n(t)},
    i.e. value and advantage carry across the hole, and rewards at masked tokens are ignored.
    skip_masked=False: every masked token ends the episode before it (packed episodes):
        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,   A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}.
    Without holes (a prompt before, padding after the response) both give the same result, also the
    same as TRL's and OpenRLHF's loops. (OpenRLHF treats a hole as zero-value, zero-reward steps that
    are discounted; neither option reproduces that.)
    whiten=True: the advantages are whitened over the mask (`whiten`, TRL's/verl's `masked_whiten`,
    unbiased variance), returns stay (A + V) of the raw advantages: exactly verl's GAE output.
    Returns `(advantages, returns)`: `[B, T]` float32 (float64 only for float64 inputs on the torch
    backend), 0 where mask is 0. Outputs are detached targets: no gradient flows to rewards or values.
    """
    check_gae_args(rewards, values, mask, gamma, lam, skip_masked, whiten)
    if resolve_backend(backend, rewards, values, mask) == "torch":
        return twin.gae(rewards, values, mask, gamma=gamma, lam=lam, skip_masked=skip_masked, whiten=whiten)
    from fastrlhf.kernels.gae import gae_forward

    advantages, returns = gae_forward(rewards.detach(), values.detach(), mask.detach(), gamma=gamma, lam=lam,
                                      skip_masked=skip_masked)
    if whiten:
        advantages = twin.whiten(advantages, mask)
    return advantages, returns


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    backend: str = "auto",
) -> torch.Tensor:
    """Masked whitening of `x` (any shape, e.g. `[B, T]`; mask of the same shape), as TRL's
    `masked_whiten`: (x - mean) * rsqrt(var + eps) with the UNBIASED masked variance
    (n / (n - 1), like TRL's `masked_var`), + mean again if `shift_mean=False`.
    0 outside the mask; an empty mask gives zeros, one counted element gives var = 0 (no NaN).
    float32 (float64 for float64 x), differentiable in x. Same torch ops on every backend.
    """
    check_whiten_args(x, mask, eps)
    resolve_backend(backend, x, mask)  # validates the name; both backends share the torch ops
    return twin.whiten(x, mask, shift_mean=shift_mean, eps=eps)


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    scale: bool = True,
    std: str = "sample",
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath, eq. 4 / sec. 4.1.2) for scores `[B]` grouped
    in consecutive blocks of `group_size`: (s - group mean) / (group std + eps), or s - group mean
    with `scale=False` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2).

    std: "sample" (default: divides by n - 1, as TRL, verl and OpenRLHF, i.e. torch.std) or
    "population" (by n; the default before, giving advantages sqrt(n / (n - 1)) times the peers').
    A group of ONE sample has advantage 0 under either (it is its own mean; its spread is taken as
    0, not n - 1 = 0's NaN). verl keeps the raw score there instead (mean 0, std 1); TRL needs n >= 2.
    Returns `[B]` float32 (float64 for float64 scores), detached. `group_size` must divide B
    (ValueError otherwise). Same torch ops on every backend.
    """
    check_group_args(scores, group_size, eps, std)
    resolve_backend(backend, scores)
    return twin.group_advantages(scores, group_size, scale=scale, std=std, eps=eps)


# --------------------------------------------------------------------------- the estimator registry
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
    """RLOO (Ahmadian et al. 2024, eq. 8): s_i minus the mean of the OTHER samples of its group,
    = G / (G - 1) (s_i - group mean) (verl's compute_rloo_outcome_advantage, OpenRLHF rloo). A
    one-sample group gives 0 (verl keeps the raw score there)."""
    scores = _scores(rewards, mask)
    centred = group_advantages(scores, group_size, scale=False, eps=eps, backend=backend)
    factor = group_size / (group_size - 1) if group_size > 1 else 0.0
    advantages = _broadcast(centred * factor, mask)
    return advantages, advantages


@register_advantage_estimator("reinforce_plus_plus")
def reinforce_plus_plus_estimator(rewards, mask, *, values, group_size, gamma, lam, eps, whiten_fn, backend):
    """REINFORCE++ (Hu 2025, eq. 6-7): discounted return-to-go G_t = r_t + gamma m_{t+1} G_{t+1} (a
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
