"""PPO-family objectives and the clipped value loss as Triton kernels: forward two launches, backward one.

Both losses are weighted sums of per-token terms, loss = sum_bt m_bt s_b l_bt, with s_b the
aggregation weight of row b (`loss_agg`; the policy, KL and entropy terms may each have their own).
s_b depends on the whole batch (N tokens, S non-empty rows), so:

    forward   `_ppo_forward_kernel` / `_value_forward_kernel`: one program per [ROWS, BLOCK_T] tile
              (whole rows while they fit, else chunks of a row) writes the tile's per-row sums of
              m, m l for each term and the metric numerators (`contracts.PPO_PARTIALS` /
              `VALUE_PARTIALS`), UNWEIGHTED; then `aggregate._aggregate_finalize_kernel` (one
              program) forms s_b, the loss, the metrics and keeps s_b for backward. No torch op.
    backward  `_ppo_backward_kernel` / `_value_backward_kernel` recompute every token term from the
              saved inputs and write d loss / d input = m s_b grad_output d l / d input straight in
              each input's dtype. Recomputing (~50 FLOPs per token) instead of saving an fp32
              gradient in the forward: no per-token buffer lives between the passes, the forward
              writes nothing per token, and the backward is one kernel instead of a multiply and a
              cast per input.

Every objective option is a constexpr branch: LOSS_TYPE (ppo / cispo / sapo), SEQ_RATIO (GSPO: the
ratio of the sequence's mean log-ratio), IS_MODE (rollout IS correction: truncate / mask, per token
from rollout_logps or per sequence), IS_PER_ROW, SELECT_ENT (train only on tokens at or above an
entropy threshold, a 0-d fp32 load), ADV_PER_ROW ([B] advantages), HAS_REF / HAS_ENT / DUAL. The
per-row sums GSPO and the sequence IS correction need (`_row_log_sums`) are made by each program
from its rows, over their whole length, before the tile's terms: no torch op and no extra launch,
at the price of re-reading 2-3 inputs of those rows once per chunk (from L2).

Tokens with mask 0 are zeroed right after loading, so NaN/inf padding cannot leak into the loss,
the metrics or the gradients; NaN inside the mask propagates (every clamp propagates NaN).
`ppo_token_terms` is also inlined by the fused RL head (`kernels/fused_head.py`): the objective
exists once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import cdiv, check_int32_indexable, elementwise_block, next_power_of_2
from fastrlhf.kernels.kl import ESTIMATOR_CODES, clamped_log_ratio, kl_estimate

from fastrlhf.contracts import (
    IS_CORRECTIONS,
    LOG_RATIO_LIMIT,
    POLICY_LOSS_TYPES,
    PPO_PARTIALS,
    PPO_STATS,
    VALUE_PARTIALS,
)

# Slots of the fused head's per-row statistics (PPO_STATS), by name from the contract.
# Globals read inside @triton.jit must be tl.constexpr objects.
(_LOSS, _PG_LOSS, _CLIPPED, _APPROX_KL, _RATIO, _KL, _ENTROPY, _DUAL_CLIPPED, _IS_WEIGHT, _IS_CLIPPED,
 _ENTROPY_KEPT) = (
    tl.constexpr(PPO_STATS.index(name))
    for name in ("loss", "pg_loss", "clipped", "approx_kl", "ratio", "kl", "entropy", "dual_clipped",
                 "is_weight", "is_clipped", "entropy_kept")
)
# Columns of the per-(row, chunk) partial sums of `ppo_forward` / `value_forward`.
(_P_N, _P_PG, _P_KL, _P_ENTROPY, _P_CLIPPED, _P_APPROX_KL, _P_RATIO, _P_DUAL_CLIPPED, _P_IS_WEIGHT, _P_IS_CLIPPED,
 _P_ENTROPY_KEPT) = (
    tl.constexpr(PPO_PARTIALS.index(name))
    for name in ("n", "pg", "kl", "entropy", "clipped", "approx_kl", "ratio", "dual_clipped", "is_weight",
                 "is_clipped", "entropy_kept")
)
_V_N, _V_LOSS, _V_CLIPPED, _V_VALUES = (tl.constexpr(VALUE_PARTIALS.index(name))
                                        for name in ("n", "loss", "clipped", "values"))
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


# --------------------------------------------------------------------------- tiles of [B, T]


@triton.jit
def _tile(pid_r, pid_c, B, T, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows, in-batch rows, in-tensor tokens and int32 offsets of the [ROWS, BLOCK_T] tile (pid_r, pid_c)."""
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = pid_c * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < B
    valid = row_ok[:, None] & (cols[None, :] < T)
    return rows, row_ok, valid, rows[:, None] * T + cols[None, :]


@triton.jit
def _load_mask(mask_ptr, offs, valid):
    """The mask as fp32 (bool arrives as uint8, integer and float masks as they are)."""
    return tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)


@triton.jit
def _row_log_sums(logps_ptr, old_ptr, rollout_ptr, mask_ptr, rows, row_ok, T,
                  SEQ_RATIO: tl.constexpr, IS_PER_ROW: tl.constexpr, BLOCK_T: tl.constexpr):
    """Per row of the tile, over its whole length: GSPO's mean log-ratio sum m (logps - old) /
    max(sum m, 1) and the sequence IS log-weight sum m (old - rollout) (0 when not asked for),
    as `fastrlhf.twins.ppo.sequence_log_ratio` / `rollout_log_weight`."""
    ratio_sum = tl.zeros(rows.shape, tl.float32)
    weight_sum = tl.zeros(rows.shape, tl.float32)
    tokens = tl.zeros(rows.shape, tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        valid = row_ok[:, None] & (cols[None, :] < T)
        offs = rows[:, None] * T + cols[None, :]
        m = _load_mask(mask_ptr, offs, valid)
        counted = m != 0.0
        old = _load_counted(old_ptr, offs, valid, counted)
        tokens += tl.sum(m, axis=1)
        if SEQ_RATIO:
            ratio_sum += tl.sum(m * (_load_counted(logps_ptr, offs, valid, counted) - old), axis=1)
        if IS_PER_ROW:
            weight_sum += tl.sum(m * (old - _load_counted(rollout_ptr, offs, valid, counted)), axis=1)
    return ratio_sum / tl.maximum(tokens, 1.0), weight_sum


@triton.jit
def _ppo_tile_terms(
    logps_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, rollout_ptr, threshold_ptr,
    rows, row_ok, valid, offs, m, seq_log_ratio, seq_is_log_weight, w_pg, w_kl, w_ent,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    LOSS_TYPE: tl.constexpr, SEQ_RATIO: tl.constexpr, ADV_PER_ROW: tl.constexpr, IS_MODE: tl.constexpr,
    IS_PER_ROW: tl.constexpr, SELECT_ENT: tl.constexpr, SPLIT_AGG: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_ENT: tl.constexpr, DUAL: tl.constexpr, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr,
):
    """`ppo_token_terms` on one tile, inputs loaded as fp32 with the uncounted tokens zeroed (so
    padding garbage is inert). Returns its tuple with the per-token 0.5 log-ratio^2 in place of its
    half_sq (the approx_kl metric stays per token under GSPO), then the entropy."""
    counted = m != 0.0
    logps = _load_counted(logps_ptr, offs, valid, counted)
    old = _load_counted(old_ptr, offs, valid, counted)
    if ADV_PER_ROW:
        adv = tl.where(counted, tl.load(adv_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None], 0.0)
    else:
        adv = _load_counted(adv_ptr, offs, valid, counted)
    token_log_ratio = logps - old
    log_ratio_raw = token_log_ratio
    if SEQ_RATIO:
        log_ratio_raw = tl.where(counted, seq_log_ratio[:, None], 0.0)
    ref = logps
    if HAS_REF:
        ref = _load_counted(ref_ptr, offs, valid, counted)
    ent = tl.zeros_like(logps)
    if HAS_ENT:
        ent = _load_counted(ent_ptr, offs, valid, counted)
    is_log_weight = tl.zeros_like(logps)
    if IS_MODE != 0:
        if IS_PER_ROW:
            is_log_weight = tl.where(counted, seq_is_log_weight[:, None], 0.0)
        else:
            is_log_weight = old - _load_counted(rollout_ptr, offs, valid, counted)
    threshold = 0.0
    if SELECT_ENT:
        threshold = tl.load(threshold_ptr)
    (loss_t, pg, grad_logps, grad_ref, grad_ent, is_clipped, dual_active, _half_sq, ratio, kl, is_w, is_touched,
     kept) = ppo_token_terms(
        logps, log_ratio_raw, adv, ref, ent, ent, is_log_weight, threshold, w_pg, w_kl, w_ent,
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
        LOSS_TYPE=LOSS_TYPE, IS_MODE=IS_MODE, SELECT_ENT=SELECT_ENT, SPLIT_AGG=SPLIT_AGG, HAS_REF=HAS_REF,
        HAS_ENT=HAS_ENT, DUAL=DUAL, ESTIMATOR=ESTIMATOR, LIMIT=LIMIT,
    )
    token_lr, _ = clamped_log_ratio(token_log_ratio, LIMIT)
    return (loss_t, pg, grad_logps, grad_ref, grad_ent, is_clipped, dual_active, 0.5 * token_lr * token_lr, ratio, kl,
            is_w, is_touched, kept, ent)


@triton.jit
def _store_partial(partials_ptr, rows, row_ok, pid_c, C, values, k: tl.constexpr, NP: tl.constexpr):
    """Row sums of a tile's values into partials[row, pid_c, k] ([B, C, NP] fp32)."""
    tl.store(partials_ptr + (rows * C + pid_c) * NP + k, tl.sum(values, axis=1), mask=row_ok)


@triton.jit
def _ppo_forward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, rollout_ptr, threshold_ptr, partials_ptr,
    B, T, C, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    LOSS_TYPE: tl.constexpr, SEQ_RATIO: tl.constexpr, ADV_PER_ROW: tl.constexpr, IS_MODE: tl.constexpr,
    IS_PER_ROW: tl.constexpr, SELECT_ENT: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    DUAL: tl.constexpr, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr, NP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, row_ok, valid, offs = _tile(pid_r, pid_c, B, T, ROWS, BLOCK_T)
    m = _load_mask(mask_ptr, offs, valid)
    seq_log_ratio = tl.zeros(rows.shape, tl.float32)
    seq_is_log_weight = tl.zeros(rows.shape, tl.float32)
    if SEQ_RATIO or IS_PER_ROW:
        seq_log_ratio, seq_is_log_weight = _row_log_sums(logps_ptr, old_ptr, rollout_ptr, mask_ptr, rows, row_ok, T,
                                                         SEQ_RATIO, IS_PER_ROW, BLOCK_T)
    # Weights m: the tile's sums are the unweighted numerators the finalize aggregates.
    (_loss_t, pg, _g, _g_ref, _g_ent, is_clipped, dual_active, half_sq, ratio, kl, is_w, is_touched, kept,
     ent) = _ppo_tile_terms(
        logps_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, rollout_ptr, threshold_ptr,
        rows, row_ok, valid, offs, m, seq_log_ratio, seq_is_log_weight, m, m, m,
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
        LOSS_TYPE=LOSS_TYPE, SEQ_RATIO=SEQ_RATIO, ADV_PER_ROW=ADV_PER_ROW, IS_MODE=IS_MODE, IS_PER_ROW=IS_PER_ROW,
        SELECT_ENT=SELECT_ENT, SPLIT_AGG=False, HAS_REF=HAS_REF, HAS_ENT=HAS_ENT, DUAL=DUAL, ESTIMATOR=ESTIMATOR,
        LIMIT=LIMIT,
    )
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m, _P_N, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, pg, _P_PG, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * kl, _P_KL, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * ent, _P_ENTROPY, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, tl.where(is_clipped, m, 0.0), _P_CLIPPED, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * half_sq, _P_APPROX_KL, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * ratio, _P_RATIO, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, tl.where(dual_active, m, 0.0), _P_DUAL_CLIPPED, NP)
    # Sums of options that are off are stored as zeros (m * 0 cannot be folded: m may be inf).
    zero = tl.zeros_like(m)
    if IS_MODE != 0:
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * is_w, _P_IS_WEIGHT, NP)
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, tl.where(is_touched, m, 0.0), _P_IS_CLIPPED, NP)
    else:
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, zero, _P_IS_WEIGHT, NP)
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, zero, _P_IS_CLIPPED, NP)
    if SELECT_ENT:
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * kept, _P_ENTROPY_KEPT, NP)
    else:
        _store_partial(partials_ptr, rows, row_ok, pid_c, C, zero, _P_ENTROPY_KEPT, NP)


@triton.jit
def _ppo_backward_kernel(
    logps_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, rollout_ptr, threshold_ptr, scales_ptr, grad_loss_ptr,
    grad_logps_ptr, grad_ref_ptr, grad_ent_ptr,
    B, T, clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    LOSS_TYPE: tl.constexpr, SEQ_RATIO: tl.constexpr, ADV_PER_ROW: tl.constexpr, IS_MODE: tl.constexpr,
    IS_PER_ROW: tl.constexpr, SELECT_ENT: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr,
    DUAL: tl.constexpr, ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr,
    GRAD_LOGPS: tl.constexpr, GRAD_REF: tl.constexpr, GRAD_ENT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, row_ok, valid, offs = _tile(pid_r, pid_c, B, T, ROWS, BLOCK_T)
    m = _load_mask(mask_ptr, offs, valid)
    seq_log_ratio = tl.zeros(rows.shape, tl.float32)
    seq_is_log_weight = tl.zeros(rows.shape, tl.float32)
    if SEQ_RATIO or IS_PER_ROW:
        seq_log_ratio, seq_is_log_weight = _row_log_sums(logps_ptr, old_ptr, rollout_ptr, mask_ptr, rows, row_ok, T,
                                                         SEQ_RATIO, IS_PER_ROW, BLOCK_T)
    # w = m * s_b * d(loss)/d(output): the finalize's aggregation weights of the three terms.
    g = tl.load(grad_loss_ptr).to(tl.float32)
    w_pg = m * (g * tl.load(scales_ptr + rows, mask=row_ok, other=0.0))[:, None]
    w_kl = m * (g * tl.load(scales_ptr + B + rows, mask=row_ok, other=0.0))[:, None]
    w_ent = m * (g * tl.load(scales_ptr + 2 * B + rows, mask=row_ok, other=0.0))[:, None]
    (_loss_t, _pg, grad_logps, grad_ref, grad_ent, _is_clipped, _dual_active, _half_sq, _ratio, _kl, _is_w,
     _is_touched, _kept, _ent) = _ppo_tile_terms(
        logps_ptr, old_ptr, adv_ptr, ref_ptr, ent_ptr, rollout_ptr, threshold_ptr,
        rows, row_ok, valid, offs, m, seq_log_ratio, seq_is_log_weight, w_pg, w_kl, w_ent,
        clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
        LOSS_TYPE=LOSS_TYPE, SEQ_RATIO=SEQ_RATIO, ADV_PER_ROW=ADV_PER_ROW, IS_MODE=IS_MODE, IS_PER_ROW=IS_PER_ROW,
        SELECT_ENT=SELECT_ENT, SPLIT_AGG=True, HAS_REF=HAS_REF, HAS_ENT=HAS_ENT, DUAL=DUAL, ESTIMATOR=ESTIMATOR,
        LIMIT=LIMIT,
    )
    if GRAD_LOGPS:
        tl.store(grad_logps_ptr + offs, grad_logps.to(grad_logps_ptr.dtype.element_ty), mask=valid)
    if GRAD_REF:
        tl.store(grad_ref_ptr + offs, grad_ref.to(grad_ref_ptr.dtype.element_ty), mask=valid)
    if GRAD_ENT:
        tl.store(grad_ent_ptr + offs, grad_ent.to(grad_ent_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- value loss


@triton.jit
def _value_terms(values_ptr, old_ptr, returns_ptr, offs, valid, m, clip_eps):
    """0.5 max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clip(v - old, -eps, eps), and its
    derivative in v, on fp32 tiles with uncounted tokens zeroed; also whether the clipped error won."""
    counted = m != 0.0
    values = _load_counted(values_ptr, offs, valid, counted)
    old = _load_counted(old_ptr, offs, valid, counted)
    returns = _load_counted(returns_ptr, offs, valid, counted)
    delta = values - old
    err = values - returns
    err_clipped = old + _clamp(delta, -clip_eps, clip_eps) - returns
    sq = err * err
    sq_clipped = err_clipped * err_clipped
    is_clipped = sq_clipped > sq
    loss_t = 0.5 * tl.maximum(sq, sq_clipped, propagate_nan=tl.PropagateNan.ALL)  # NaN value -> NaN loss
    inside = (delta >= -clip_eps) & (delta <= clip_eps)
    dloss = tl.where(is_clipped, tl.where(inside, err_clipped, 0.0), err)
    return loss_t, dloss, is_clipped, values


@triton.jit
def _value_forward_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, partials_ptr, B, T, C, clip_eps,
    NP: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, row_ok, valid, offs = _tile(pid_r, pid_c, B, T, ROWS, BLOCK_T)
    m = _load_mask(mask_ptr, offs, valid)
    loss_t, _dloss, is_clipped, values = _value_terms(values_ptr, old_ptr, returns_ptr, offs, valid, m, clip_eps)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m, _V_N, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * loss_t, _V_LOSS, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, tl.where(is_clipped, m, 0.0), _V_CLIPPED, NP)
    _store_partial(partials_ptr, rows, row_ok, pid_c, C, m * values, _V_VALUES, NP)


@triton.jit
def _value_backward_kernel(
    values_ptr, old_ptr, returns_ptr, mask_ptr, scales_ptr, grad_loss_ptr, grad_values_ptr, B, T, clip_eps,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows, row_ok, valid, offs = _tile(pid_r, pid_c, B, T, ROWS, BLOCK_T)
    m = _load_mask(mask_ptr, offs, valid)
    _loss_t, dloss, _is_clipped, _values = _value_terms(values_ptr, old_ptr, returns_ptr, offs, valid, m, clip_eps)
    w = m * (tl.load(grad_loss_ptr).to(tl.float32) * tl.load(scales_ptr + rows, mask=row_ok, other=0.0))[:, None]
    tl.store(grad_values_ptr + offs, (w * dloss).to(grad_values_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- launchers


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the kernels read it: bool as uint8 (the same bytes), other dtypes as they are."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def tile_grid(B: int, T: int, device: torch.device, tile: int | None = None) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_T, row blocks, chunks per row) of the [ROWS, BLOCK_T] tiles over [B, T]:
    `tile` elements per program (default `elementwise_block`), whole rows per tile while T fits."""
    check_int32_indexable("the [B, T] inputs", B * T)
    tile = tile or elementwise_block(B * T, device)
    block_t = min(next_power_of_2(max(T, 1)), tile)
    rows = max(1, min(tile // block_t, next_power_of_2(max(B, 1))))
    return rows, block_t, cdiv(B, rows), cdiv(T, block_t)


def _warps(elements: int, heavy: bool) -> int:
    # The extra per-token options hold more values live: 8 warps (4 tokens per thread at 1024
    # elements) keep every variant under 128 registers; plain tiles keep 4 warps (1 for tiny ones).
    if elements <= 128:
        return 1
    return 8 if heavy and elements >= 1024 else 4


class PPOLaunch:
    """Everything about one `ppo_loss` call signature the kernels need (made once by
    `fastrlhf.losses.ppo`'s plan): the tile grid over [B, T], constexprs and float arguments."""

    def __init__(self, *, batch, seq_len, device, loss_type, clip_low, clip_high, dual_clip, kl_coef, kl_estimator,
                 entropy_coef, sapo_tau_pos, sapo_tau_neg, is_correction, is_log_bounds, seq_ratio, adv_per_row,
                 select_entropy, has_ref, has_entropy, tile: int | None = None):
        self.shape = (batch, seq_len)
        rows, block_t, row_blocks, chunks = tile_grid(batch, seq_len, device, tile)
        self.grid, self.chunks = (row_blocks, chunks), chunks
        is_log_min, is_log_max = (float(bound) for bound in is_log_bounds)
        self.floats = (float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef),
                       float(entropy_coef), float(sapo_tau_pos), float(sapo_tau_neg), is_log_min, is_log_max)
        self.constexprs = dict(
            LOSS_TYPE=POLICY_LOSS_TYPES.index(loss_type), SEQ_RATIO=bool(seq_ratio), ADV_PER_ROW=bool(adv_per_row),
            IS_MODE=is_mode_code(is_correction),
            IS_PER_ROW=is_correction is not None and is_correction.startswith("sequence"),
            SELECT_ENT=bool(select_entropy), HAS_REF=bool(has_ref), HAS_ENT=bool(has_entropy),
            DUAL=dual_clip is not None, ESTIMATOR=ESTIMATOR_CODES[kl_estimator], LIMIT=LOG_RATIO_LIMIT,
            ROWS=rows, BLOCK_T=block_t,
        )
        c = self.constexprs
        heavy = c["SEQ_RATIO"] or c["IS_MODE"] != 0 or c["SELECT_ENT"]
        self.forward_warps = _warps(rows * block_t, heavy)
        self.backward_warps = _warps(rows * block_t, True)


def ppo_forward(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None,
    entropy: torch.Tensor | None,
    rollout_logps: torch.Tensor | None,
    entropy_threshold: torch.Tensor | None,
    *,
    launch: PPOLaunch,
) -> torch.Tensor:
    """Per-(row, chunk) partial sums of the PPO-family objective over [B, T] inputs (contiguous, any
    float dtype; the mask bool/int/float, advantages [B, T] or [B], entropy_threshold fp32 0-d or
    None), tensors in `fastrlhf.ppo_loss`'s order. Returns fp32 `[B, C, len(PPO_PARTIALS)]` for
    `aggregate.Finalize` (aggregated columns: pg, kl, entropy).

    Per token: reads 3-7 inputs of 2-4 bytes (+1 for the mask) and, for GSPO / sequence IS, 2-3 of
    them once more per chunk of the row; writes nothing per token. ~30-60 FLOPs per token.
    """
    B, T = launch.shape
    partials = torch.empty((B, launch.chunks, len(PPO_PARTIALS)), dtype=torch.float32, device=logps.device)
    if launch.grid[0] and launch.grid[1]:
        dummy = partials  # stands in for absent optional pointers; never read
        _ppo_forward_kernel[launch.grid](
            logps, old_logps, advantages, _mask_arg(mask),
            *(t if t is not None else dummy for t in (ref_logps, entropy, rollout_logps, entropy_threshold)),
            partials, B, T, launch.chunks, *launch.floats, **launch.constexprs, NP=len(PPO_PARTIALS),
            num_warps=launch.forward_warps,
        )
    return partials


def ppo_backward(
    logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, entropy_threshold,
    scales: torch.Tensor, grad_loss: torch.Tensor, *, launch: PPOLaunch, need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d loss / d logps, d ref_logps, d entropy), each in its input's dtype or None (`need`), from
    the inputs of `ppo_forward`, the finalize's aggregation weights `scales` fp32 [3, B] and the
    0-d upstream gradient. Recomputes every token term (no per-token buffer was kept).
    Per token: reads what `ppo_forward` read, writes 1-3 gradients of 2-4 bytes."""
    B, T = launch.shape
    outputs = [torch.empty_like(t, memory_format=torch.contiguous_format) if wanted and t is not None else None
               for t, wanted in zip((logps, ref_logps, entropy), need)]
    if launch.grid[0] and launch.grid[1] and any(o is not None for o in outputs):
        dummy = scales
        _ppo_backward_kernel[launch.grid](
            logps, old_logps, advantages, _mask_arg(mask),
            *(t if t is not None else dummy for t in (ref_logps, entropy, rollout_logps, entropy_threshold)),
            scales, grad_loss, *(o if o is not None else dummy for o in outputs),
            B, T, *launch.floats, **launch.constexprs,
            GRAD_LOGPS=outputs[0] is not None, GRAD_REF=outputs[1] is not None, GRAD_ENT=outputs[2] is not None,
            num_warps=launch.backward_warps,
        )
    return tuple(outputs)


class ValueLaunch:
    """The tile grid and clip range of one `value_loss` call signature (made once per signature)."""

    def __init__(self, *, batch: int, seq_len: int, device: torch.device, clip_eps: float, tile: int | None = None):
        self.shape = (batch, seq_len)
        rows, block_t, row_blocks, chunks = tile_grid(batch, seq_len, device, tile)
        self.grid, self.chunks, self.clip_eps = (row_blocks, chunks), chunks, float(clip_eps)
        self.constexprs = dict(ROWS=rows, BLOCK_T=block_t, num_warps=_warps(rows * block_t, False))


def value_forward(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                  launch: ValueLaunch) -> torch.Tensor:
    """Per-(row, chunk) partial sums of the clipped value loss over [B, T] inputs (contiguous);
    fp32 `[B, C, len(VALUE_PARTIALS)]` for `aggregate.Finalize` (aggregated: loss).
    Per token: reads 3 inputs + the mask, ~15 FLOPs."""
    B, T = launch.shape
    partials = torch.empty((B, launch.chunks, len(VALUE_PARTIALS)), dtype=torch.float32, device=values.device)
    if launch.grid[0] and launch.grid[1]:
        _value_forward_kernel[launch.grid](
            values, old_values, returns, _mask_arg(mask), partials, B, T, launch.chunks, launch.clip_eps,
            NP=len(VALUE_PARTIALS), **launch.constexprs,
        )
    return partials


def value_backward(values, old_values, returns, mask, scales: torch.Tensor, grad_loss: torch.Tensor, *,
                   launch: ValueLaunch) -> torch.Tensor:
    """d loss / d values in values' dtype, recomputed from the inputs, `scales` fp32 [1, B] and the
    0-d upstream gradient. Per token: reads 3 inputs + the mask, writes one gradient."""
    B, T = launch.shape
    grad = torch.empty_like(values, memory_format=torch.contiguous_format)
    if launch.grid[0] and launch.grid[1]:
        _value_backward_kernel[launch.grid](
            values, old_values, returns, _mask_arg(mask), scales, grad_loss, grad, B, T, launch.clip_eps,
            **launch.constexprs,
        )
    return grad
