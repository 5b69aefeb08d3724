"""KL estimators between a policy and a reference, per token, as Triton code.

`clamped_log_ratio` and `kl_estimate` are `@triton.jit` helpers that the fused PPO kernel
(`kernels/ppo.py`) inlines too, so the KL math exists once. `kl_penalty_forward` and
`kl_penalty_backward` are the stand-alone launchers behind `fastrlhf.kl_penalty`: one kernel each;
the backward recomputes d KL / d x from the inputs (reading 2 inputs costs what reading a saved
fp32 derivative and casting would, and nothing per token lives between the passes).

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
from fastrlhf.kernels._launch import cdiv, check_int32_indexable, elementwise_block

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
def _kl_penalty_forward_kernel(logps_ptr, ref_ptr, kl_ptr, n, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr,
                               BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logps = tl.load(logps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    kl, _dkl = kl_estimate(logps - ref, ESTIMATOR, LIMIT)
    tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _kl_penalty_backward_kernel(
    logps_ptr, ref_ptr, grad_kl_ptr, grad_logps_ptr, grad_ref_ptr, n,
    ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr, GRAD_IS_SCALAR: tl.constexpr, GRAD_LOGPS: tl.constexpr,
    GRAD_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logps = tl.load(logps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if GRAD_IS_SCALAR:  # d loss / d kl broadcast from one value (kl.sum(), kl.mean())
        g = tl.load(grad_kl_ptr).to(tl.float32)
    else:
        g = tl.load(grad_kl_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    _kl, dkl = kl_estimate(logps - ref, ESTIMATOR, LIMIT)
    grad = g * dkl
    if GRAD_LOGPS:
        tl.store(grad_logps_ptr + offs, grad.to(grad_logps_ptr.dtype.element_ty), mask=valid)
    if GRAD_REF:
        tl.store(grad_ref_ptr + offs, (-grad).to(grad_ref_ptr.dtype.element_ty), mask=valid)


def kl_penalty_forward(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """Per-token KL of same-shaped contiguous `logps` and `ref_logps` (any shape), in `out_dtype`.
    Per element: reads two inputs, writes the KL; ~5 FLOPs (k3: one exp)."""
    n = logps.numel()
    kl = torch.empty(logps.shape, dtype=out_dtype, device=logps.device)
    if n:
        check_int32_indexable("logps", n)
        block = elementwise_block(n, logps.device)
        _kl_penalty_forward_kernel[(cdiv(n, block),)](
            logps, ref_logps, kl, n, ESTIMATOR=ESTIMATOR_CODES[estimator], LIMIT=LOG_RATIO_LIMIT, BLOCK=block,
        )
    return kl


def kl_penalty_backward(logps: torch.Tensor, ref_logps: torch.Tensor, grad_kl: torch.Tensor, *, estimator: str,
                        need: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d loss / d logps, d loss / d ref_logps) in their dtypes (None unless `need`), recomputing
    d KL / d x from the inputs: no gradient was kept by the forward. `grad_kl` is the upstream
    gradient, shaped like the KL, contiguous or a broadcast scalar (all strides 0).
    Per element: reads 2 inputs and the upstream gradient (once if broadcast), writes 1-2 gradients."""
    n = logps.numel()
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else None
             for t, wanted in zip((logps, ref_logps), need)]
    if n and any(g is not None for g in grads):
        scalar = all(stride == 0 for stride in grad_kl.stride())
        if not scalar:
            grad_kl = grad_kl.contiguous()
        block = elementwise_block(n, logps.device)
        _kl_penalty_backward_kernel[(cdiv(n, block),)](
            logps, ref_logps, grad_kl, *(g if g is not None else grad_kl for g in grads), n,
            ESTIMATOR=ESTIMATOR_CODES[estimator], LIMIT=LOG_RATIO_LIMIT, GRAD_IS_SCALAR=scalar,
            GRAD_LOGPS=grads[0] is not None, GRAD_REF=grads[1] is not None, BLOCK=block,
        )
    return grads[0], grads[1]
