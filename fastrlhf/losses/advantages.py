"""Advantages for PPO and GRPO: GAE (one parallel scan, Triton), masked whitening, group advantages.
(The named estimators built from them are in `fastrlhf.estimators`.)

Each runs Triton kernels on CUDA (or under TRITON_INTERPRET=1), else its PyTorch twin in
`fastrlhf.twins.advantages`: `gae` one scan launch (`kernels/gae.py`), `group_advantages` one
launch, `whiten` two launches each way (a batch-wide mean and variance must exist before any
output: `kernels/advantages.py`), with no torch op around them. float64 inputs take the twin on
every backend (the kernels compute in fp32; float64 is asked for to get float64 back).
`gae`'s outputs and `group_advantages` are detached targets; `whiten` is differentiable in x.
The cross-rank whitening (`fastrlhf.distributed.whiten_global`) stays on the twin's
`masked_sum`, where its all-reduce belongs.
"""
from __future__ import annotations

import torch

from fastrlhf._checks import check_gae_args, check_group_args, check_whiten_args
from fastrlhf._dispatch import resolve_backend
from fastrlhf.losses._autograd import first_order_only
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
        from fastrlhf.kernels.advantages import whiten_forward

        advantages, _ = whiten_forward(advantages, mask.detach(), shift_mean=True, eps=1e-8)
    return advantages, returns


class _WhitenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, shift_mean, eps):
        from fastrlhf.kernels.advantages import whiten_forward

        out, partials = whiten_forward(x, mask, shift_mean=shift_mean, eps=eps)
        ctx.save_for_backward(x, mask, partials)
        ctx.options = (shift_mean, eps)
        return out

    @staticmethod
    @first_order_only("whiten")
    def backward(ctx, grad_out):
        from fastrlhf.kernels.advantages import whiten_backward

        x, mask, partials = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        shift_mean, eps = ctx.options
        return whiten_backward(x, mask, partials, grad_out, shift_mean=shift_mean, eps=eps), None, None, None


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
    float32 (float64 for float64 x), differentiable in x (on the Triton path to first order, as
    every Triton loss: a second derivative needs backend="torch").
    """
    check_whiten_args(x, mask, eps)
    if resolve_backend(backend, x, mask) == "torch" or x.dtype == torch.float64:
        return twin.whiten(x, mask, shift_mean=shift_mean, eps=eps)
    return _WhitenFunction.apply(x.contiguous(), mask.contiguous(), bool(shift_mean), float(eps))


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    scale: bool = True,
    std: str = "sample",
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2) for scores `[B]` grouped
    in consecutive blocks of `group_size`: (s - group mean) / (group std + eps), or s - group mean
    with `scale=False` (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2).

    std: "sample" (default: divides by n - 1, as TRL, verl and OpenRLHF, i.e. torch.std) or
    "population" (by n; the default before, giving advantages sqrt(n / (n - 1)) times the peers').
    A group of ONE sample has advantage 0 under either (it is its own mean; its spread is taken as
    0, not n - 1 = 0's NaN). verl keeps the raw score there instead (mean 0, std 1); TRL needs n >= 2.
    Returns `[B]` float32 (float64 for float64 scores), detached. `group_size` must divide B
    (ValueError otherwise).
    """
    check_group_args(scores, group_size, eps, std)
    if resolve_backend(backend, scores) == "torch" or scores.dtype == torch.float64:
        return twin.group_advantages(scores, group_size, scale=scale, std=std, eps=eps)
    from fastrlhf.kernels.advantages import group_advantages_forward

    return group_advantages_forward(scores.detach().contiguous(), group_size, scale=bool(scale), std=std,
                                    eps=float(eps))
