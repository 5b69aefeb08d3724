"""Fused PPO objective and clipped value loss as Triton kernels (forward computes the gradient too).

Both losses are weighted sums of per-token terms, loss = sum_t w_t * l_t, with the aggregation
weight w_t = mask_t * row_scale[row(t)] (row_scale comes from `loss_agg`, computed by the caller
with torch ops). So d loss / d x_t = w_t * d l_t / d x_t is known in the forward pass: the kernel
writes it next to the loss and the backward pass is a single multiply by grad_output.
We save that fp32 gradient rather than recomputing in backward because it costs one [B, T] fp32
buffer (4 bytes/token, tiny next to the logits that produced the logps) and replaces a second read of
five to seven [B, T] inputs plus a second launch; the inputs need not be kept for backward.

Each program also reduces its block to a few partial sums (loss, metric numerators), which the
caller adds up with one torch `sum`: no atomics (deterministic), no host sync.

Tokens with mask 0 are zeroed right after loading, so NaN/inf padding cannot leak into the loss,
the metrics or the gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import check_int32_indexable, elementwise_block
from fastrlhf.kernels.kl import ESTIMATOR_CODES, clamped_log_ratio, kl_estimate

from fastrlhf.contracts import LOG_RATIO_LIMIT, PPO_STATS, VALUE_STATS

# Slots of the per-program partial sums, by name from the contract (PPO_STATS / VALUE_STATS).
# Globals read inside @triton.jit must be tl.constexpr objects.
_LOSS, _PG_LOSS, _CLIPPED, _APPROX_KL, _RATIO, _KL, _ENTROPY, _DUAL_CLIPPED = (
    tl.constexpr(PPO_STATS.index(name))
    for name in ("loss", "pg_loss", "clipped", "approx_kl", "ratio", "kl", "entropy", "dual_clipped")
)
_V_LOSS, _V_CLIPPED, _V_VALUES = (tl.constexpr(VALUE_STATS.index(name)) for name in ("loss", "clipped", "values"))


@triton.jit
def _load_counted(ptr, offs, valid, counted):
    """Load as fp32 and zero the tokens that do not count (so padding garbage is inert)."""
    x = tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.where(counted, x, 0.0)


@triton.jit
def ppo_token_terms(
    logps, old, adv, ref, ent, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, DUAL: tl.constexpr, ESTIMATOR: tl.constexpr,
    LIMIT: tl.constexpr,
):
    """Per-token PPO objective on fp32 values of any shape (a block of tokens, or one token):

        loss_t = pg + kl_coef * KL(logps, ref) - entropy_coef * ent

    Returns (loss_t, pg, dloss_dlogps, dkl_dlogps, is_clipped, dual_active, log_ratio, ratio, kl):
    d loss_t / d logps (policy and KL terms; the entropy term's derivative w.r.t. ent is the constant
    -entropy_coef), d KL / d logps (= -d KL / d ref), the metric ingredients. `ref` / `ent` are
    only read with HAS_REF / HAS_ENT; absent terms come back as 0 (dual_active as False).
    Inlined by `_ppo_loss_forward_kernel` and by the fused RL head (`kernels/fused_head.py`), so the
    objective exists once.
    """
    # Clipped surrogate: pg = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)).
    log_ratio, dclamp = clamped_log_ratio(logps - old, LIMIT)
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    # NaN-propagating min/max (see clamped_log_ratio): a NaN token must make the loss NaN.
    clipped = -adv * tl.minimum(tl.maximum(ratio, clip_low, propagate_nan=tl.PropagateNan.ALL), clip_high,
                                propagate_nan=tl.PropagateNan.ALL)
    pg = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)
    is_clipped = clipped > unclipped
    # Only the unclipped branch depends on logps; d(-A r)/d logps = -A r (times the clamp's 0/1).
    dpg = tl.where(is_clipped, 0.0, unclipped * dclamp)
    dual_active = tl.zeros_like(pg) > 0.0  # all False without DUAL
    if DUAL:
        # For A < 0 the loss is also capped at -A * c (dual clip, Ye et al. 2020); the cap is constant.
        bound = -adv * dual_clip
        dual_active = (adv < 0.0) & (pg > bound)
        pg = tl.where(dual_active, bound, pg)
        dpg = tl.where(dual_active, 0.0, dpg)

    loss_t = pg
    dloss = dpg
    kl = tl.zeros_like(pg)
    dkl = tl.zeros_like(pg)
    if HAS_REF:
        kl, dkl = kl_estimate(logps - ref, ESTIMATOR, LIMIT)
        loss_t += kl_coef * kl
        dloss += kl_coef * dkl
    if HAS_ENT:
        loss_t -= entropy_coef * ent
    return loss_t, pg, dloss, dkl, is_clipped, dual_active, log_ratio, ratio, kl


@triton.jit
def _ppo_loss_forward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, row_scale_ptr,
    grad_logps_ptr, grad_ref_ptr, grad_ent_ptr, partials_ptr,
    n, T, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, DUAL: tl.constexpr, ESTIMATOR: tl.constexpr,
    LIMIT: tl.constexpr, GRAD_LOGPS: tl.constexpr, GRAD_REF: tl.constexpr, GRAD_ENT: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    m = tl.load(mask_ptr + offs, mask=valid, other=0.0)
    counted = m != 0.0
    w = m * tl.load(row_scale_ptr + offs // T, mask=valid, other=0.0)

    logps = _load_counted(logps_ptr, offs, valid, counted)
    old = _load_counted(old_ptr, offs, valid, counted)
    adv = _load_counted(adv_ptr, offs, valid, counted)
    ref = logps
    if HAS_REF:
        ref = _load_counted(ref_ptr, offs, valid, counted)
    ent = tl.zeros_like(logps)
    if HAS_ENT:
        ent = _load_counted(ent_ptr, offs, valid, counted)
    loss_t, pg, dloss_t, dkl, is_clipped, dual_active, log_ratio, ratio, kl = ppo_token_terms(
        logps, old, adv, ref, ent, clip_low, clip_high, dual_clip, kl_coef, entropy_coef,
        HAS_REF=HAS_REF, HAS_ENT=HAS_ENT, DUAL=DUAL, ESTIMATOR=ESTIMATOR, LIMIT=LIMIT,
    )
    if GRAD_REF:
        tl.store(grad_ref_ptr + offs, -w * kl_coef * dkl, mask=valid)
    if GRAD_ENT:
        tl.store(grad_ent_ptr + offs, -w * entropy_coef, mask=valid)
    if GRAD_LOGPS:
        tl.store(grad_logps_ptr + offs, w * dloss_t, mask=valid)

    out = partials_ptr + pid * NUM_STATS
    tl.store(out + _LOSS, tl.sum(w * loss_t, axis=0))
    tl.store(out + _PG_LOSS, tl.sum(w * pg, axis=0))
    tl.store(out + _CLIPPED, tl.sum(tl.where(is_clipped, m, 0.0), axis=0))
    tl.store(out + _APPROX_KL, tl.sum(m * 0.5 * log_ratio * log_ratio, axis=0))
    tl.store(out + _RATIO, tl.sum(m * ratio, axis=0))
    tl.store(out + _KL, tl.sum(m * kl, axis=0))
    tl.store(out + _ENTROPY, tl.sum(m * ent, axis=0))
    tl.store(out + _DUAL_CLIPPED, tl.sum(tl.where(dual_active, m, 0.0), axis=0))


@triton.jit
def _value_loss_forward_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, row_scale_ptr, grad_ptr, partials_ptr,
    n, T, clip_eps,
    GRAD: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    m = tl.load(mask_ptr + offs, mask=valid, other=0.0)
    counted = m != 0.0
    w = m * tl.load(row_scale_ptr + offs // T, mask=valid, other=0.0)

    values = _load_counted(values_ptr, offs, valid, counted)
    old = _load_counted(old_ptr, offs, valid, counted)
    returns = _load_counted(returns_ptr, offs, valid, counted)

    # 0.5 * max((v - R)^2, (v_clipped - R)^2) with v_clipped = old + clip(v - old, -eps, eps).
    delta = values - old
    err = values - returns
    err_clipped = old + tl.minimum(tl.maximum(delta, -clip_eps, propagate_nan=tl.PropagateNan.ALL), clip_eps,
                                   propagate_nan=tl.PropagateNan.ALL) - returns
    sq = err * err
    sq_clipped = err_clipped * err_clipped
    is_clipped = sq_clipped > sq
    loss_t = 0.5 * tl.maximum(sq, sq_clipped, propagate_nan=tl.PropagateNan.ALL)  # NaN value -> NaN loss
    if GRAD:
        inside = (delta >= -clip_eps) & (delta <= clip_eps)
        dloss = tl.where(is_clipped, tl.where(inside, err_clipped, 0.0), err)
        tl.store(grad_ptr + offs, w * dloss, mask=valid)

    out = partials_ptr + pid * NUM_STATS
    tl.store(out + _V_LOSS, tl.sum(w * loss_t, axis=0))
    tl.store(out + _V_CLIPPED, tl.sum(tl.where(is_clipped, m, 0.0), axis=0))
    tl.store(out + _V_VALUES, tl.sum(m * values, axis=0))


def _grad_buffer(like: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return torch.empty(like.shape, dtype=torch.float32, device=like.device) if wanted else None


def _partials(n: int, num_stats: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Zeroed per-program partial sums, the number of programs and the block size for `n` tokens."""
    check_int32_indexable("the [B, T] inputs", n)
    block = elementwise_block(n, device)
    programs = triton.cdiv(n, block)
    return torch.zeros((max(programs, 1), num_stats), dtype=torch.float32, device=device), programs, block


def ppo_loss_forward(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None,
    entropy: torch.Tensor | None,
    row_scale: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    grad_logps: bool,
    grad_ref: bool,
    grad_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """PPO objective over [B, T] tensors (any float dtype; `mask` fp32, `row_scale` fp32 [B]),
    tensors in the order of `fastrlhf.ppo_loss`'s arguments; `kl_estimator` is "k1" | "k2" | "k3".

    Returns `(loss, stats, d_logps, d_ref, d_entropy)`: `stats` is fp32 `[len(PPO_STATS)]` (sums over
    all tokens, named by PPO_STATS), `loss` its "loss" entry (0-d view), and the d_* are fp32
    [B, T] d loss / d input (None when not asked for).
    """
    B, T = logps.shape
    n = B * T
    tensors = [t.contiguous() if t is not None else None
               for t in (logps, old_logps, advantages, mask, ref_logps, entropy)]
    logps, old_logps, advantages, mask, ref_logps, entropy = tensors
    d_logps = _grad_buffer(logps, grad_logps)
    d_ref = _grad_buffer(logps, grad_ref and ref_logps is not None)
    d_ent = _grad_buffer(logps, grad_entropy and entropy is not None)
    partials, programs, block = _partials(n, len(PPO_STATS), logps.device)
    if programs:
        dummy = logps  # stands in for absent optional pointers; never read or written
        _ppo_loss_forward_kernel[(programs,)](
            logps, old_logps, advantages, mask,
            ref_logps if ref_logps is not None else dummy,
            entropy if entropy is not None else dummy,
            row_scale.contiguous(),
            d_logps if d_logps is not None else partials,
            d_ref if d_ref is not None else partials,
            d_ent if d_ent is not None else partials,
            partials,
            n, T, float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef), float(entropy_coef),
            HAS_REF=ref_logps is not None, HAS_ENT=entropy is not None, DUAL=dual_clip is not None,
            ESTIMATOR=ESTIMATOR_CODES[kl_estimator], LIMIT=LOG_RATIO_LIMIT,
            GRAD_LOGPS=d_logps is not None, GRAD_REF=d_ref is not None, GRAD_ENT=d_ent is not None,
            NUM_STATS=len(PPO_STATS), BLOCK=block,
        )
    stats = partials.sum(0)
    return stats[PPO_STATS.index("loss")], stats, d_logps, d_ref, d_ent


def value_loss_forward(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    row_scale: torch.Tensor,
    *,
    clip_eps: float,
    grad_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clipped value loss over [B, T] tensors. Returns `(loss, stats, d_values | None)`: `stats` fp32
    `[len(VALUE_STATS)]` (sums over all tokens, named by VALUE_STATS), `loss` its "loss" entry."""
    B, T = values.shape
    n = B * T
    values, old_values, returns, mask = (t.contiguous() for t in (values, old_values, returns, mask))
    d_values = _grad_buffer(values, grad_values)
    partials, programs, block = _partials(n, len(VALUE_STATS), values.device)
    if programs:
        _value_loss_forward_kernel[(programs,)](
            values, old_values, returns, mask, row_scale.contiguous(),
            d_values if d_values is not None else partials, partials,
            n, T, float(clip_eps),
            GRAD=grad_values, NUM_STATS=len(VALUE_STATS), BLOCK=block,
        )
    stats = partials.sum(0)
    return stats[VALUE_STATS.index("loss")], stats, d_values
