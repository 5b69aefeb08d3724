"""Public PPO-family losses: `kl_penalty`, `ppo_loss`, `value_loss`.

Each validates its arguments once (`fastrlhf._checks`), then runs either the
fused Triton kernel (wrapped in an autograd.Function here) or the PyTorch twin in
`fastrlhf.twins.ppo`, as `backend` / `fastrlhf._dispatch.resolve_backend` decide.
Both backends compute in fp32 (fp64 for fp64 inputs on the torch path), return an fp32 loss and give
gradients in each input's own dtype.
"""
from __future__ import annotations

import torch

import fastrlhf.twins.ppo as twin
from fastrlhf._checks import check_kl_args, check_ppo_args, check_value_args
from fastrlhf._dispatch import resolve_backend
from fastrlhf.contracts import PPO_STATS, VALUE_STATS
from fastrlhf.losses._autograd import first_order_only

# Where each metric shows up in TRL's PPOTrainer logs (TRL averages them over minibatches, hence
# "_avg"); trainers can log `{TRL_METRIC_NAMES.get(k, k): v}` so dashboards carry over.
TRL_METRIC_NAMES = {
    "pg_loss": "loss/policy_avg",
    "clipfrac": "policy/clipfrac_avg",
    "approx_kl": "policy/approxkl_avg",
    "entropy": "policy/entropy_avg",
    "ratio_mean": "val/ratio",
    "vf_loss": "loss/value_avg",
    "vf_clipfrac": "val/clipfrac_avg",
}


def aggregation_row_scale(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-sequence weight s_b such that `aggregate(l, mask, loss_agg) == Σ_bt mask_bt · s_b · l_bt`.

    `mask` is fp32 `[B, T]`; returns fp32 `[B]`. Torch ops only (no host sync); empty masks give 0.
    """
    B, T = mask.shape
    if loss_agg == "token-mean":
        return (1.0 / mask.sum().clamp(min=1)).expand(B)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(-1)
        seqs_with_tokens = (tokens_per_seq > 0).sum().clamp(min=1)
        return 1.0 / (tokens_per_seq.clamp(min=1) * seqs_with_tokens)
    if loss_agg == "seq-mean-token-sum-norm":
        return mask.new_full((B,), 1.0 / max(B * T, 1))
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def _wants_grad(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and torch.is_grad_enabled() and tensor.requires_grad


def _scaled(grad_output: torch.Tensor, coefficient: torch.Tensor | None, dtype: torch.dtype | None):
    """d loss / d input = grad_output · (coefficient saved by the forward kernel), in the input dtype."""
    if coefficient is None:
        return None
    return (coefficient * grad_output).to(dtype)


# ----------------------------------------------------------------------------- kl_penalty
class _KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, ref_logps, estimator, need_grad):
        from fastrlhf.kernels.kl import kl_penalty_forward

        out_dtype = torch.promote_types(logps.dtype, ref_logps.dtype)
        kl, dkl = kl_penalty_forward(logps, ref_logps, estimator=estimator, out_dtype=out_dtype, need_grad=need_grad)
        ctx.save_for_backward(dkl)
        ctx.dtypes = (logps.dtype, ref_logps.dtype)
        return kl

    @staticmethod
    @first_order_only("kl_penalty")
    def backward(ctx, grad_kl):
        (dkl,) = ctx.saved_tensors
        grad = dkl * grad_kl.float()
        grad_logps = grad.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_ref = (-grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_logps, grad_ref, None, None


def kl_penalty(
    logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k1", backend: str = "auto"
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logps: policy log-probs, any shape (typically `[B, T]`).
        ref_logps: reference log-probs, same shape.
        estimator: with x = logps - ref_logps: "k1" x, "k2" x²/2 (both unclamped, as TRL and
            verl), "k3" exp(-d) + d - 1 with d = clamp(x, -20, 20) (its exp needs the guard; zero
            gradient beyond ±20). verl's names "kl", "mse", "low_var_kl" are accepted as aliases.
            (Unlike verl/OpenRLHF we do not clamp the KL value itself to ±10.)
        backend: "auto" | "triton" | "torch".

    Returns:
        KL per token, same shape, dtype of `logps` promoted with `ref_logps` (computed in fp32).
        Differentiable w.r.t. `logps` and `ref_logps`.
    """
    estimator = check_kl_args(logps, ref_logps, estimator)
    if resolve_backend(backend, logps, ref_logps) == "torch":
        return twin.kl_penalty(logps, ref_logps, estimator=estimator)
    need_grad = _wants_grad(logps) or _wants_grad(ref_logps)
    return _KLPenaltyFunction.apply(logps, ref_logps, estimator, need_grad)


# ----------------------------------------------------------------------------- ppo_loss
class _PPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, entropy, row_scale, options):
        from fastrlhf.kernels.ppo import ppo_loss_forward

        loss, stats, d_logps, d_ref, d_ent = ppo_loss_forward(
            logps, old_logps, advantages, mask, ref_logps, entropy, row_scale, **options,
        )
        ctx.save_for_backward(d_logps, d_ref, d_ent)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (logps, ref_logps, entropy))
        ctx.mark_non_differentiable(stats)
        return loss.clone(), stats  # a view of stats cannot be a differentiable output

    @staticmethod
    @first_order_only("ppo_loss")
    def backward(ctx, grad_loss, _grad_stats):
        d_logps, d_ref, d_ent = ctx.saved_tensors
        grad_loss = grad_loss.float()
        grad_logps, grad_ref, grad_ent = (_scaled(grad_loss, d, dtype) for d, dtype in zip((d_logps, d_ref, d_ent), ctx.dtypes))
        return grad_logps, None, None, None, grad_ref, grad_ent, None, None


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
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO policy loss with token-level advantages, optional KL-to-reference and entropy terms,
    fused into one Triton kernel (loss, gradients and metrics in one pass).

    Per token: ratio = exp(clamp(logps - old_logps, -20, 20));
    pg = max(-A·ratio, -A·clip(ratio, 1 - clip_eps, 1 + clip_eps_high)); with dual_clip c and A < 0,
    pg = min(pg, -A·c); loss_t = pg + kl_coef·KL(logps, ref_logps) - entropy_coef·entropy.

    Args:
        logps: `[B, T]` current policy log-probs (differentiable).
        old_logps, advantages: `[B, T]` rollout log-probs and token-level advantages (constants).
        mask: `[B, T]` bool/int/float, tokens that count.
        clip_eps: > 0. clip_eps_high: upper clip (> 0), defaults to clip_eps ("clip-higher").
        dual_clip: c > 1 or None.
        ref_logps: `[B, T]` reference log-probs, needed when kl_coef > 0 (gradient if it requires grad).
        kl_coef: ≥ 0. kl_estimator: "k1" | "k2" | "k3" (or "kl" | "mse" | "low_var_kl").
        entropy: `[B, T]` per-token entropy (differentiable), needed when entropy_coef > 0.
        entropy_coef: ≥ 0.
        loss_agg: "token-mean" (Σ mask·l / Σ mask), "seq-mean-token-mean" (mean over sequences with
            ≥ 1 counted token of their token means), "seq-mean-token-sum-norm" (Σ mask·l / (B·T)).
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)`: fp32 scalar loss and detached fp32 scalars `pg_loss` (policy term alone,
        aggregated like the loss), `clipfrac`, `approx_kl` (mean ½·clamped log_ratio²), `ratio_mean`,
        plus `kl` (with ref_logps), `entropy` (with entropy) and `dual_clipfrac` (with dual_clip);
        all but `pg_loss` are means over counted tokens. An empty mask gives 0 everywhere.
    """
    estimator, clip_eps_high, mask_f = check_ppo_args(
        logps, old_logps, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy=entropy, entropy_coef=entropy_coef, loss_agg=loss_agg,
    )
    if resolve_backend(backend, logps, old_logps, advantages, ref_logps, entropy) == "torch":
        return twin.ppo_loss(
            logps, old_logps, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
            dual_clip=dual_clip, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=estimator,
            entropy=entropy, entropy_coef=entropy_coef, loss_agg=loss_agg,
        )
    options = dict(
        clip_low=1.0 - clip_eps, clip_high=1.0 + clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef,
        kl_estimator=estimator, entropy_coef=entropy_coef, grad_logps=_wants_grad(logps),
        grad_ref=_wants_grad(ref_logps), grad_entropy=_wants_grad(entropy),
    )
    row_scale = aggregation_row_scale(mask_f, loss_agg)
    loss, stats = _PPOLossFunction.apply(
        logps, old_logps.detach(), advantages.detach(), mask_f, ref_logps, entropy, row_scale, options,
    )
    sums = dict(zip(PPO_STATS, stats.unbind()))
    counted = mask_f.sum().clamp(min=1)
    metrics = {"clipfrac": sums["clipped"] / counted}
    if dual_clip is not None:
        metrics["dual_clipfrac"] = sums["dual_clipped"] / counted
    if ref_logps is not None:
        metrics["kl"] = sums["kl"] / counted
    if entropy is not None:
        metrics["entropy"] = sums["entropy"] / counted
    metrics["pg_loss"] = sums["pg_loss"]
    metrics["approx_kl"] = sums["approx_kl"] / counted
    metrics["ratio_mean"] = sums["ratio"] / counted
    return loss, metrics


# ----------------------------------------------------------------------------- value_loss
class _ValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, row_scale, clip_eps, need_grad):
        from fastrlhf.kernels.ppo import value_loss_forward

        loss, stats, d_values = value_loss_forward(
            values, old_values, returns, mask, row_scale, clip_eps=clip_eps, grad_values=need_grad,
        )
        ctx.save_for_backward(d_values)
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(stats)
        return loss.clone(), stats  # a view of stats cannot be a differentiable output

    @staticmethod
    @first_order_only("value_loss")
    def backward(ctx, grad_loss, _grad_stats):
        (d_values,) = ctx.saved_tensors
        grad = None if d_values is None else (d_values * grad_loss.float()).to(ctx.values_dtype)
        return grad, None, None, None, None, None, None


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: per token 0.5 · max((v − R)², (old_v + clip(v − old_v, −eps, eps) − R)²).

    Args:
        values: `[B, T]` current value predictions (gradients flow here only).
        old_values: `[B, T]` values at rollout time; returns: `[B, T]` targets (constants).
        mask: `[B, T]` tokens that count.
        clip_eps: value clip range (> 0; `math.inf` disables clipping).
        loss_agg: as in `ppo_loss`.
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)`: fp32 scalar loss; detached `vf_loss` (= loss), `vf_clipfrac` (fraction of
        counted tokens where the clipped error is the larger one), `vpred` (mean counted value).
    """
    mask_f = check_value_args(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg)
    if resolve_backend(backend, values, old_values, returns) == "torch":
        return twin.value_loss(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg)
    row_scale = aggregation_row_scale(mask_f, loss_agg)
    loss, stats = _ValueLossFunction.apply(
        values, old_values.detach(), returns.detach(), mask_f, row_scale, float(clip_eps), _wants_grad(values),
    )
    sums = dict(zip(VALUE_STATS, stats.unbind()))
    counted = mask_f.sum().clamp(min=1)
    metrics = {"vf_loss": loss.detach(), "vf_clipfrac": sums["clipped"] / counted, "vpred": sums["values"] / counted}
    return loss, metrics
