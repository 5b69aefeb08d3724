"""KL estimators between a policy and a reference, per token, as Triton code.

`clamped_log_ratio` and `kl_estimate` are `@triton.jit` helpers that the fused PPO kernel
(`kernels/ppo.py`) inlines too, so the KL math exists once. `kl_penalty_forward` is the stand-alone
launcher behind `fastrlhf.kl_penalty`.

With x = logps - ref_logps (Schulman, "Approximating KL divergence", 2020):
    k1 = x                 dk1/dx = 1
    k2 = x^2 / 2           dk2/dx = x
    k3 = exp(-d) + d - 1   dk3/dx = (1 - exp(-d)) * [|x| <= 20],   d = clamp(x, -20, 20)
k1 and k2 hold no exp and are never clamped (as TRL, verl and OpenRLHF before its ±10 value clamp):
clamping them zeroed the KL gradient exactly where the policy had drifted most. Only k3 clamps, so
that exp(-d) <= e^20 stays finite in fp32 (verl's low_var_kl clamps the same way; it and OpenRLHF
also clamp the k3 VALUE to ±10, which we do not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import check_int32_indexable, elementwise_block

from fastrlhf.contracts import KL_ESTIMATORS, LOG_RATIO_LIMIT

# Integer codes for the constexpr ESTIMATOR argument of the kernels: k1 -> 1, k2 -> 2, k3 -> 3.
ESTIMATOR_CODES = {name: code for code, name in enumerate(KL_ESTIMATORS, start=1)}


@triton.jit
def clamped_log_ratio(raw, LIMIT: tl.constexpr):
    """Return (clamp(raw, -LIMIT, LIMIT), d clamp / d raw) with torch.clamp's inclusive bounds.

    NaN stays NaN, as in torch.clamp: Triton's default min/max (PTX max.f32, numpy fmax in the
    interpreter) return the non-NaN operand, which turned a NaN log-prob into a finite ±20 and
    hid a diverged policy from the trainer's NaN guard.
    """
    inside = (raw >= -LIMIT) & (raw <= LIMIT)
    d = tl.minimum(tl.maximum(raw, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT,
                   propagate_nan=tl.PropagateNan.ALL)
    return d, tl.where(inside, 1.0, 0.0)


@triton.jit
def kl_estimate(x, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr):
    """Return (KL estimate, its derivative w.r.t. x) for the raw fp32 log-ratio x = logps - ref.
    Only k3 clamps x (to ±LIMIT, for its exp; zero derivative outside)."""
    if ESTIMATOR == 1:
        kl = x
        dkl = tl.full(x.shape, 1.0, tl.float32)
    elif ESTIMATOR == 2:
        kl = 0.5 * x * x
        dkl = x
    else:
        d, dclamp = clamped_log_ratio(x, LIMIT)
        e = tl.exp(-d)
        kl = e + d - 1.0
        dkl = (1.0 - e) * dclamp
    return kl, dkl


@triton.jit
def _kl_penalty_forward_kernel(
    logps_ptr, ref_ptr, kl_ptr, grad_ptr, n,
    ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logps = tl.load(logps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    kl, dkl = kl_estimate(logps - ref, ESTIMATOR, LIMIT)
    tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=valid)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, dkl, mask=valid)


def kl_penalty_forward(
    logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str, out_dtype: torch.dtype, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token KL of same-shaped `logps` and `ref_logps` (any shape).

    Returns `(kl, dkl)`: `kl` in `out_dtype` and, when `need_grad`, `dkl` = d KL / d logps in fp32
    (= -d KL / d ref_logps), so the backward pass is one multiply instead of a second kernel.
    """
    logps = logps.contiguous()
    ref_logps = ref_logps.contiguous()
    n = logps.numel()
    kl = torch.empty(logps.shape, dtype=out_dtype, device=logps.device)
    dkl = torch.empty(logps.shape, dtype=torch.float32, device=logps.device) if need_grad else None
    if n == 0:
        return kl, dkl
    check_int32_indexable("logps", n)
    block = elementwise_block(n, logps.device)
    grid = (triton.cdiv(n, block),)
    _kl_penalty_forward_kernel[grid](
        logps, ref_logps, kl, dkl if need_grad else kl, n,
        ESTIMATOR=ESTIMATOR_CODES[estimator], LIMIT=LOG_RATIO_LIMIT, WRITE_GRAD=need_grad, BLOCK=block,
    )
    return kl, dkl
