"""KL estimators between a policy and a reference, per token, as Triton code.

`clamped_log_ratio` and `kl_estimate` are `@triton.jit` helpers that the fused PPO kernel
(`kernels/ppo.py`) inlines too, so the KL math exists once. `kl_penalty_forward` is the stand-alone
launcher behind `fastrlhf.kl_penalty`.

With d = clamp(logps - ref_logps, -20, 20) (Schulman, "Approximating KL divergence"):
    k1 = d                 dk1/dd = 1
    k2 = d^2 / 2           dk2/dd = d
    k3 = exp(-d) + d - 1   dk3/dd = 1 - exp(-d)
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
def kl_estimate(d, ESTIMATOR: tl.constexpr):
    """Return (KL estimate, its derivative w.r.t. d) for an already clamped log-ratio d (fp32)."""
    if ESTIMATOR == 1:
        kl = d
        dkl = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == 2:
        kl = 0.5 * d * d
        dkl = d
    else:
        e = tl.exp(-d)
        kl = e + d - 1.0
        dkl = 1.0 - e
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
    d, dclamp = clamped_log_ratio(logps - ref, LIMIT)
    kl, dkl = kl_estimate(d, ESTIMATOR)
    tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=valid)
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, dkl * dclamp, mask=valid)


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
