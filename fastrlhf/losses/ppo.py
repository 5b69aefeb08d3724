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
from fastrlhf.twins.ppo import Total, aggregation_row_scale

__all__ = ["kl_penalty", "ppo_loss", "value_loss", "policy_constants", "ppo_metrics", "aggregation_row_scale"]

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
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, constants, options):
        from fastrlhf.kernels.ppo import ppo_loss_forward

        loss, stats, d_logps, d_ref, d_ent = ppo_loss_forward(
            logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, **constants, **options,
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
        return grad_logps, None, None, None, grad_ref, grad_ent, None, None, None


def policy_constants(
    mask_f: torch.Tensor,
    *,
    logps: torch.Tensor | None,
    old_logps: torch.Tensor | None,
    entropy: torch.Tensor | None,
    rollout_logps: torch.Tensor | None,
    has_ref: bool,
    has_entropy: bool,
    ratio_level: str,
    is_correction: str | None,
    top_entropy_quantile: float,
    loss_agg: str,
    kl_agg: str | None,
    entropy_agg: str | None,
    totals: dict,
) -> dict[str, torch.Tensor | tuple | None]:
    """The per-row / per-batch constants the kernels take for these options, from the twin's helpers
    (one definition for both backends), as keyword arguments of `kernels.ppo.ppo_loss_forward`:
    row_scales, seq_log_ratio (GSPO), seq_is_log_weight (sequence-level IS), entropy_threshold.
    Torch ops only, and none at all for plain PPO beyond its one row scale."""
    row_scale = aggregation_row_scale(mask_f, loss_agg, **totals)
    kl_scale = ent_scale = None
    if has_ref and kl_agg not in (None, loss_agg):
        kl_scale = aggregation_row_scale(mask_f, kl_agg, **totals)
    if has_entropy and entropy_agg not in (None, loss_agg):
        ent_scale = aggregation_row_scale(mask_f, entropy_agg, **totals)
    if (kl_scale is None) != (ent_scale is None):  # the kernel splits both or neither
        kl_scale = row_scale if kl_scale is None else kl_scale
        ent_scale = row_scale if ent_scale is None else ent_scale
    constants = {"row_scales": (row_scale, kl_scale, ent_scale)}
    if ratio_level == "sequence" and logps is not None:
        constants["seq_log_ratio"] = twin.sequence_log_ratio(logps, old_logps, mask_f).float()
    if is_correction is not None and is_correction.startswith("sequence"):
        constants["seq_is_log_weight"] = twin.rollout_log_weight(old_logps, rollout_logps, mask_f).float()
    if top_entropy_quantile < 1.0:
        constants["entropy_threshold"] = twin.entropy_threshold(entropy, mask_f, top_entropy_quantile).float()
    return constants


def ppo_metrics(stats: torch.Tensor, counted: torch.Tensor, *, dual_clip, has_ref: bool, has_entropy: bool,
                is_correction, top_entropy_quantile: float) -> dict[str, torch.Tensor]:
    """The metrics dict of `ppo_loss` / `policy_loss_from_hidden` from the kernels' PPO_STATS sums."""
    sums = dict(zip(PPO_STATS, stats.unbind()))
    metrics = {"clipfrac": sums["clipped"] / counted}
    if dual_clip is not None:
        metrics["dual_clipfrac"] = sums["dual_clipped"] / counted
    if is_correction is not None:
        metrics["is_weight_mean"] = sums["is_weight"] / counted
        metrics["is_clipfrac"] = sums["is_clipped"] / counted
    if top_entropy_quantile < 1.0:
        metrics["entropy_kept_frac"] = sums["entropy_kept"] / counted
    metrics["pg_loss"] = sums["pg_loss"]
    if has_ref:
        metrics["kl"] = sums["kl"] / counted
    if has_entropy:
        metrics["entropy"] = sums["entropy"] / counted
    metrics["approx_kl"] = sums["approx_kl"] / counted
    metrics["ratio_mean"] = sums["ratio"] / counted
    return metrics


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
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of the PPO family with KL-to-reference and entropy terms, fused into one
    Triton kernel (loss, gradients and metrics in one pass; every option a compile-time branch).

    Per token t of sequence b (A = advantage, r = importance ratio, x̄ = x treated as a constant):

        log r = clamp(logps - old_logps, ±20)                             ratio_level="token"
        log r = clamp(mean_t(logps - old_logps), ±20) as a value, d r / d logps_t = r
                                                                          ratio_level="sequence" (GSPO)
        pg = max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high))       loss_type="ppo"
             (dual_clip c, A < 0: min(pg, -A c))
        pg = -clip(r, 1 - clip_eps, 1 + clip_eps_high)̄ · A · logps        loss_type="cispo"
        pg = -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_tau_pos if A > 0 else sapo_tau_neg
                                                                          loss_type="sapo"
        loss = agg(g · pg) + kl_coef · agg_kl(KL(logps, ref_logps)) - entropy_coef · agg_ent(entropy)

    g = (rollout IS weight)̄ · [entropy ranks in the top quantile]̄ (1 without those options).

    Sources (equation numbers where we could check them offline, else the section): PPO: Schulman
    et al. 2017, eq. 7 (L^CLIP); clip-higher: DAPO (Yu et al. 2025, sec. 3.1); dual clip: Ye et al.
    2020 ("Mastering Complex Control in MOBA Games", sec. 3). GSPO: Zheng et al. 2025 ("Group
    Sequence Policy Optimization"), the GSPO objective (sec. 4.1) and its GSPO-token form
    (sec. 4.3; identical to GSPO for per-sequence advantages); equals
    verl's policy_loss "gspo" and TRL's importance_sampling_level="sequence". CISPO: MiniMax-M1
    (2025, sec. 3.1), two-sided clip as verl's "cispo" (TRL's cispo clips above only, at
    epsilon_high = E: clip_eps=1.0, clip_eps_high=E - 1 here). SAPO: Gao et al. 2025 ("Soft
    Adaptive Policy Optimization"), the gate f(r) = (4 / tau) sigmoid(tau (r - 1)), as TRL's and
    verl's "sapo" (defaults tau_pos 1.0, tau_neg 1.05 are TRL's). TIS / MIS: Yao et al. 2025 ("Your
    efficient RL framework secretly brings you off-policy RL training"): w = pi_old / pi_rollout per
    token, or per sequence (the product over its tokens), truncated to [is_clip_min, is_clip_max]
    ("*_truncate") or zeroed outside ("*_mask", IcePop); TRL's vllm_importance_sampling_mode names,
    verl's rollout_is="token" / "sequence" with rollout_is_threshold. High-entropy tokens: Wang et
    al. 2025 ("Beyond the 80/20 Rule"), TRL's top_entropy_quantile: only tokens whose entropy is at or
    above the (1 - rho) quantile of this call's counted tokens train the policy term.

    Args:
        logps: `[B, T]` current policy log-probs (differentiable).
        old_logps: `[B, T]` log-probs of the policy that sampled (the trainer's recomputation).
        advantages: `[B, T]` per token, or `[B]` per sequence (GRPO, RLOO: broadcast over its tokens).
        mask: `[B, T]` bool/int/float, tokens that count.
        loss_type: "ppo" | "cispo" | "sapo". ratio_level: "token" | "sequence" (GSPO).
        clip_eps: > 0. clip_eps_high: upper clip (> 0), defaults to clip_eps ("clip-higher").
        dual_clip: c > 1 or None (loss_type="ppo" only).
        sapo_tau_pos, sapo_tau_neg: SAPO's gate temperatures (> 0) for A > 0 and A <= 0.
        rollout_logps: `[B, T]` log-probs the rollout engine reported for the sampled tokens; needed
            by (and only by) is_correction.
        is_correction: None | "token_truncate" (TIS; alias "tis") | "token_mask" (alias "icepop") |
            "sequence_truncate" | "sequence_mask". is_clip_min, is_clip_max: the weight's bounds
            (None = open; default [None, 2.0], verl's rollout_is_threshold).
        top_entropy_quantile: rho in [0, 1]; 1.0 = every token trains (needs `entropy` when < 1).
        ref_logps: `[B, T]` reference log-probs, needed when kl_coef > 0 (gradient if it requires grad).
        kl_coef: ≥ 0. kl_estimator: "k1" | "k2" | "k3" (or "kl" | "mse" | "low_var_kl"), see `kl_penalty`.
        entropy: `[B, T]` per-token entropy (differentiable); entropy_coef: ≥ 0.
        loss_agg: "token-mean" (Σ mask·l / N), "seq-mean-token-mean" (Σ_b mean_t l / S),
            "seq-mean-token-sum-norm" (Σ mask·l / (S·L)); N = counted tokens, S = sequences with at
            least one counted token (fully masked rows never count: verl, OpenRLHF), L = T.
        kl_agg, entropy_agg: their own aggregation for the KL and entropy terms (None = loss_agg).
            OpenRLHF token-means both; TRL aggregates the KL like the policy term and token-means
            its entropy bonus; verl uses loss_agg for both.
        total_tokens, total_sequences, norm_length: N, S and L of the WHOLE batch an optimizer step
            averages over (micro-batches x ranks: verl's batch_num_tokens / global_batch_size /
            loss_scale_factor, TRL's num_items_in_batch), so that per-micro-batch losses add up to
            the full-batch loss exactly. None = this call's. A number, or a one-element tensor (no
            host sync). TRL's "grpo" = seq-mean-token-mean with total_sequences = B (it counts
            empty rows), "dr_grpo" = seq-mean-token-sum-norm with total_sequences = B,
            norm_length = max_completion_length, "dapo" = token-mean with total_tokens.
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)`: fp32 scalar loss and detached fp32 scalars `pg_loss` (the policy term,
        aggregated), `clipfrac` (fraction of counted tokens clipped; 0 for sapo), `approx_kl` (mean
        ½·clamped per-token log_ratio²), `ratio_mean` (mean r), plus `kl` (with ref_logps), `entropy`
        (with entropy), `dual_clipfrac` (with dual_clip), `is_weight_mean` and `is_clipfrac` (with
        is_correction), `entropy_kept_frac` (with top_entropy_quantile < 1); all but `pg_loss` means
        over counted tokens. An empty mask gives 0 everywhere.
    """
    args = check_ppo_args(
        logps, old_logps, advantages, mask, loss_type=loss_type, ratio_level=ratio_level, clip_eps=clip_eps,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg,
        rollout_logps=rollout_logps, is_correction=is_correction, is_clip_min=is_clip_min, is_clip_max=is_clip_max,
        top_entropy_quantile=top_entropy_quantile, ref_logps=ref_logps, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy=entropy, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg,
        entropy_agg=entropy_agg, total_tokens=total_tokens, total_sequences=total_sequences,
        norm_length=norm_length,
    )
    totals = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    if resolve_backend(backend, logps, old_logps, advantages, ref_logps, entropy, rollout_logps) == "torch":
        return twin.ppo_loss(
            logps, old_logps, advantages, mask, loss_type=loss_type, ratio_level=ratio_level, clip_eps=clip_eps,
            clip_eps_high=args.clip_eps_high, dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos,
            sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps, is_correction=args.is_correction,
            is_clip_min=is_clip_min, is_clip_max=is_clip_max, top_entropy_quantile=top_entropy_quantile,
            ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=args.kl_estimator, entropy=entropy,
            entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg, entropy_agg=entropy_agg, **totals,
        )
    mask_f = args.mask
    constants = policy_constants(
        mask_f, logps=logps, old_logps=old_logps, entropy=entropy, rollout_logps=rollout_logps,
        has_ref=ref_logps is not None, has_entropy=entropy is not None, ratio_level=ratio_level,
        is_correction=args.is_correction,
        top_entropy_quantile=top_entropy_quantile, loss_agg=loss_agg, kl_agg=kl_agg, entropy_agg=entropy_agg,
        totals=totals,
    )
    options = dict(
        loss_type=loss_type, clip_low=1.0 - clip_eps, clip_high=1.0 + args.clip_eps_high, dual_clip=dual_clip,
        kl_coef=kl_coef, kl_estimator=args.kl_estimator, entropy_coef=entropy_coef, sapo_tau_pos=sapo_tau_pos,
        sapo_tau_neg=sapo_tau_neg, is_correction=args.is_correction,
        is_log_bounds=twin.is_log_bounds(is_clip_min, is_clip_max), grad_logps=_wants_grad(logps),
        grad_ref=_wants_grad(ref_logps), grad_entropy=_wants_grad(entropy),
    )
    loss, stats = _PPOLossFunction.apply(
        logps, old_logps.detach(), advantages.detach(), mask_f, ref_logps, entropy,
        None if rollout_logps is None else rollout_logps.detach(), constants, options,
    )
    metrics = ppo_metrics(stats, mask_f.sum().clamp(min=1), dual_clip=dual_clip, has_ref=ref_logps is not None,
                          has_entropy=entropy is not None, is_correction=args.is_correction,
                          top_entropy_quantile=top_entropy_quantile)
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
    total_tokens: Total = None,
    total_sequences: Total = None,
    norm_length: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: per token 0.5 · max((v − R)², (old_v + clip(v − old_v, −eps, eps) − R)²).

    Args:
        values: `[B, T]` current value predictions (gradients flow here only).
        old_values: `[B, T]` values at rollout time; returns: `[B, T]` targets (constants).
        mask: `[B, T]` tokens that count.
        clip_eps: value clip range (> 0; `math.inf` disables clipping).
        loss_agg, total_tokens, total_sequences, norm_length: as in `ppo_loss`.
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)`: fp32 scalar loss; detached `vf_loss` (= loss), `vf_clipfrac` (fraction of
        counted tokens where the clipped error is the larger one), `vpred` (mean counted value).
    """
    totals = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    mask_f = check_value_args(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg, **totals)
    if resolve_backend(backend, values, old_values, returns) == "torch":
        return twin.value_loss(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg, **totals)
    row_scale = aggregation_row_scale(mask_f, loss_agg, **totals)
    loss, stats = _ValueLossFunction.apply(
        values, old_values.detach(), returns.detach(), mask_f, row_scale, float(clip_eps), _wants_grad(values),
    )
    sums = dict(zip(VALUE_STATS, stats.unbind()))
    counted = mask_f.sum().clamp(min=1)
    metrics = {"vf_loss": loss.detach(), "vf_clipfrac": sums["clipped"] / counted, "vpred": sums["values"] / counted}
    return loss, metrics
