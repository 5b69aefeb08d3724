"""PPO-family losses in plain PyTorch: KL estimators, the policy objectives, the clipped value loss.

This is the ground truth the Triton kernels (`kernels/ppo.py`, `kernels/kl.py`) are tested against,
and the path used off-GPU. The public functions in `fastrlhf.losses.ppo` check the arguments
(`fastrlhf._checks`) before they call these; called directly, these trust their inputs.
The helpers that turn options into per-row or per-batch constants (`aggregation_row_scale`,
`sequence_log_ratio`, `rollout_log_weight`, `entropy_threshold`) are shared with the Triton path,
which feeds their results to the kernels, so both backends use one definition of each.

Conventions: importance log-ratios are clamped to [-20, 20] before `exp`; tokens with mask 0 are
zeroed before any arithmetic, so NaN/inf padding never reaches the loss or the gradients; a fully
masked row or an all-zero mask gives loss 0 and zero gradients. `old_logps`, `advantages`,
`rollout_logps`, `old_values` and `returns` are treated as constants (detached), as in every PPO
implementation.
"""
from __future__ import annotations

import math

import torch

from fastrlhf._dtypes import compute_dtype
from fastrlhf.contracts import IS_CORRECTION_ALIASES, KL_ESTIMATOR_ALIASES, LOG_RATIO_LIMIT

Total = float | torch.Tensor | None


# ----------------------------------------------------------------------------- helpers
def _counted(x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` with the tokens that do not count set to 0 (padding may hold NaN/inf)."""
    return torch.where(counts, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask), and 0 when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregation_row_scale(
    mask: torch.Tensor,
    loss_agg: str,
    *,
    total_tokens: Total = None,
    total_sequences: Total = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Per-sequence weight s_b such that the aggregated loss is `Σ_bt mask_bt · s_b · l_bt`.

    `mask` `[B, T]` (float, 1 = counts); returns `[B]` in its dtype. With n_b = Σ_t mask_bt and
    S = the number of sequences with n_b > 0 (fully masked rows never count, as verl's `agg_loss`
    and OpenRLHF's `aggregate_loss`):
        token-mean               s_b = 1 / N,             N = total_tokens, default Σ_b n_b
        seq-mean-token-mean      s_b = 1 / (n_b · S'),    S' = total_sequences, default S
        seq-mean-token-sum-norm  s_b = 1 / (S' · L),      L = norm_length, default T
    The totals are the denominators of the WHOLE batch the optimizer step averages over (all
    micro-batches and ranks: verl's batch_num_tokens / global_batch_size, TRL's num_items_in_batch);
    given them, per-micro-batch losses add up to the full-batch loss exactly. Torch ops only (no
    host sync); empty masks give 0.
    """
    B, T = mask.shape
    tokens_per_seq = mask.sum(-1)
    if loss_agg == "token-mean":
        tokens = mask.sum().clamp(min=1) if total_tokens is None else torch.as_tensor(total_tokens).to(mask)
        return (1.0 / tokens).expand(B)
    sequences = (tokens_per_seq > 0).sum().to(mask.dtype).clamp(min=1) if total_sequences is None else \
        torch.as_tensor(total_sequences).to(mask)
    if loss_agg == "seq-mean-token-mean":
        return 1.0 / (tokens_per_seq.clamp(min=1) * sequences)
    length = max(T, 1) if norm_length is None else norm_length
    return (1.0 / (sequences * length)).expand(B)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str, **totals) -> torch.Tensor:
    """Reduce a [B, T] per-token loss (already 0 where mask is 0) to a scalar as `loss_agg` says
    (`aggregation_row_scale`; `totals`: its total_tokens / total_sequences / norm_length)."""
    return (per_token * mask * aggregation_row_scale(mask, loss_agg, **totals)[:, None]).sum()


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's log s_b = (1 / n_b) Σ_t mask (logps - old_logps) per sequence, fp32 (float64 for
    float64 inputs) `[B]`, detached; 0 for a fully masked row."""
    counts = mask != 0
    dtype = compute_dtype(logps, old_logps)
    m = mask.to(dtype)
    diff = _counted(logps.detach(), counts, dtype) - _counted(old_logps.detach(), counts, dtype)
    return (diff * m).sum(-1) / m.sum(-1).clamp(min=1)


def rollout_log_weight(old_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log of the sequence-level IS weight Π_t pi_old / pi_rollout = Σ_t mask (old - rollout), `[B]`
    (TRL's sequence_* modes, verl's rollout_is="sequence"), detached."""
    counts = mask != 0
    dtype = compute_dtype(old_logps, rollout_logps)
    m = mask.to(dtype)
    diff = _counted(old_logps.detach(), counts, dtype) - _counted(rollout_logps.detach(), counts, dtype)
    return (diff * m).sum(-1)


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """The entropy at quantile 1 - rho of the counted tokens (torch.quantile's linear interpolation),
    0-d, detached: the tokens at or above it are the top-rho fraction by entropy ("Beyond the 80/20
    Rule", Wang et al. 2025; TRL's `get_high_entropy_mask` over one process's tokens).
    No host sync (no boolean indexing): uncounted tokens sort last as +inf, the count stays a tensor.
    """
    dtype = compute_dtype(entropy)
    counts = (mask != 0).reshape(-1)
    values = torch.where(counts, entropy.detach().reshape(-1).to(dtype), torch.full((), float("inf"), dtype=dtype,
                                                                                        device=entropy.device))
    if values.numel() == 0:
        return torch.zeros((), dtype=dtype, device=entropy.device)
    ordered = torch.sort(values).values
    count = counts.sum()
    position = (1.0 - top_entropy_quantile) * (count - 1).clamp(min=0).to(dtype)
    low = position.floor().long()
    high = torch.minimum(low + 1, (count - 1).clamp(min=0))
    lower, upper = ordered[low], ordered[high]
    fraction = position - low.to(dtype)
    threshold = torch.where(fraction == 0, lower, torch.lerp(lower, upper, fraction))
    # An empty mask: nothing trains, any finite threshold will do (the +inf sentinels are not one).
    return torch.where(count > 0, threshold, torch.zeros((), dtype=dtype, device=entropy.device))


def _kl_terms(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """k1 = x, k2 = x²/2 of x = logps - ref_logps, unclamped (no exp in them); k3 = e^(-d) + d - 1
    with d = clamp(x, ±20), the one estimator whose exp needs the guard."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = torch.clamp(log_ratio, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(-log_ratio) + log_ratio - 1.0


def is_log_bounds(is_clip_min: float | None, is_clip_max: float | None) -> tuple[float, float]:
    """log of the IS weight bounds, None (or a 0 lower bound) = open: -inf / +inf. The kernels
    receive these two floats, so both backends compare against the same numbers."""
    return (-math.inf if not is_clip_min else math.log(is_clip_min),
            math.inf if is_clip_max is None else math.log(is_clip_max))


def rollout_is_weight(log_weight: torch.Tensor, is_correction: str, is_clip_min: float | None,
                      is_clip_max: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, truncated-or-masked) from log w (clamped to ±20 first, verl's safety bound): "*_truncate"
    clips w to [is_clip_min, is_clip_max] (TIS), "*_mask" zeroes it outside (MIS / IcePop). None
    bounds are open. Compared in log space, so no bound overflows."""
    lw = torch.clamp(log_weight, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    low, high = is_log_bounds(is_clip_min, is_clip_max)
    outside = (lw < low) | (lw > high)
    if is_correction.endswith("truncate"):
        return torch.exp(torch.clamp(lw, low, high)), outside
    return torch.where(outside, torch.zeros((), dtype=lw.dtype, device=lw.device), torch.exp(lw)), outside


# ----------------------------------------------------------------------------- public twins
def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k1") -> torch.Tensor:
    """The PyTorch twin of `fastrlhf.kl_penalty`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    estimator = KL_ESTIMATOR_ALIASES[estimator]
    dtype = compute_dtype(logps, ref_logps)
    kl = _kl_terms(logps.to(dtype), ref_logps.to(dtype), estimator)
    return kl.to(torch.promote_types(logps.dtype, ref_logps.dtype))


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "ppo",
    ratio_level: str = "token",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    rollout_logps: torch.Tensor | None = None,
    is_correction: str | None = None,
    is_clip_min: float | None = None,
    is_clip_max: float | None = 2.0,
    top_entropy_quantile: float = 1.0,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    kl_agg: str | None = None,
    entropy_agg: str | None = None,
    total_tokens: Total = None,
    total_sequences: Total = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.ppo_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    estimator = KL_ESTIMATOR_ALIASES[kl_estimator]
    is_correction = None if is_correction is None else IS_CORRECTION_ALIASES[is_correction]
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    low, high = 1.0 - clip_eps, 1.0 + clip_eps_high
    mask_f = mask.to(torch.float32)
    dtype = compute_dtype(logps, old_logps, advantages, ref_logps, entropy, rollout_logps)
    counts = mask_f != 0
    m = mask_f.to(dtype)
    if advantages.dim() == 1:  # one advantage per sequence
        advantages = advantages[:, None].expand(m.shape)
    logps = _counted(logps, counts, dtype)
    old_logps = _counted(old_logps.detach(), counts, dtype)
    advantages = _counted(advantages.detach(), counts, dtype)
    totals = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)

    token_log_ratio = torch.clamp(logps - old_logps, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if ratio_level == "sequence":
        # GSPO-token (Zheng et al. 2025, sec. 4.3): value s_b, d s / d logps_t = s_b
        raw = logps - logps.detach() + sequence_log_ratio(logps, old_logps, m).to(dtype)[:, None]
        log_ratio = torch.clamp(raw, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    else:
        log_ratio = token_log_ratio
    ratio = torch.exp(log_ratio)

    metrics = {}
    if loss_type == "ppo":
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, low, high)
        pg = torch.maximum(unclipped, clipped)
        metrics["clipfrac"] = masked_mean((clipped > unclipped).to(dtype), m)
        if dual_clip is not None:
            bound = -advantages * dual_clip
            dual_active = (advantages < 0) & (pg > bound)
            pg = torch.where(advantages < 0, torch.minimum(pg, bound), pg)
            metrics["dual_clipfrac"] = masked_mean(dual_active.to(dtype), m)
    elif loss_type == "cispo":
        weight = torch.clamp(ratio, low, high).detach()
        pg = -weight * advantages * logps
        metrics["clipfrac"] = masked_mean(((ratio < low) | (ratio > high)).to(dtype), m)
    else:  # sapo
        tau = torch.where(advantages > 0, sapo_tau_pos, sapo_tau_neg).to(dtype)
        pg = -(4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0)) * advantages
        metrics["clipfrac"] = torch.zeros((), dtype=dtype, device=m.device)

    multiplier = torch.ones_like(m)
    if is_correction is not None:
        if is_correction.startswith("sequence"):
            log_weight = rollout_log_weight(old_logps, rollout_logps, m).to(dtype)[:, None].expand(m.shape)
        else:
            log_weight = old_logps - _counted(rollout_logps.detach(), counts, dtype)
        weight, touched = rollout_is_weight(log_weight, is_correction, is_clip_min, is_clip_max)
        multiplier = multiplier * weight
        metrics["is_weight_mean"] = masked_mean(weight, m)
        metrics["is_clipfrac"] = masked_mean(touched.to(dtype), m)
    if entropy is not None:
        entropy = _counted(entropy, counts, dtype)
    if top_entropy_quantile < 1.0:
        kept = ~(entropy.detach() < entropy_threshold(entropy, m, top_entropy_quantile))  # NaN counts as kept
        multiplier = multiplier * kept.to(dtype)
        metrics["entropy_kept_frac"] = masked_mean(kept.to(dtype), m)
    pg = pg * multiplier

    loss = aggregate(pg, m, loss_agg, **totals)
    metrics["pg_loss"] = loss
    if ref_logps is not None:
        kl = _kl_terms(logps, _counted(ref_logps, counts, dtype), estimator)
        loss = loss + kl_coef * aggregate(kl, m, kl_agg or loss_agg, **totals)
        metrics["kl"] = masked_mean(kl, m)
    if entropy is not None:
        loss = loss - entropy_coef * aggregate(entropy, m, entropy_agg or loss_agg, **totals)
        metrics["entropy"] = masked_mean(entropy, m)
    metrics["approx_kl"] = masked_mean(0.5 * token_log_ratio.square(), m)
    metrics["ratio_mean"] = masked_mean(ratio, m)
    return loss, {name: value.detach() for name, value in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
    total_tokens: Total = None,
    total_sequences: Total = None,
    norm_length: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.value_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    mask_f = mask.to(torch.float32)
    dtype = compute_dtype(values, old_values, returns)
    counts = mask_f != 0
    m = mask_f.to(dtype)
    values = _counted(values, counts, dtype)
    old_values = _counted(old_values.detach(), counts, dtype)
    returns = _counted(returns.detach(), counts, dtype)

    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    sq_err = (values - returns).square()
    sq_err_clipped = (values_clipped - returns).square()
    per_token = 0.5 * torch.maximum(sq_err, sq_err_clipped)
    loss = aggregate(per_token, m, loss_agg, total_tokens=total_tokens, total_sequences=total_sequences,
                     norm_length=norm_length)
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": masked_mean((sq_err_clipped > sq_err).to(dtype), m),
        "vpred": masked_mean(values, m),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}
