"""Fused PPO-family objectives and the clipped value loss as Triton kernels (forward computes the gradient too).

Both losses are weighted sums of per-token terms, loss = sum_t w_t * l_t, with the aggregation
weight w_t = mask_t * row_scale[row(t)] (row_scale comes from `loss_agg`, computed by the caller
with torch ops; the policy, KL and entropy terms may each have their own). So
d loss / d x_t = w_t * d l_t / d x_t is known in the forward pass: the kernel writes it next to the
loss and the backward pass is a single multiply by grad_output.
We save that fp32 gradient rather than recomputing in backward because it costs one [B, T] fp32
buffer (4 bytes/token, tiny next to the logits that produced the logps) and replaces a second read of
five to seven [B, T] inputs plus a second launch; the inputs need not be kept for backward.

Every objective option is a constexpr branch of the one kernel (plain PPO compiles to the code it
always had): LOSS_TYPE (ppo / cispo / sapo), SEQ_RATIO (GSPO: the ratio of the sequence's mean
log-ratio, one [B] fp32 load per token), IS_MODE (rollout IS correction: truncate / mask, from
per-token rollout log-probs or a per-row [B] log-weight), SELECT_ENT (train only on the tokens at
or above an entropy threshold, a 0-d fp32 load), ADV_PER_ROW ([B] advantages), SPLIT_AGG (own
aggregation weights for the KL and entropy terms).

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

from fastrlhf.contracts import IS_CORRECTIONS, LOG_RATIO_LIMIT, POLICY_LOSS_TYPES, PPO_STATS, VALUE_STATS

# Slots of the per-program partial sums, by name from the contract (PPO_STATS / VALUE_STATS).
# Globals read inside @triton.jit must be tl.constexpr objects.
(_LOSS, _PG_LOSS, _CLIPPED, _APPROX_KL, _RATIO, _KL, _ENTROPY, _DUAL_CLIPPED, _IS_WEIGHT, _IS_CLIPPED,
 _ENTROPY_KEPT) = (
    tl.constexpr(PPO_STATS.index(name))
    for name in ("loss", "pg_loss", "clipped", "approx_kl", "ratio", "kl", "entropy", "dual_clipped",
                 "is_weight", "is_clipped", "entropy_kept")
)
_V_LOSS, _V_CLIPPED, _V_VALUES = (tl.constexpr(VALUE_STATS.index(name)) for name in ("loss", "clipped", "values"))
# LOSS_TYPE codes (positions in POLICY_LOSS_TYPES) and IS_MODE codes (0 = no correction).
_PPO, _CISPO, _SAPO = (tl.constexpr(POLICY_LOSS_TYPES.index(name)) for name in ("ppo", "cispo", "sapo"))
_IS_TRUNCATE, _IS_MASK = tl.constexpr(1), tl.constexpr(2)


def is_mode_code(is_correction: str | None) -> int:
    """IS_MODE of a canonical `is_correction` name: 0 none, 1 truncate (TIS), 2 mask (MIS)."""
    if is_correction is None:
        return 0
    assert is_correction in IS_CORRECTIONS
    return 1 if is_correction.endswith("truncate") else 2


@triton.jit
def _load_counted(ptr, offs, valid, counted):
    """Load as fp32 and zero the tokens that do not count (so padding garbage is inert)."""
    x = tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.where(counted, x, 0.0)


@triton.jit
def _clamp(x, low, high):
    """torch.clamp with NaN propagation (Triton's default min/max return the non-NaN operand)."""
    return tl.minimum(tl.maximum(x, low, propagate_nan=tl.PropagateNan.ALL), high, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def policy_surrogate(
    log_ratio_raw, logps, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
    LOSS_TYPE: tl.constexpr, DUAL: tl.constexpr, LIMIT: tl.constexpr,
):
    """Per-token policy term pg and d pg / d logps, for the log importance ratio `log_ratio_raw`
    (token: logps - old; GSPO: the sequence's mean log-ratio, whose token-level derivative is the
    ratio itself, the "GSPO-token" form s_t = sg[s] * pi_t / sg[pi_t] of the paper, sec. 4.3).
    r = exp(clamp(log_ratio_raw, ±LIMIT)) (zero derivative outside the clamp).

      ppo    pg = max(-A r, -A clip(r, low, high)); with DUAL and A < 0: min(pg, -A c)
      cispo  pg = -sg[clip(r, low, high)] * A * logps            d pg = -clip(r, low, high) A
      sapo   pg = -(4 / tau) sigmoid(tau (r - 1)) A,  tau = tau_pos if A > 0 else tau_neg
             d pg = -4 A s (1 - s) r

    Returns (pg, d pg / d logps, is_clipped, dual_active, clamped log-ratio, r).
    """
    log_ratio, dclamp = clamped_log_ratio(log_ratio_raw, LIMIT)
    ratio = tl.exp(log_ratio)
    dual_active = tl.zeros_like(ratio) > 0.0  # all False unless the dual clip acts
    if LOSS_TYPE == _PPO:
        unclipped = -adv * ratio
        clipped = -adv * _clamp(ratio, clip_low, clip_high)
        pg = tl.maximum(unclipped, clipped, propagate_nan=tl.PropagateNan.ALL)  # NaN token -> NaN loss
        is_clipped = clipped > unclipped
        # Only the unclipped branch depends on logps; d(-A r)/d logps = -A r (times the clamp's 0/1).
        dpg = tl.where(is_clipped, 0.0, unclipped * dclamp)
        if DUAL:
            # For A < 0 the loss is also capped at -A * c (dual clip, Ye et al. 2020); the cap is constant.
            bound = -adv * dual_clip
            dual_active = (adv < 0.0) & (pg > bound)
            pg = tl.where(dual_active, bound, pg)
            dpg = tl.where(dual_active, 0.0, dpg)
    elif LOSS_TYPE == _CISPO:
        weight = _clamp(ratio, clip_low, clip_high)  # a constant: only log pi carries the gradient
        pg = -weight * adv * logps
        dpg = -weight * adv
        is_clipped = (ratio < clip_low) | (ratio > clip_high)
    else:  # SAPO
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        gate = tl.sigmoid(tau * (ratio - 1.0))
        pg = -(4.0 / tau) * gate * adv
        dpg = -4.0 * adv * gate * (1.0 - gate) * ratio * dclamp
        is_clipped = tl.zeros_like(ratio) > 0.0
    return pg, dpg, is_clipped, dual_active, log_ratio, ratio


@triton.jit
def rollout_is_weight(log_weight, is_log_min, is_log_max, IS_MODE: tl.constexpr, LIMIT: tl.constexpr):
    """Importance weight w = exp(log_weight) of pi_old over the rollout engine's policy (a constant),
    log_weight clamped to ±LIMIT first (verl's safety bound): IS_MODE 1 truncates it to
    [exp(is_log_min), exp(is_log_max)] (TIS), 2 zeroes it outside that interval (MIS / IcePop).
    NaN stays NaN. Returns (w, whether it was truncated / masked)."""
    lw, _ = clamped_log_ratio(log_weight, LIMIT)
    outside = (lw < is_log_min) | (lw > is_log_max)
    if IS_MODE == _IS_TRUNCATE:
        w = tl.exp(_clamp(lw, is_log_min, is_log_max))
    else:
        w = tl.where(outside, 0.0, tl.exp(lw))
    return w, outside


@triton.jit
def ppo_token_terms(
    logps, log_ratio_raw, adv, ref, ent, selection_entropy, is_log_weight, entropy_threshold, w_pg, w_kl, w_ent,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    LOSS_TYPE: tl.constexpr, IS_MODE: tl.constexpr, SELECT_ENT: tl.constexpr, SPLIT_AGG: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, DUAL: tl.constexpr, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr,
):
    """The weighted per-token objective on fp32 values of any shape (a block of tokens, or one token):

        loss_t = w_pg * g_t * pg + kl_coef * w_kl * KL(logps, ref) - entropy_coef * w_ent * ent

    with pg from `policy_surrogate` and the policy-term multiplier g_t = (rollout IS weight, with
    IS_MODE) * (1 if selection_entropy >= entropy_threshold, with SELECT_ENT; NaN counts as kept),
    both constants. selection_entropy is `ent` itself, or (fused head) the entropy the threshold was
    taken from, so that a token exactly at the threshold is judged on the same number. `ref` / `ent` /
    `is_log_weight` / `entropy_threshold` are only read when their constexpr says so; w_kl / w_ent only with SPLIT_AGG (else w_pg weighs every term).

    Returns (loss_t, w_pg * g_t * pg, d loss_t / d logps, d loss_t / d ref, d loss_t / d ent,
    is_clipped, dual_active, 0.5 * clamped log-ratio², ratio, kl, IS weight, IS truncated/masked,
    kept). Inlined by `_ppo_loss_forward_kernel` and by the fused RL head (`kernels/fused_head.py`),
    so the objective exists once.
    """
    pg, dpg, is_clipped, dual_active, log_ratio, ratio = policy_surrogate(
        log_ratio_raw, logps, adv, clip_low, clip_high, dual_clip, tau_pos, tau_neg,
        LOSS_TYPE=LOSS_TYPE, DUAL=DUAL, LIMIT=LIMIT,
    )
    is_w = tl.zeros_like(pg)
    is_touched = tl.zeros_like(pg) > 0.0
    if IS_MODE != 0:
        is_w, is_touched = rollout_is_weight(is_log_weight, is_log_min, is_log_max, IS_MODE=IS_MODE, LIMIT=LIMIT)
        pg = pg * is_w
        dpg = dpg * is_w
    kept = tl.zeros_like(pg)
    if SELECT_ENT:
        kept = tl.where(selection_entropy < entropy_threshold, 0.0, 1.0)
        pg = pg * kept
        dpg = dpg * kept
    kl = tl.zeros_like(pg)
    dkl = tl.zeros_like(pg)
    if HAS_REF:
        kl, dkl = kl_estimate(logps - ref, ESTIMATOR, LIMIT)
    if SPLIT_AGG:  # each term its own aggregation weight
        loss_t = w_pg * pg
        grad_logps = w_pg * dpg
        if HAS_REF:
            loss_t += kl_coef * w_kl * kl
            grad_logps += kl_coef * w_kl * dkl
        if HAS_ENT:
            loss_t -= entropy_coef * w_ent * ent
    else:  # one weight: the per-token loss first, then w (as few live values as plain PPO ever had)
        per_token = pg
        dper_token = dpg
        if HAS_REF:
            per_token += kl_coef * kl
            dper_token += kl_coef * dkl
        if HAS_ENT:
            per_token -= entropy_coef * ent
        loss_t = w_pg * per_token
        grad_logps = w_pg * dper_token
    return (loss_t, w_pg * pg, grad_logps, -kl_coef * w_kl * dkl, -entropy_coef * w_ent, is_clipped, dual_active,
            0.5 * log_ratio * log_ratio, ratio, kl, is_w, is_touched, kept)


@triton.jit
def _ppo_loss_forward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, rollout_ptr, seq_log_ratio_ptr, seq_is_ptr,
    threshold_ptr, row_scale_ptr, kl_row_scale_ptr, ent_row_scale_ptr,
    grad_logps_ptr, grad_ref_ptr, grad_ent_ptr, partials_ptr,
    n, T, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    LOSS_TYPE: tl.constexpr, SEQ_RATIO: tl.constexpr, ADV_PER_ROW: tl.constexpr, IS_MODE: tl.constexpr,
    IS_PER_ROW: tl.constexpr, SELECT_ENT: tl.constexpr, SPLIT_AGG: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, DUAL: tl.constexpr, ESTIMATOR: tl.constexpr,
    LIMIT: tl.constexpr, GRAD_LOGPS: tl.constexpr, GRAD_REF: tl.constexpr, GRAD_ENT: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    row = offs // T
    m = tl.load(mask_ptr + offs, mask=valid, other=0.0)
    counted = m != 0.0
    w_pg = m * tl.load(row_scale_ptr + row, mask=valid, other=0.0)
    w_kl = w_pg
    w_ent = w_pg
    if SPLIT_AGG:
        w_kl = m * tl.load(kl_row_scale_ptr + row, mask=valid, other=0.0)
        w_ent = m * tl.load(ent_row_scale_ptr + row, mask=valid, other=0.0)

    logps = _load_counted(logps_ptr, offs, valid, counted)
    old = _load_counted(old_ptr, offs, valid, counted)
    if ADV_PER_ROW:
        adv = _load_counted(adv_ptr, row, valid, counted)
    else:
        adv = _load_counted(adv_ptr, offs, valid, counted)
    token_log_ratio = logps - old
    log_ratio_raw = token_log_ratio
    if SEQ_RATIO:
        log_ratio_raw = _load_counted(seq_log_ratio_ptr, row, valid, counted)
    ref = logps
    if HAS_REF:
        ref = _load_counted(ref_ptr, offs, valid, counted)
    ent = tl.zeros_like(logps)
    if HAS_ENT:
        ent = _load_counted(ent_ptr, offs, valid, counted)
    is_log_weight = tl.zeros_like(logps)
    if IS_MODE != 0:
        if IS_PER_ROW:
            is_log_weight = _load_counted(seq_is_ptr, row, valid, counted)
        else:
            is_log_weight = old - _load_counted(rollout_ptr, offs, valid, counted)
    threshold = 0.0
    if SELECT_ENT:
        threshold = tl.load(threshold_ptr)
    (loss_t, pg, grad_logps, grad_ref, grad_ent, is_clipped, dual_active, half_sq, ratio, kl, is_w, is_touched,
     kept) = ppo_token_terms(
        logps, log_ratio_raw, adv, ref, ent, ent, is_log_weight, threshold, w_pg, w_kl, w_ent,
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
        LOSS_TYPE=LOSS_TYPE, IS_MODE=IS_MODE, SELECT_ENT=SELECT_ENT, SPLIT_AGG=SPLIT_AGG, HAS_REF=HAS_REF,
        HAS_ENT=HAS_ENT, DUAL=DUAL, ESTIMATOR=ESTIMATOR, LIMIT=LIMIT,
    )
    if GRAD_REF:
        tl.store(grad_ref_ptr + offs, grad_ref, mask=valid)
    if GRAD_ENT:
        tl.store(grad_ent_ptr + offs, grad_ent, mask=valid)
    if GRAD_LOGPS:
        tl.store(grad_logps_ptr + offs, grad_logps, mask=valid)

    if SEQ_RATIO:  # the approx_kl metric stays per token
        token_lr, _ = clamped_log_ratio(token_log_ratio, LIMIT)
        half_sq = 0.5 * token_lr * token_lr
    out = partials_ptr + pid * NUM_STATS
    tl.store(out + _LOSS, tl.sum(loss_t, axis=0))
    tl.store(out + _PG_LOSS, tl.sum(pg, axis=0))
    tl.store(out + _CLIPPED, tl.sum(tl.where(is_clipped, m, 0.0), axis=0))
    tl.store(out + _APPROX_KL, tl.sum(m * half_sq, axis=0))
    tl.store(out + _RATIO, tl.sum(m * ratio, axis=0))
    tl.store(out + _KL, tl.sum(m * kl, axis=0))
    tl.store(out + _ENTROPY, tl.sum(m * ent, axis=0))
    tl.store(out + _DUAL_CLIPPED, tl.sum(tl.where(dual_active, m, 0.0), axis=0))
    # Statistics of options that are off are stored as constants (m * 0 cannot be folded: m may be inf).
    if IS_MODE != 0:
        tl.store(out + _IS_WEIGHT, tl.sum(m * is_w, axis=0))
        tl.store(out + _IS_CLIPPED, tl.sum(tl.where(is_touched, m, 0.0), axis=0))
    else:
        tl.store(out + _IS_WEIGHT, 0.0)
        tl.store(out + _IS_CLIPPED, 0.0)
    if SELECT_ENT:
        tl.store(out + _ENTROPY_KEPT, tl.sum(m * kept, axis=0))
    else:
        tl.store(out + _ENTROPY_KEPT, 0.0)


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
    rollout_logps: torch.Tensor | None,
    row_scales: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    *,
    seq_log_ratio: torch.Tensor | None = None,
    seq_is_log_weight: torch.Tensor | None = None,
    entropy_threshold: torch.Tensor | None = None,
    loss_type: str = "ppo",
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    is_correction: str | None = None,
    is_log_bounds: tuple[float, float] = (float("-inf"), float("inf")),
    grad_logps: bool,
    grad_ref: bool,
    grad_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """PPO-family objective over [B, T] tensors (any float dtype; `mask` fp32), tensors in the order
    of `fastrlhf.ppo_loss`'s arguments; `kl_estimator` "k1" | "k2" | "k3", `is_correction` canonical.

    advantages: `[B, T]` or `[B]` (one per sequence). row_scales: fp32 `[B]` aggregation weights of
    the policy term, and of the KL and entropy terms (None: the policy term's). seq_log_ratio: fp32
    `[B]` mean log-ratio per sequence (GSPO; None = token-level ratio). seq_is_log_weight: fp32 `[B]`
    log IS weight per sequence (sequence_* corrections; token_* read rollout_logps); is_log_bounds:
    log of the IS weight's (min, max), -inf / +inf when open. entropy_threshold:
    fp32 0-d (None = every token trains).

    Returns `(loss, stats, d_logps, d_ref, d_entropy)`: `stats` is fp32 `[len(PPO_STATS)]` (sums over
    all tokens, named by PPO_STATS), `loss` its "loss" entry (0-d view), and the d_* are fp32
    [B, T] d loss / d input (None when not asked for).

    Per token: reads 3-8 inputs of 2-4 bytes (+ a [B] value per row option), writes 1-3 fp32
    gradients: ~12-40 bytes, ~30-60 FLOPs; memory-bound.
    """
    B, T = logps.shape
    n = B * T
    tensors = [t.contiguous() if t is not None else None
               for t in (logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps)]
    logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps = tensors
    row_scale, kl_row_scale, ent_row_scale = row_scales
    split_agg = kl_row_scale is not None or ent_row_scale is not None
    row_scale = row_scale.contiguous()
    kl_row_scale = row_scale if kl_row_scale is None else kl_row_scale.contiguous()
    ent_row_scale = row_scale if ent_row_scale is None else ent_row_scale.contiguous()
    is_mode = is_mode_code(is_correction)
    is_per_row = is_correction is not None and is_correction.startswith("sequence")
    is_log_min, is_log_max = (float(bound) for bound in is_log_bounds)
    d_logps = _grad_buffer(logps, grad_logps)
    d_ref = _grad_buffer(logps, grad_ref and ref_logps is not None)
    d_ent = _grad_buffer(logps, grad_entropy and entropy is not None)
    partials, programs, block = _partials(n, len(PPO_STATS), logps.device)
    if programs:
        dummy = row_scale  # stands in for absent optional pointers; never read or written
        _ppo_loss_forward_kernel[(programs,)](
            logps, old_logps, advantages, mask,
            *(t if t is not None else dummy for t in (ref_logps, entropy, rollout_logps, seq_log_ratio,
                                                       seq_is_log_weight, entropy_threshold)),
            row_scale, kl_row_scale, ent_row_scale,
            d_logps if d_logps is not None else partials,
            d_ref if d_ref is not None else partials,
            d_ent if d_ent is not None else partials,
            partials,
            n, T, float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef), float(entropy_coef),
            float(sapo_tau_pos), float(sapo_tau_neg), is_log_min, is_log_max,
            LOSS_TYPE=POLICY_LOSS_TYPES.index(loss_type), SEQ_RATIO=seq_log_ratio is not None,
            ADV_PER_ROW=advantages.dim() == 1, IS_MODE=is_mode, IS_PER_ROW=is_per_row,
            SELECT_ENT=entropy_threshold is not None, SPLIT_AGG=split_agg,
            HAS_REF=ref_logps is not None, HAS_ENT=entropy is not None, DUAL=dual_clip is not None,
            ESTIMATOR=ESTIMATOR_CODES[kl_estimator], LIMIT=LOG_RATIO_LIMIT,
            GRAD_LOGPS=d_logps is not None, GRAD_REF=d_ref is not None, GRAD_ENT=d_ent is not None,
            NUM_STATS=len(PPO_STATS), BLOCK=block,
            # The extra per-token options hold more values live: 8 warps (4 tokens per thread at
            # BLOCK 1024) keep every variant under 128 registers; plain PPO keeps its 4 warps.
            num_warps=8 if (seq_log_ratio is not None or is_mode or entropy_threshold is not None or split_agg) else 4,
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
