"""Row kernel of the fused RL head: per-token loss and d loss / d logits from one chunk of logits.

`fastrlhf.losses.fused_head` makes a chunk of fp32 logits `[C, V]` with cuBLAS and calls this
kernel once per chunk; `policy_loss_from_logits` calls it once over the model's own logits
(`[B, T + 1, V]` rows, NEXT_TOKEN: the last position of each sequence only gets a zero gradient
row; REVERSE_GRAD: pass 2 walks the row back to front, starting on the blocks pass 1 read last,
which are the likeliest still in L2). One program per row:

    pass 1  one streaming read of the row: online (max, sum-exp, sum-exp·shifted) -> lse, logp,
            entropy (`logprobs._row_logprob`, the same code as `token_logprobs`' forward)
    token   the per-token loss l_t and its derivatives, with the aggregation weight
            w_t = mask_t · row_scale[b] known up front (it depends on the mask only):
              NLL (SFT):  l_t = -logp                         g = -w_t,            gh = 0
              PPO:        l_t = `ppo.ppo_token_terms`          g = w_t · dl/dlogp,  gh = -w_t · entropy_coef
            and the row's metric partials (`PPO_STATS` order; NLL: the loss alone)
    pass 2  a second read of the row writes d loss / d logits = (g (1[j=y] - p) - gh p (log p + H)) / T
            (· d cap / dx) in the weight dtype (`logprobs._write_row_dlogits`, the code of
            `token_logprobs`' backward), possibly over the logits it reads (see below)

Rows that cannot contribute (mask 0, target -100) are never read: pass 1 is skipped, and pass 2 only
writes zeros (as for every row whose g and gh are both 0, e.g. a clipped token without KL or
entropy terms). NaN inside the mask propagates: a NaN logit makes logp, the loss and that row's
gradient NaN (the clamps are NaN-propagating, `g != 0` is true for NaN).

In place over fp32 logits: the d logits of a bf16/fp16 head are written as a `[C, V]` view with row
stride 2V into the same bytes (`logprobs.dlogits_view`). Column j of row r is read at byte
4(rV + j) and its gradient written at byte 4rV + 2j <= 4(rV + j), so the writes of block
[s, s + B) land in fp32 columns [s/2, (s + B)/2), all in blocks already read; but they are read by
OTHER threads of the program, so a barrier separates each block's loads from its stores
(NARROW_IN_PLACE, `logprobs._write_row_dlogits`). One buffer of 4·C·V bytes then holds the chunk's
logits and afterwards their gradient (the GEMMs take the row stride 2V as a leading dimension).

Cost per chunk of C rows (no GEMM here): FLOPs ~ 20·C·V (two exp per element, negligible);
bytes 4CV (pass 1) + 4CV (pass 2 read) + 2CV (bf16 write) = 10·C·V. At the headline shape
N = 16384, V = 151936, H = 4096 bf16 with C = 2048 (8 chunks): 3.1 GB per chunk, 24.9 GB in all,
5.2 ms at the H200's 4.8 TB/s (a 607 KB fp32 row does not stay in the 50 MB L2 between the two
passes while ~130 SMs stream other rows, so the second read comes from HBM too). Forward only
(no gradient wanted): pass 1 alone, 4·C·V bytes, 2.1 ms in all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels.kl import ESTIMATOR_CODES
from fastrlhf.kernels._launch import gpu_sizes
from fastrlhf.kernels.logprobs import (
    _block_v,
    _num_warps,
    _row_logprob,
    _row_offset,
    _softcap_args,
    _write_row_dlogits,
    dlogits_view,  # noqa: F401  (re-exported: where the row kernel's d logits go)
    narrow_in_place,
)
from fastrlhf.kernels.kl import clamped_log_ratio
from fastrlhf.kernels.ppo import (
    _APPROX_KL,
    _CLIPPED,
    _DUAL_CLIPPED,
    _ENTROPY,
    _ENTROPY_KEPT,
    _IS_CLIPPED,
    _IS_WEIGHT,
    _KL,
    _LOSS,
    _PG_LOSS,
    _RATIO,
    is_mode_code,
    ppo_token_terms,
)

from fastrlhf.contracts import IGNORE_INDEX, LOG_RATIO_LIMIT, POLICY_LOSS_TYPES, PPO_STATS

# Per-token losses by constexpr id (globals read inside @triton.jit must be tl.constexpr).
_NLL, _PPO = tl.constexpr(0), tl.constexpr(1)
# Per-row metric partials the kernel writes, per loss.
ROW_STATS = {"nll": ("loss",), "ppo": PPO_STATS}


@triton.jit
def _fused_head_rows_kernel(
    logits_ptr, dlogits_ptr, targets_ptr, mask_ptr, row_scale_ptr, kl_row_scale_ptr, ent_row_scale_ptr,
    old_ptr, adv_ptr, ref_ptr, rollout_ptr, seq_log_ratio_ptr, seq_is_ptr, threshold_ptr, selection_entropy_ptr,
    stats_ptr,
    V, row0, T, rows_per_group, stride_group, stride_row, d_stride_group, d_stride_row,
    inv_temperature, softcap, inv_softcap,
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
    IGNORE: tl.constexpr, LOSS: tl.constexpr, LOSS_TYPE: tl.constexpr, SEQ_RATIO: tl.constexpr,
    ADV_PER_ROW: tl.constexpr, IS_MODE: tl.constexpr, IS_PER_ROW: tl.constexpr, SELECT_ENT: tl.constexpr,
    SPLIT_AGG: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, DUAL: tl.constexpr,
    ESTIMATOR: tl.constexpr, LIMIT: tl.constexpr, ENTROPY_GRAD: tl.constexpr, WRITE_GRAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NARROW_IN_PLACE: tl.constexpr, NEXT_TOKEN: tl.constexpr, REVERSE_GRAD: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    row_ptr = logits_ptr + _row_offset(pid, rows_per_group, stride_group, stride_row)
    d_row_ptr = dlogits_ptr + _row_offset(pid, rows_per_group, d_stride_group, d_stride_row)
    row = row0 + pid  # index of this token in the flattened [B, T] batch
    if NEXT_TOKEN:
        # Logits rows are [B, T + 1]: position T of each sequence scores no token, its gradient is 0.
        position = pid % rows_per_group
        if position == rows_per_group - 1:
            if WRITE_GRAD:
                _write_row_dlogits(
                    row_ptr, d_row_ptr, V, 0, True, 0.0, 0.0, 0.0, 0.0, inv_temperature, softcap, inv_softcap,
                    HAS_GRAD_ENTROPY=False, HAS_SOFTCAP=False, NARROW_IN_PLACE=False, BLOCK_V=BLOCK_V, REVERSE=False,
                )
            return
        row = row0 + (pid // rows_per_group) * (rows_per_group - 1) + position
    seq = row // T
    target = tl.load(targets_ptr + row).to(tl.int64)
    m = tl.load(mask_ptr + row)
    counted = m != 0.0
    # Nothing depends on the logits of a token outside the mask or with an ignored target.
    skip = (target == IGNORE) | (m == 0.0)
    logp, lse, entropy = _row_logprob(
        row_ptr, target, skip, V, inv_temperature, softcap, inv_softcap,
        COMPUTE_ENTROPY=LOSS == _PPO, HAS_SOFTCAP=HAS_SOFTCAP, BLOCK_V=BLOCK_V,
    )
    w = m * tl.load(row_scale_ptr + seq)
    out = stats_ptr + row * NUM_STATS
    if LOSS == _PPO:
        w_kl = w
        w_ent = w
        if SPLIT_AGG:
            w_kl = m * tl.load(kl_row_scale_ptr + seq)
            w_ent = m * tl.load(ent_row_scale_ptr + seq)
        old = logp  # on-policy (no old_logps): the current log-prob itself, a constant (ratio 1)
        if HAS_OLD:
            old = tl.where(counted, tl.load(old_ptr + row).to(tl.float32), 0.0)  # padding garbage stays inert
        if ADV_PER_ROW:
            adv = tl.where(counted, tl.load(adv_ptr + seq).to(tl.float32), 0.0)
        else:
            adv = tl.where(counted, tl.load(adv_ptr + row).to(tl.float32), 0.0)
        ref = logp
        if HAS_REF:
            ref = tl.where(counted, tl.load(ref_ptr + row).to(tl.float32), 0.0)
        token_log_ratio = logp - old
        log_ratio_raw = token_log_ratio
        if SEQ_RATIO:
            log_ratio_raw = tl.where(counted, tl.load(seq_log_ratio_ptr + seq), 0.0)
        is_log_weight = tl.zeros((), tl.float32)
        if IS_MODE != 0:
            if IS_PER_ROW:
                is_log_weight = tl.where(counted, tl.load(seq_is_ptr + seq), 0.0)
            else:
                is_log_weight = old - tl.where(counted, tl.load(rollout_ptr + row).to(tl.float32), 0.0)
        threshold = 0.0
        selection_entropy = entropy
        if SELECT_ENT:  # judged on the pre-sweep's entropies, the numbers the threshold came from
            threshold = tl.load(threshold_ptr)
            selection_entropy = tl.load(selection_entropy_ptr + row)
        (loss_t, pg, g, _g_ref, gh, is_clipped, dual_active, half_sq, ratio, kl, is_w, is_touched,
         kept) = ppo_token_terms(
            logp, log_ratio_raw, adv, ref, entropy, selection_entropy, is_log_weight, threshold, w, w_kl, w_ent,
            clip_low, clip_high, dual_clip, kl_coef, entropy_coef, tau_pos, tau_neg, is_log_min, is_log_max,
            LOSS_TYPE=LOSS_TYPE, IS_MODE=IS_MODE, SELECT_ENT=SELECT_ENT, SPLIT_AGG=SPLIT_AGG, HAS_REF=HAS_REF,
            HAS_ENT=True, DUAL=DUAL, ESTIMATOR=ESTIMATOR, LIMIT=LIMIT,
        )
        if SEQ_RATIO:  # the approx_kl metric stays per token
            token_lr, _ = clamped_log_ratio(token_log_ratio, LIMIT)
            half_sq = 0.5 * token_lr * token_lr
        tl.store(out + _LOSS, loss_t)
        tl.store(out + _PG_LOSS, pg)
        tl.store(out + _CLIPPED, tl.where(is_clipped, m, 0.0))
        tl.store(out + _APPROX_KL, m * half_sq)
        tl.store(out + _RATIO, m * ratio)
        tl.store(out + _KL, m * kl)
        tl.store(out + _ENTROPY, m * entropy)
        tl.store(out + _DUAL_CLIPPED, tl.where(dual_active, m, 0.0))
        if IS_MODE != 0:
            tl.store(out + _IS_WEIGHT, m * is_w)
            tl.store(out + _IS_CLIPPED, tl.where(is_touched, m, 0.0))
        else:
            tl.store(out + _IS_WEIGHT, 0.0)
            tl.store(out + _IS_CLIPPED, 0.0)
        if SELECT_ENT:
            tl.store(out + _ENTROPY_KEPT, m * kept)
        else:
            tl.store(out + _ENTROPY_KEPT, 0.0)
    else:  # NLL
        g = -w
        gh = tl.zeros((), tl.float32)
        tl.store(out + 0, -w * logp)
    if WRITE_GRAD:
        # A NaN g is not 0: NaN inside the mask reaches the gradient too.
        zero = skip | ((g == 0.0) & (gh == 0.0))
        _write_row_dlogits(
            row_ptr, d_row_ptr, V, target, zero, lse, entropy, g, gh,
            inv_temperature, softcap, inv_softcap,
            HAS_GRAD_ENTROPY=ENTROPY_GRAD, HAS_SOFTCAP=HAS_SOFTCAP, NARROW_IN_PLACE=NARROW_IN_PLACE,
            BLOCK_V=BLOCK_V, REVERSE=REVERSE_GRAD,
        )


def fused_head_rows(
    logits: torch.Tensor,
    dlogits: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    row_scale: torch.Tensor,
    stats: torch.Tensor,
    *,
    row0: int,
    seq_len: int,
    loss: str,
    temperature: float,
    softcap: float | None,
    ppo: dict | None = None,
    entropy_grad: bool = False,
    next_token: bool = False,
    reverse_grad: bool = False,
) -> None:
    """Run the row kernel over one chunk: rows [row0, row0 + C) of the flattened `[B, T]` batch.

    logits: fp32 `[C, V]` with unit column stride (any row stride), or (`policy_loss_from_logits`)
    the model's logits of any float dtype as `[G, R, V]` rows (unit stride over V, any strides over
    G and R; `logprobs.rows_view`). next_token: they are `[B, T + 1, V]` and position T of each
    sequence scores nothing (its d logits row is written as zeros, nothing else). dlogits: logits'
    shape, where to write d loss / d logits (weight dtype; may be `dlogits_view(logits, ...)`, or
    the logits themselves), or None for forward only. reverse_grad: the second pass over each row
    runs back to front (its first blocks are then the ones the first pass read last: L2 hits).
    targets, mask (fp32): `[B * T]` contiguous, for the whole batch; row_scale: fp32 `[B]`;
    stats: fp32 `[B * T, len(ROW_STATS[loss])]`, this chunk's rows are written. seq_len: T.
    loss: "nll" or "ppo"; ppo: dict(old_logps or None (on-policy: the current log-probs), advantages
    ([B * T], or [B] with advantages_per_row=True), ref_logps, rollout_logps or None ([B * T]
    contiguous), kl_row_scale / ent_row_scale (fp32 [B]) or None, seq_log_ratio / seq_is_log_weight (fp32 [B]) or None,
    entropy_threshold (fp32 0-d) and selection_entropy (fp32 [B * T], the entropies it was taken
    from) or None, loss_type, clip_low, clip_high, dual_clip or None, kl_coef,
    entropy_coef, sapo_tau_pos, sapo_tau_neg, is_correction or None, is_log_bounds, estimator).
    entropy_grad: the loss depends on the entropy (PPO with entropy_coef != 0).

    One program per row, BLOCK_V = 4096 columns per step with 8 warps on a GPU. Bytes (rows that
    count): pass 1 reads 4·C·V; with dlogits, pass 2 reads 4·C·V more and writes C·V·itemsize;
    ~20 FLOPs per logit. C = 2048, V = 151936, bf16 d logits: 3.1 GB, 0.65 ms at 4.8 TB/s.
    The objective options add a few scalar loads per row, nothing per logit.
    """
    V = logits.shape[-1]
    C = logits.shape[:-1].numel()
    if C == 0:
        return
    if logits.dim() not in (2, 3) or logits.stride(-1) != 1 or (
            dlogits is not None and (dlogits.shape != logits.shape or dlogits.stride(-1) != 1)):
        raise ValueError("logits and dlogits must be [C, V] or [G, R, V] with unit stride over V")
    if next_token and logits.dim() != 3:
        raise ValueError("next_token needs [B, T + 1, V] logits")
    if not (targets.is_contiguous() and mask.is_contiguous() and stats.is_contiguous()):
        raise ValueError("targets, mask and stats must be contiguous")
    is_ppo = loss == "ppo"
    opts = ppo if is_ppo else {}
    row_scale = row_scale.contiguous()  # aggregation_row_scale may return an expanded (stride 0) view
    kl_scale, ent_scale = opts.get("kl_row_scale"), opts.get("ent_row_scale")
    split_agg = kl_scale is not None or ent_scale is not None
    kl_scale = row_scale if kl_scale is None else kl_scale.contiguous()
    ent_scale = row_scale if ent_scale is None else ent_scale.contiguous()
    is_correction = opts.get("is_correction")
    is_log_min, is_log_max = (float(b) for b in opts.get("is_log_bounds", (float("-inf"), float("inf"))))
    advantages = opts.get("advantages", mask)
    optional = [opts.get(name) for name in ("old_logps", "ref_logps", "rollout_logps", "seq_log_ratio",
                                            "seq_is_log_weight", "entropy_threshold", "selection_entropy")]
    old, ref, rollout, seq_log_ratio, seq_is, threshold, selection_entropy = (
        t if t is not None else mask for t in optional)
    narrow = dlogits is not None and narrow_in_place(logits, dlogits)
    if reverse_grad and narrow:
        raise ValueError("reverse_grad cannot write a half-width gradient over the logits (NARROW_IN_PLACE)")
    block = _block_v(V, logits.device, None)
    _fused_head_rows_kernel[(C,)](
        logits, dlogits if dlogits is not None else logits, targets, mask, row_scale, kl_scale, ent_scale,
        old, advantages, ref, rollout, seq_log_ratio, seq_is, threshold, selection_entropy, stats,
        V, row0, seq_len, *_layout(logits), *_layout(dlogits if dlogits is not None else logits)[1:],
        1.0 / temperature, *_softcap_args(softcap),
        float(opts.get("clip_low", 0.0)), float(opts.get("clip_high", 0.0)), float(opts.get("dual_clip") or 0.0),
        float(opts.get("kl_coef", 0.0)), float(opts.get("entropy_coef", 0.0)),
        float(opts.get("sapo_tau_pos", 1.0)), float(opts.get("sapo_tau_neg", 1.0)), is_log_min, is_log_max,
        IGNORE=IGNORE_INDEX, LOSS=1 if is_ppo else 0,
        LOSS_TYPE=POLICY_LOSS_TYPES.index(opts.get("loss_type", "ppo")),
        SEQ_RATIO=opts.get("seq_log_ratio") is not None, ADV_PER_ROW=bool(opts.get("advantages_per_row")),
        IS_MODE=is_mode_code(is_correction),
        IS_PER_ROW=is_correction is not None and is_correction.startswith("sequence"),
        SELECT_ENT=opts.get("entropy_threshold") is not None, SPLIT_AGG=split_agg,
        HAS_OLD=opts.get("old_logps") is not None, HAS_REF=opts.get("ref_logps") is not None,
        DUAL=opts.get("dual_clip") is not None, ESTIMATOR=ESTIMATOR_CODES[opts.get("estimator", "k3")],
        LIMIT=LOG_RATIO_LIMIT, ENTROPY_GRAD=entropy_grad, WRITE_GRAD=dlogits is not None,
        HAS_SOFTCAP=bool(softcap), NARROW_IN_PLACE=narrow, NEXT_TOKEN=bool(next_token),
        REVERSE_GRAD=bool(reverse_grad) and dlogits is not None, NUM_STATS=len(ROW_STATS[loss]), BLOCK_V=block,
        num_warps=_num_warps(block),
    )


def _layout(rows: torch.Tensor) -> tuple[int, int, int]:
    """(rows per group, group stride, row stride) of [C, V] (one row per group) or [G, R, V] rows."""
    if rows.dim() == 2:
        return 1, rows.stride(0), 0
    return rows.shape[1], rows.stride(0), rows.stride(1)


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, per_program, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:  # the usual d loss / d loss of loss.backward(): nothing to do, no byte moved
        lanes = tl.arange(0, BLOCK)
        first = tl.program_id(0).to(tl.int64) * per_program
        for i in range(0, per_program):
            offs = (first + i) * BLOCK + lanes
            valid = offs < n
            x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=valid)


def scale_unless_one(x: torch.Tensor, scale: torch.Tensor) -> None:
    """x *= scale (0-d tensor) in place, contiguous x of any float dtype, decided on the device: when
    scale is 1 (loss.backward() straight on the loss) every program returns after one load, so
    handing a gradient computed in the forward over costs one launch, not a pass over it (2·numel·e
    bytes otherwise: 10 GB for bf16 [16, 1025, 151936] logits). A fixed number of programs (4 per SM
    of an H100) walk the tensor, whatever its size."""
    if not x.is_contiguous():
        raise ValueError("scale_unless_one needs a contiguous tensor")
    n = x.numel()
    if n == 0:
        return
    block = 4096
    blocks = -(-n // block)
    programs = min(blocks, 4 * 132 if gpu_sizes(x.device) else 4)
    per_program = -(-blocks // programs)
    _scale_unless_one_kernel[(-(-blocks // per_program),)](x, scale, n, per_program, BLOCK=block, num_warps=8)
