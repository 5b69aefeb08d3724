"""Advantage estimation in readable PyTorch: GAE, masked whitening, GRPO group advantages.

Ground truth for the Triton scan in `fastrlhf.kernels.gae` and the torch path of
`fastrlhf.losses.advantages` (same signatures there, plus `backend`). The public functions check
the arguments (`fastrlhf._checks`) before they call these; called directly, these trust their inputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastrlhf._dtypes import compute_dtype


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    skip_masked: bool = True,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch twin of `fastrlhf.gae`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).

    A log-depth parallel scan over t (no Python loop over T): `affine_suffix_scan`.
    """
    dtype = compute_dtype(rewards, values)
    m = mask.to(dtype)
    # Tokens outside the mask count as 0, so NaN/inf padding cannot leak through 0 * NaN products.
    r = torch.where(m != 0, rewards.to(dtype), 0.0)
    v = torch.where(m != 0, values.to(dtype), 0.0)
    if skip_masked:
        counted = (m != 0).to(dtype)
        # N_t = value of the first counted token at or after t (0 if none), then shifted to "after t".
        next_value = shift_left(affine_suffix_scan(counted * v, 1.0 - counted))
        delta = counted * (r + gamma * next_value - v)
        advantages = affine_suffix_scan(delta, counted * (gamma * lam) + (1.0 - counted)) * m
    else:
        next_value, next_mask = shift_left(v), shift_left(m)
        delta = r + gamma * next_value * next_mask - v
        advantages = affine_suffix_scan(delta, gamma * lam * next_mask) * m
    returns = (advantages + v) * m
    if whiten:
        advantages = whiten_with_reduce(advantages, mask)
    return advantages, returns


def shift_left(x: torch.Tensor) -> torch.Tensor:
    """x[:, t + 1] at position t, 0 at t = T - 1 (the value/mask of the next token, none past the end)."""
    shifted = torch.zeros_like(x)
    shifted[:, :-1] = x[:, 1:]
    return shifted


def affine_suffix_scan(d: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Solve A_t = d_t + c_t * A_{t+1} backwards over the last dim of `[B, T]`, with A_T = 0.

    Hillis-Steele doubling on affine maps: after the step with stride s, (d_t, c_t) is the map
    A_t = d_t + c_t * A_{t+2s}, i.e. the composition of the maps at t and t + s:
        d_t <- d_t + c_t * d_{t+s},    c_t <- c_t * c_{t+s}.
    A map that would reach at or past T reads A = 0 there, so it keeps d_t and gets c_t = 0.
    ceil(log2 T) vectorised steps instead of T sequential ones; d_t ends up as the sum
    d_t + c_t d_{t+1} + c_t c_{t+1} d_{t+2} + ... added pairwise (tree-shaped), so its rounding
    error grows like log T rather than T for the sequential loop.
    """
    T = d.shape[-1]
    stride = 1
    while stride < T:
        # both right-hand sides use the maps from before this step (out-of-place update)
        d_next = d.clone()
        d_next[:, :-stride] += c[:, :-stride] * d[:, stride:]
        c_next = torch.zeros_like(c)
        c_next[:, :-stride] = c[:, :-stride] * c[:, stride:]
        d, c = d_next, c_next
        stride *= 2
    return d


def masked_sum(x: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `x * mask` over all elements: the one masked reduction `whiten` uses (its cross-rank
    twin `fastrlhf.distributed.whiten_global` all-reduces these sums, see `masked_mean_var`)."""
    return (x * mask).sum()


SumReducer = Callable[[torch.Tensor], torch.Tensor]


def masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, reduce_sum: SumReducer | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and UNBIASED variance (TRL's `masked_var`) of `x` over positions where `mask` != 0.

    `x` must already be 0 outside the mask and `x`, `mask` in the compute dtype (`masked_input`).
    Two passes: (count, sum) -> mean, then the sum of (x - mean)^2, which unlike E[x^2] - mean^2
    does not cancel catastrophically for data with a large offset. `reduce_sum` (e.g. an all-reduce
    over ranks) is applied to every sum before it is used: once to the stacked [count, sum], once to
    the squared-deviation sum; None = this process only. Empty mask: mean 0, var 0; one element: var 0.
    """
    reduce_sum = reduce_sum or (lambda total: total)
    count, total = reduce_sum(torch.stack([masked_sum(1.0, mask), masked_sum(x, mask)])).unbind(0)
    mean = total / count.clamp(min=1)
    var = reduce_sum(masked_sum((x - mean) ** 2, mask)) / (count - 1).clamp(min=1)
    return mean, var


def masked_input(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, mask) in the compute dtype with x set to 0 outside the mask (so NaN/inf there cannot leak)."""
    dtype = compute_dtype(x)
    m = mask.to(dtype)
    return torch.where(m != 0, x.to(dtype), 0.0), m


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The PyTorch twin of `fastrlhf.whiten`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).

    Differs from TRL's `masked_whiten` only where TRL divides by zero (one counted element: var 0).
    """
    return whiten_with_reduce(x, mask, shift_mean=shift_mean, eps=eps)


def whiten_with_reduce(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce_sum: SumReducer | None = None,
) -> torch.Tensor:
    """`whiten` with the statistics' sums passed through `reduce_sum` (see `masked_mean_var`):
    the single implementation behind `whiten` (None) and `fastrlhf.distributed.whiten_global`."""
    x, m = masked_input(x, mask)
    mean, var = masked_mean_var(x, m, reduce_sum)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


@torch.no_grad()
def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    scale: bool = True,
    std: str = "sample",
    eps: float = 1e-6,
) -> torch.Tensor:
    """The PyTorch twin of `fastrlhf.group_advantages`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    grouped = scores.to(compute_dtype(scores)).reshape(-1, group_size)
    if grouped.numel() == 0:
        return grouped.reshape(-1)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:  # a one-sample group: advantage 0 already, and n - 1 = 0
        spread = grouped.std(dim=1, unbiased=std == "sample", keepdim=True)
        advantages = advantages / (spread + eps)
    return advantages.reshape(-1)
