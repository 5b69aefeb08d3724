"""DPO-family, KTO and Bradley-Terry losses over a batch of sequence scores (Triton kernels + launchers).

Each loss kernel makes ONE pass over the `[B]` inputs and writes, per row, the gradient of that
row's loss with respect to the chosen and rejected inputs (already divided by B; fp32, 8 bytes per
pair), and, per block of rows, the block's share of the batch-mean loss and of every metric. With
B <= MAX_BLOCK_B there is one block, so loss and metrics are the kernel's output itself; above,
`_sum_blocks_kernel` (one program) adds the blocks up in a fixed order. The backward pass is one
launch, `_pairwise_backward_kernel`: grad_output times the saved per-row gradients, written in
each input's dtype (the reference inputs get the negatives). No torch op on either side.

Bytes per pair: forward reads 2-4 scores, writes 8 (fp32 gradients); backward reads 8, writes 2-4
gradients. ~30 FLOPs per pair (two exp, a log).

KTO (`kto_loss_forward`) has one input row per completion and a label instead of pairs: the same
single pass writes d loss / d logp per row, and its metrics are class means (desirable / undesirable
rows), so with several blocks the finalize divides after adding the blocks' sums
(`_kto_finalize_kernel`); with one block the forward kernel writes them itself. Its backward is
`pairwise_backward` with only the "chosen" slots in use.

No autograd here: `fastrlhf.losses.preference` wraps these launchers in autograd.Functions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import cdiv, next_power_of_2

from fastrlhf.contracts import DPO_LOSS_TYPES, DPO_STATS, KTO_PARTIALS, KTO_STATS, ORPO_MAX_LOGP, REWARD_STATS

MAX_BLOCK_B = 1024

# Loss types by constexpr id, the position in DPO_LOSS_TYPES (one compiled variant each). Globals
# read inside @triton.jit must be tl.constexpr objects: plain ints work in the interpreter but fail
# to compile for a GPU. The per-block metric partials are laid out as DPO_STATS / REWARD_STATS.
_SIGMOID, _ROBUST, _HINGE, _IPO, _SIMPO, _ORPO, _APO_ZERO = (
    tl.constexpr(DPO_LOSS_TYPES.index(name))
    for name in ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "apo_zero")
)
(_REWARDS_CHOSEN, _REWARDS_REJECTED, _ACCURACIES, _MARGINS, _LOGPS_CHOSEN, _LOGPS_REJECTED, _NLL,
 _LOG_ODDS_RATIO, _LOG_ODDS_CHOSEN) = (
    tl.constexpr(DPO_STATS.index(name)) for name in (
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
)
_BT_ACCURACY, _BT_MARGIN, _BT_CHOSEN, _BT_REJECTED = (
    tl.constexpr(REWARD_STATS.index(name)) for name in ("accuracy", "margin", "rewards/chosen", "rewards/rejected")
)
(_KTO_REWARDS_CHOSEN, _KTO_REWARDS_REJECTED, _KTO_MARGINS, _KTO_LOGPS_CHOSEN, _KTO_LOGPS_REJECTED, _KTO_KL,
 _KTO_COUNT_CHOSEN, _KTO_COUNT_REJECTED) = (
    tl.constexpr(KTO_STATS.index(name)) for name in (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
        "count/chosen", "count/rejected")
)
(_KP_LOSS, _KP_COUNT_CHOSEN, _KP_COUNT_REJECTED, _KP_REWARDS_CHOSEN, _KP_REWARDS_REJECTED, _KP_LOGPS_CHOSEN,
 _KP_LOGPS_REJECTED) = (
    tl.constexpr(KTO_PARTIALS.index(name)) for name in (
        "loss", "count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected", "logps/chosen",
        "logps/rejected")
)


# ---- numerics helpers (no libdevice: the CPU interpreter does not implement it) --------------

@triton.jit
def _log1p(y):
    # log(1 + y) accurate for tiny y (Goldberg): the rounding of 1 + y cancels in log(u) / (u - 1).
    u = 1.0 + y
    is_one = u == 1.0
    return tl.where(is_one, y, tl.log(u) * (y / tl.where(is_one, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    # exp(x) - 1 accurate near 0 (Kahan); plain exp(x) - 1 is accurate enough for |x| >= 0.5.
    u = tl.exp(x)
    use_kahan = (tl.abs(x) < 0.5) & (u != 1.0)
    kahan = (u - 1.0) * (x / tl.log(tl.where(use_kahan, u, 2.0)))  # log never sees 0 or 1
    return tl.where(use_kahan, kahan, tl.where(u == 1.0, x, u - 1.0))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _store_block_mean(stats_ptr, slot, values, valid, inv_n):
    tl.store(stats_ptr + slot, tl.sum(tl.where(valid, values, 0.0), axis=0) * inv_n)


# ---- DPO family ---------------------------------------------------------------------------------

@triton.jit
def _dpo_loss_forward_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr,
    grad_chosen_ptr, grad_rejected_ptr, loss_ptr, stats_ptr,
    B, inv_B, beta, label_smoothing, gamma, orpo_max_logp,
    LOSS_TYPE: tl.constexpr, HAS_REF: tl.constexpr, N_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    chosen = tl.load(chosen_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    rejected = tl.load(rejected_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_REF:
        chosen_ratio = chosen - tl.load(ref_chosen_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        rejected_ratio = rejected - tl.load(ref_rejected_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        chosen_ratio = chosen
        rejected_ratio = rejected
    h = chosen_ratio - rejected_ratio
    log_odds = tl.zeros_like(h)
    log_sig_log_odds = tl.zeros_like(h)

    if LOSS_TYPE == _HINGE:
        x = beta * h
        loss = tl.maximum(1.0 - x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out (as torch.relu)
        grad_chosen = tl.where(x < 1.0, -beta, 0.0)
        grad_rejected = -grad_chosen
    elif LOSS_TYPE == _IPO:
        diff = h - 0.5 / beta
        loss = diff * diff
        grad_chosen = 2.0 * diff
        grad_rejected = -grad_chosen
    elif LOSS_TYPE == _ORPO:
        # log odds(p) = logp - log(1 - p) = logp - log(-expm1(logp)); d/dlogp = -1 / expm1(logp)
        c = tl.minimum(chosen, orpo_max_logp, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN
        r = tl.minimum(rejected, orpo_max_logp, propagate_nan=tl.PropagateNan.ALL)
        expm1_c = _expm1(c)
        expm1_r = _expm1(r)
        log_odds = (c - tl.log(-expm1_c)) - (r - tl.log(-expm1_r))
        log_sig_log_odds = _log_sigmoid(log_odds)
        loss = -chosen - beta * log_sig_log_odds  # NLL of chosen + beta * odds-ratio term
        dloss_dlog_odds = -beta * _sigmoid(-log_odds)
        grad_chosen = -1.0 + dloss_dlog_odds * tl.where(chosen <= orpo_max_logp, -1.0 / expm1_c, 0.0)
        grad_rejected = dloss_dlog_odds * tl.where(rejected <= orpo_max_logp, 1.0 / expm1_r, 0.0)
    elif LOSS_TYPE == _APO_ZERO:
        # Each log-ratio through its own sigmoid: raise the chosen one, lower the rejected one.
        sig_c = _sigmoid(beta * chosen_ratio)
        sig_r = _sigmoid(beta * rejected_ratio)
        loss = 1.0 - sig_c + sig_r
        grad_chosen = -beta * sig_c * (1.0 - sig_c)
        grad_rejected = beta * sig_r * (1.0 - sig_r)
    else:  # sigmoid, robust, simpo: functions of x = beta * h (- gamma)
        x = beta * h
        if LOSS_TYPE == _SIMPO:
            x = x - gamma
        log_sig_pos = _log_sigmoid(x)
        log_sig_neg = log_sig_pos - x  # log sigmoid(-x)
        sig_neg = _sigmoid(-x)
        sig_pos = 1.0 - sig_neg
        eps = label_smoothing
        if LOSS_TYPE == _ROBUST:
            loss = (-(1.0 - eps) * log_sig_pos + eps * log_sig_neg) / (1.0 - 2.0 * eps)
            dloss_dx = (-(1.0 - eps) * sig_neg - eps * sig_pos) / (1.0 - 2.0 * eps)
        else:
            loss = -(1.0 - eps) * log_sig_pos - eps * log_sig_neg
            dloss_dx = -(1.0 - eps) * sig_neg + eps * sig_pos
        grad_chosen = beta * dloss_dx
        grad_rejected = -grad_chosen

    tl.store(grad_chosen_ptr + offs, grad_chosen * inv_B, mask=valid)
    tl.store(grad_rejected_ptr + offs, grad_rejected * inv_B, mask=valid)
    tl.store(loss_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0) * inv_B)

    chosen_reward = beta * chosen_ratio
    rejected_reward = beta * rejected_ratio
    stats = stats_ptr + pid * N_STATS
    _store_block_mean(stats, _REWARDS_CHOSEN, chosen_reward, valid, inv_B)
    _store_block_mean(stats, _REWARDS_REJECTED, rejected_reward, valid, inv_B)
    _store_block_mean(stats, _ACCURACIES, (chosen_reward > rejected_reward).to(tl.float32), valid, inv_B)
    _store_block_mean(stats, _MARGINS, chosen_reward - rejected_reward, valid, inv_B)
    _store_block_mean(stats, _LOGPS_CHOSEN, chosen, valid, inv_B)
    _store_block_mean(stats, _LOGPS_REJECTED, rejected, valid, inv_B)
    _store_block_mean(stats, _NLL, -chosen, valid, inv_B)
    _store_block_mean(stats, _LOG_ODDS_RATIO, log_sig_log_odds, valid, inv_B)
    _store_block_mean(stats, _LOG_ODDS_CHOSEN, log_odds, valid, inv_B)


# ---- Bradley-Terry reward model -----------------------------------------------------------------

@triton.jit
def _reward_loss_forward_kernel(
    chosen_ptr, rejected_ptr, margin_ptr,
    grad_chosen_ptr, grad_rejected_ptr, loss_ptr, stats_ptr,
    B, inv_B, margin_value, center_coef,
    HAS_MARGIN_TENSOR: tl.constexpr, N_STATS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    chosen = tl.load(chosen_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    rejected = tl.load(rejected_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_MARGIN_TENSOR:
        margin = tl.load(margin_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        margin = margin_value
    x = chosen - rejected - margin
    total = chosen + rejected
    loss = -_log_sigmoid(x) + center_coef * total * total
    sig_neg = _sigmoid(-x)
    center_grad = 2.0 * center_coef * total
    tl.store(grad_chosen_ptr + offs, (center_grad - sig_neg) * inv_B, mask=valid)
    tl.store(grad_rejected_ptr + offs, (center_grad + sig_neg) * inv_B, mask=valid)
    tl.store(loss_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0) * inv_B)

    stats = stats_ptr + pid * N_STATS
    _store_block_mean(stats, _BT_ACCURACY, (chosen > rejected).to(tl.float32), valid, inv_B)
    _store_block_mean(stats, _BT_MARGIN, chosen - rejected, valid, inv_B)
    _store_block_mean(stats, _BT_CHOSEN, chosen, valid, inv_B)
    _store_block_mean(stats, _BT_REJECTED, rejected, valid, inv_B)


# ---- KTO (unpaired desirable / undesirable completions) -----------------------------------------

@triton.jit
def _kto_store_results(loss_ptr, stats_ptr, loss, n_chosen, n_rejected, rewards_chosen, rewards_rejected,
                       logps_chosen, logps_rejected, kl):
    """Write the loss and the KTO_STATS from the batch's sums: class means over max(count, 1) rows
    (0 for a class the batch lacks, never 0 / 0)."""
    mean_rewards_chosen = rewards_chosen / tl.maximum(n_chosen, 1.0)
    mean_rewards_rejected = rewards_rejected / tl.maximum(n_rejected, 1.0)
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + _KTO_REWARDS_CHOSEN, mean_rewards_chosen)
    tl.store(stats_ptr + _KTO_REWARDS_REJECTED, mean_rewards_rejected)
    tl.store(stats_ptr + _KTO_MARGINS, mean_rewards_chosen - mean_rewards_rejected)
    tl.store(stats_ptr + _KTO_LOGPS_CHOSEN, logps_chosen / tl.maximum(n_chosen, 1.0))
    tl.store(stats_ptr + _KTO_LOGPS_REJECTED, logps_rejected / tl.maximum(n_rejected, 1.0))
    tl.store(stats_ptr + _KTO_KL, kl)
    tl.store(stats_ptr + _KTO_COUNT_CHOSEN, n_chosen)
    tl.store(stats_ptr + _KTO_COUNT_REJECTED, n_rejected)


@triton.jit
def _load_kl(kl_ptr, kl_value, KL_IS_TENSOR: tl.constexpr):
    if KL_IS_TENSOR:
        kl = tl.load(kl_ptr).to(tl.float32)
    else:
        kl = kl_value
    return kl


@triton.jit
def _kto_loss_forward_kernel(
    logps_ptr, ref_logps_ptr, labels_ptr, kl_ptr,
    grad_ptr, loss_ptr, stats_ptr, partials_ptr,
    B, inv_B, beta, kl_value, desirable_weight, undesirable_weight,
    KL_IS_TENSOR: tl.constexpr, ONE_BLOCK: tl.constexpr, N_PARTIALS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Per row, r = logp - ref_logp and x = beta (r - z0):
         desirable    w_D (1 - s(x)) = w_D s(-x),   d/dr = -w_D beta s(x) s(-x)
         undesirable  w_U (1 - s(-x)) = w_U s(x),   d/dr = +w_U beta s(x) s(-x)
    The gradient (/ B) is stored per row; the loss (/ B) and the metric sums per block, or, with
    ONE_BLOCK, the final loss and metrics straight away."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    logps = tl.load(logps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ratio = logps - tl.load(ref_logps_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    desirable = tl.load(labels_ptr + offs, mask=valid, other=0) != 0
    kl = _load_kl(kl_ptr, kl_value, KL_IS_TENSOR)
    x = beta * (ratio - kl)
    # s(|x|) and s(-|x|) from one exp that never overflows; NaN x fails every comparison and stays NaN.
    e = tl.exp(-tl.abs(x))
    sig_abs = 1.0 / (1.0 + e)
    sig_neg_abs = e * sig_abs
    sig_pos = tl.where(x >= 0, sig_abs, sig_neg_abs)   # s(x)
    sig_neg = tl.where(x >= 0, sig_neg_abs, sig_abs)   # s(-x)
    weight = tl.where(desirable, desirable_weight, undesirable_weight)
    loss = weight * tl.where(desirable, sig_neg, sig_pos)
    slope = weight * beta * (sig_abs * sig_neg_abs)
    tl.store(grad_ptr + offs, tl.where(desirable, -slope, slope) * inv_B, mask=valid)

    chosen = valid & desirable
    rejected = valid & (~desirable)
    rewards = beta * ratio
    loss_sum = tl.sum(tl.where(valid, loss, 0.0), axis=0) * inv_B
    n_chosen = tl.sum(chosen.to(tl.float32), axis=0)
    n_rejected = tl.sum(rejected.to(tl.float32), axis=0)
    rewards_chosen = tl.sum(tl.where(chosen, rewards, 0.0), axis=0)
    rewards_rejected = tl.sum(tl.where(rejected, rewards, 0.0), axis=0)
    logps_chosen = tl.sum(tl.where(chosen, logps, 0.0), axis=0)
    logps_rejected = tl.sum(tl.where(rejected, logps, 0.0), axis=0)
    if ONE_BLOCK:
        _kto_store_results(loss_ptr, stats_ptr, loss_sum, n_chosen, n_rejected, rewards_chosen, rewards_rejected,
                           logps_chosen, logps_rejected, kl)
    else:
        row = partials_ptr + pid * N_PARTIALS
        tl.store(row + _KP_LOSS, loss_sum)
        tl.store(row + _KP_COUNT_CHOSEN, n_chosen)
        tl.store(row + _KP_COUNT_REJECTED, n_rejected)
        tl.store(row + _KP_REWARDS_CHOSEN, rewards_chosen)
        tl.store(row + _KP_REWARDS_REJECTED, rewards_rejected)
        tl.store(row + _KP_LOGPS_CHOSEN, logps_chosen)
        tl.store(row + _KP_LOGPS_REJECTED, logps_rejected)


@triton.jit
def _kto_finalize_kernel(partials_ptr, kl_ptr, loss_ptr, stats_ptr, n_blocks, kl_value,
                         KL_IS_TENSOR: tl.constexpr, N_PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: the blocks' partial sums added up in a fixed order, then the class means."""
    lanes = tl.arange(0, BLOCK_P)
    loss = tl.zeros((BLOCK_P,), tl.float32)
    n_chosen = tl.zeros((BLOCK_P,), tl.float32)
    n_rejected = tl.zeros((BLOCK_P,), tl.float32)
    rewards_chosen = tl.zeros((BLOCK_P,), tl.float32)
    rewards_rejected = tl.zeros((BLOCK_P,), tl.float32)
    logps_chosen = tl.zeros((BLOCK_P,), tl.float32)
    logps_rejected = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, n_blocks, BLOCK_P):
        p = p0 + lanes
        ok = p < n_blocks
        row = partials_ptr + p * N_PARTIALS
        loss += tl.load(row + _KP_LOSS, mask=ok, other=0.0)
        n_chosen += tl.load(row + _KP_COUNT_CHOSEN, mask=ok, other=0.0)
        n_rejected += tl.load(row + _KP_COUNT_REJECTED, mask=ok, other=0.0)
        rewards_chosen += tl.load(row + _KP_REWARDS_CHOSEN, mask=ok, other=0.0)
        rewards_rejected += tl.load(row + _KP_REWARDS_REJECTED, mask=ok, other=0.0)
        logps_chosen += tl.load(row + _KP_LOGPS_CHOSEN, mask=ok, other=0.0)
        logps_rejected += tl.load(row + _KP_LOGPS_REJECTED, mask=ok, other=0.0)
    _kto_store_results(loss_ptr, stats_ptr, tl.sum(loss, axis=0), tl.sum(n_chosen, axis=0),
                       tl.sum(n_rejected, axis=0), tl.sum(rewards_chosen, axis=0), tl.sum(rewards_rejected, axis=0),
                       tl.sum(logps_chosen, axis=0), tl.sum(logps_rejected, axis=0),
                       _load_kl(kl_ptr, kl_value, KL_IS_TENSOR))


@triton.jit
def _sum_blocks_kernel(loss_partials_ptr, stat_partials_ptr, loss_ptr, stats_ptr, n_blocks,
                       N_STATS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """loss = sum of the blocks' loss shares, stats[k] = sum of their metric shares (fixed order)."""
    lanes = tl.arange(0, BLOCK_P)
    kcols = tl.arange(0, BLOCK_K)
    loss = tl.zeros((BLOCK_P,), tl.float32)
    stats = tl.zeros((BLOCK_P, BLOCK_K), tl.float32)
    for p0 in range(0, n_blocks, BLOCK_P):
        p = p0 + lanes
        ok = p < n_blocks
        loss += tl.load(loss_partials_ptr + p, mask=ok, other=0.0)
        stats += tl.load(stat_partials_ptr + p[:, None] * N_STATS + kcols[None, :],
                         mask=ok[:, None] & (kcols[None, :] < N_STATS), other=0.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0))
    tl.store(stats_ptr + kcols, tl.sum(stats, axis=0), mask=kcols < N_STATS)


@triton.jit
def _pairwise_backward_kernel(
    row_grad_chosen_ptr, row_grad_rejected_ptr, grad_loss_ptr,
    grad_chosen_ptr, grad_rejected_ptr, grad_ref_chosen_ptr, grad_ref_rejected_ptr, B,
    GRAD_CHOSEN: tl.constexpr, GRAD_REJECTED: tl.constexpr, GRAD_REF_CHOSEN: tl.constexpr,
    GRAD_REF_REJECTED: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    valid = offs < B
    g = tl.load(grad_loss_ptr).to(tl.float32)
    if GRAD_CHOSEN or GRAD_REF_CHOSEN:
        chosen = g * tl.load(row_grad_chosen_ptr + offs, mask=valid, other=0.0)
        if GRAD_CHOSEN:
            tl.store(grad_chosen_ptr + offs, chosen.to(grad_chosen_ptr.dtype.element_ty), mask=valid)
        if GRAD_REF_CHOSEN:
            tl.store(grad_ref_chosen_ptr + offs, (-chosen).to(grad_ref_chosen_ptr.dtype.element_ty), mask=valid)
    if GRAD_REJECTED or GRAD_REF_REJECTED:
        rejected = g * tl.load(row_grad_rejected_ptr + offs, mask=valid, other=0.0)
        if GRAD_REJECTED:
            tl.store(grad_rejected_ptr + offs, rejected.to(grad_rejected_ptr.dtype.element_ty), mask=valid)
        if GRAD_REF_REJECTED:
            tl.store(grad_ref_rejected_ptr + offs, (-rejected).to(grad_ref_rejected_ptr.dtype.element_ty),
                     mask=valid)


# ---- launchers ----------------------------------------------------------------------------------

def _block_outputs(B: int, n_stats: int, device: torch.device):
    block_b = min(max(next_power_of_2(B), 16), MAX_BLOCK_B)
    n_blocks = cdiv(B, block_b)
    grad_chosen = torch.empty(B, dtype=torch.float32, device=device)
    grad_rejected = torch.empty(B, dtype=torch.float32, device=device)
    loss_partials = torch.empty((n_blocks,), dtype=torch.float32, device=device)
    stat_partials = torch.empty((n_blocks, n_stats), dtype=torch.float32, device=device)
    return block_b, n_blocks, grad_chosen, grad_rejected, loss_partials, stat_partials


def _finish(loss_partials: torch.Tensor, stat_partials: torch.Tensor):
    """(0-d loss, [n_stats] stats): the partials themselves for one block, else their sums."""
    n_blocks, n_stats = stat_partials.shape
    if n_blocks == 1:
        return loss_partials.view(()), stat_partials.view(-1)
    loss = torch.empty((), dtype=torch.float32, device=loss_partials.device)
    stats = torch.empty(n_stats, dtype=torch.float32, device=loss_partials.device)
    _sum_blocks_kernel[(1,)](loss_partials, stat_partials, loss, stats, n_blocks, N_STATS=n_stats,
                             BLOCK_K=next_power_of_2(n_stats), BLOCK_P=64)
    return loss, stats


def dpo_loss_forward(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over `[B]` sequence log-probs (B >= 1, contiguous, one device).

    Returns `(loss, stats, grad_chosen, grad_rejected)`: the fp32 batch-mean loss (0-d), the
    metric means in `DPO_STATS` order `[len(DPO_STATS)]`, and d loss / d chosen, d loss / d
    rejected as fp32 `[B]` (the reference inputs' gradients are their negatives).
    """
    B = chosen.shape[0]
    has_ref = ref_chosen is not None
    block_b, n_blocks, grad_c, grad_r, loss_partials, stat_partials = _block_outputs(
        B, len(DPO_STATS), chosen.device
    )
    _dpo_loss_forward_kernel[(n_blocks,)](
        chosen, rejected,
        ref_chosen if has_ref else chosen, ref_rejected if has_ref else rejected,
        grad_c, grad_r, loss_partials, stat_partials,
        B, 1.0 / B, float(beta), float(label_smoothing), float(gamma), ORPO_MAX_LOGP,
        LOSS_TYPE=DPO_LOSS_TYPES.index(loss_type), HAS_REF=has_ref,
        N_STATS=len(DPO_STATS), BLOCK_B=block_b,
    )
    loss, stats = _finish(loss_partials, stat_partials)
    return loss, stats, grad_c, grad_r


def reward_loss_forward(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None,
    center_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over `[B]` reward scores (B >= 1). `margin` is a `[B]` tensor, a float or None.

    Returns `(loss, stats, grad_chosen, grad_rejected)` like `dpo_loss_forward`, with the
    metrics in `REWARD_STATS` order.
    """
    B = chosen.shape[0]
    has_margin_tensor = isinstance(margin, torch.Tensor)
    block_b, n_blocks, grad_c, grad_r, loss_partials, stat_partials = _block_outputs(
        B, len(REWARD_STATS), chosen.device
    )
    _reward_loss_forward_kernel[(n_blocks,)](
        chosen, rejected, margin if has_margin_tensor else chosen,
        grad_c, grad_r, loss_partials, stat_partials,
        B, 1.0 / B, 0.0 if has_margin_tensor or margin is None else float(margin), float(center_coef),
        HAS_MARGIN_TENSOR=has_margin_tensor, N_STATS=len(REWARD_STATS), BLOCK_B=block_b,
    )
    loss, stats = _finish(loss_partials, stat_partials)
    return loss, stats, grad_c, grad_r


def kto_loss_forward(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over `[B]` sequence log-probs (B >= 1, contiguous, one device); `labels` bool `[B]`
    (True = desirable), `kl` the reference point z0: a one-element tensor (read on the device, no
    sync) or a float.

    Returns `(loss, stats, grad)`: the fp32 loss (0-d), the metrics in `KTO_STATS` order, and
    d loss / d logps as fp32 `[B]` (d loss / d ref_logps is its negative).

    Work: ~25 FLOPs per row (one exp, one division); bytes per row: reads 2 log-probs + 1 label
    byte, writes 4 (the fp32 gradient). B > MAX_BLOCK_B adds one single-program finalize launch
    over 7 floats per block.
    """
    B = logps.shape[0]
    block_b = min(max(next_power_of_2(B), 16), MAX_BLOCK_B)
    n_blocks = cdiv(B, block_b)
    device = logps.device
    grad = torch.empty(B, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    stats = torch.empty(len(KTO_STATS), dtype=torch.float32, device=device)
    partials = torch.empty((n_blocks, len(KTO_PARTIALS)), dtype=torch.float32, device=device) if n_blocks > 1 else stats
    kl_is_tensor = isinstance(kl, torch.Tensor)
    labels = labels.view(torch.uint8)  # bool read as uint8 (the same bytes), as the PPO kernels read a bool mask
    _kto_loss_forward_kernel[(n_blocks,)](
        logps, ref_logps, labels, kl if kl_is_tensor else logps,
        grad, loss, stats, partials,
        B, 1.0 / B, float(beta), 0.0 if kl_is_tensor else float(kl), float(desirable_weight),
        float(undesirable_weight),
        KL_IS_TENSOR=kl_is_tensor, ONE_BLOCK=n_blocks == 1, N_PARTIALS=len(KTO_PARTIALS), BLOCK_B=block_b,
    )
    if n_blocks > 1:
        _kto_finalize_kernel[(1,)](partials, kl if kl_is_tensor else partials, loss, stats, n_blocks,
                                   0.0 if kl_is_tensor else float(kl), KL_IS_TENSOR=kl_is_tensor,
                                   N_PARTIALS=len(KTO_PARTIALS), BLOCK_P=64)
    return loss, stats, grad


def pairwise_backward(
    row_grad_chosen: torch.Tensor,
    row_grad_rejected: torch.Tensor,
    grad_loss: torch.Tensor,
    dtypes: tuple[torch.dtype | None, ...],
    need: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(d chosen, d rejected, d ref_chosen, d ref_rejected): grad_loss (0-d) times the forward's
    per-row gradients (negated for the references), each in its input's dtype from `dtypes`
    (chosen, rejected, ref_chosen, ref_rejected; None = no such input), None where not `need`ed."""
    B = row_grad_chosen.shape[0]
    device = row_grad_chosen.device
    outputs = [torch.empty(B, dtype=dtype, device=device) if dtype is not None and wanted else None
               for dtype, wanted in zip(dtypes, need)]
    if B and any(o is not None for o in outputs):
        block_b = min(max(next_power_of_2(B), 16), MAX_BLOCK_B)
        _pairwise_backward_kernel[(cdiv(B, block_b),)](
            row_grad_chosen, row_grad_rejected, grad_loss, *(o if o is not None else row_grad_chosen for o in outputs),
            B, GRAD_CHOSEN=outputs[0] is not None, GRAD_REJECTED=outputs[1] is not None,
            GRAD_REF_CHOSEN=outputs[2] is not None, GRAD_REF_REJECTED=outputs[3] is not None, BLOCK_B=block_b,
        )
    return tuple(outputs)
