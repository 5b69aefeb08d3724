"""PPO-family losses in plain PyTorch: KL estimators, the clipped policy objective, the clipped value loss.

This is the ground truth the Triton kernels (`kernels/ppo.py`, `kernels/kl.py`) are tested against,
and the path used off-GPU. The public functions in `fastrlhf.losses.ppo` check the arguments
(`fastrlhf._checks`) before they call these; called directly, these trust their inputs.

Conventions: log-ratios are clamped to [-20, 20] before `exp`; tokens with mask 0 are
zeroed before any arithmetic, so NaN/inf padding never reaches the loss or the gradients; a fully
masked row or an all-zero mask gives loss 0 and zero gradients. `old_logps`, `advantages`,
`old_values` and `returns` are treated as constants (detached), as in every PPO implementation.
"""
from __future__ import annotations

import torch

from fastrlhf._dtypes import compute_dtype
from fastrlhf.contracts import KL_ESTIMATOR_ALIASES, LOG_RATIO_LIMIT, LOSS_AGGS


# ----------------------------------------------------------------------------- helpers
def _counted(x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` with the tokens that do not count set to 0 (padding may hold NaN/inf)."""
    return torch.where(counts, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask), and 0 when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Reduce a [B, T] per-token loss (already 0 where mask is 0) to a scalar as `loss_agg` says."""
    masked = per_token * mask
    if loss_agg == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(-1)
        seq_means = masked.sum(-1) / tokens_per_seq.clamp(min=1)
        seqs_with_tokens = (tokens_per_seq > 0).sum().clamp(min=1)
        return seq_means.sum() / seqs_with_tokens
    if loss_agg == "seq-mean-token-sum-norm":
        return masked.sum() / max(mask.numel(), 1)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


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
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.ppo_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    estimator = KL_ESTIMATOR_ALIASES[kl_estimator]
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_f = mask.to(torch.float32)
    dtype = compute_dtype(logps, old_logps, advantages, ref_logps, entropy)
    counts = mask_f != 0
    m = mask_f.to(dtype)
    logps = _counted(logps, counts, dtype)
    old_logps = _counted(old_logps.detach(), counts, dtype)
    advantages = _counted(advantages.detach(), counts, dtype)

    log_ratio = torch.clamp(logps - old_logps, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high)
    pg = torch.maximum(unclipped, clipped)
    metrics = {"clipfrac": masked_mean((clipped > unclipped).to(dtype), m)}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_active = (advantages < 0) & (pg > bound)
        pg = torch.where(advantages < 0, torch.minimum(pg, bound), pg)
        metrics["dual_clipfrac"] = masked_mean(dual_active.to(dtype), m)

    per_token = pg
    if ref_logps is not None:
        kl = _kl_terms(logps, _counted(ref_logps, counts, dtype), estimator)
        per_token = per_token + kl_coef * kl
        metrics["kl"] = masked_mean(kl, m)
    if entropy is not None:
        entropy = _counted(entropy, counts, dtype)
        per_token = per_token - entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy, m)

    loss = aggregate(per_token, m, loss_agg)
    metrics["pg_loss"] = aggregate(pg, m, loss_agg)
    metrics["approx_kl"] = masked_mean(0.5 * log_ratio.square(), m)
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
    loss = aggregate(per_token, m, loss_agg)
    metrics = {
        "vf_loss": loss,
        "vf_clipfrac": masked_mean((sq_err_clipped > sq_err).to(dtype), m),
        "vpred": masked_mean(values, m),
    }
    return loss, {name: value.detach() for name, value in metrics.items()}
