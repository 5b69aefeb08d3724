"""Public PPO-family losses: `kl_penalty`, `ppo_loss`, `value_loss`.

Each validates its arguments (`fastrlhf._checks`), then runs either the
Triton kernels (wrapped in an autograd.Function here) or the PyTorch twin in
`fastrlhf.twins.ppo`, as `backend` / `fastrlhf._dispatch.resolve_backend` decide.
Both backends compute in fp32 (fp64 for fp64 inputs on the torch path), return an fp32 loss and give
gradients in each input's own dtype.

The Triton path of a call is launches and nothing else (`kernels/ppo.py`, `kernels/aggregate.py`):
`ppo_loss` / `value_loss` forward = the loss kernel + the finalize kernel (loss, metrics and
aggregation weights, no torch op: no mask cast, no `aggregation_row_scale`, no metric division),
backward = one kernel that recomputes the token terms; `kl_penalty` one kernel each way. What
depends only on the options and shapes (checks, kernel constexprs, metric names) is computed once
per signature (`fastrlhf._checks.once_per_signature`). `top_entropy_quantile < 1` still takes its
entropy quantile with torch ops (a sort: it depends on the values).
"""
from __future__ import annotations

import torch

import fastrlhf.twins.ppo as twin
from fastrlhf._checks import check_kl_args, check_ppo_args, check_value_args, once_per_signature
from fastrlhf._dispatch import resolve_backend
from fastrlhf.contracts import PPO_PARTIALS, PPO_STATS, VALUE_PARTIALS
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


# ----------------------------------------------------------------------------- kl_penalty
class _KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, ref_logps, estimator):
        from fastrlhf.kernels.kl import kl_penalty_forward

        logps, ref_logps = logps.contiguous(), ref_logps.contiguous()
        ctx.save_for_backward(logps, ref_logps)
        ctx.estimator = estimator
        return kl_penalty_forward(logps, ref_logps, estimator=estimator,
                                  out_dtype=torch.promote_types(logps.dtype, ref_logps.dtype))

    @staticmethod
    @first_order_only("kl_penalty")
    def backward(ctx, grad_kl):
        from fastrlhf.kernels.kl import kl_penalty_backward

        logps, ref_logps = ctx.saved_tensors
        grad_logps, grad_ref = kl_penalty_backward(logps, ref_logps, grad_kl, estimator=ctx.estimator,
                                                   need=tuple(ctx.needs_input_grad[:2]))
        return grad_logps, grad_ref, None


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
    return _KLPenaltyFunction.apply(logps, ref_logps, estimator)


# ----------------------------------------------------------------------------- ppo_loss
class _Kernels:
    """The kernel configurations of one call signature, made on first Triton use (the torch path
    never imports triton) and kept per launch-size policy (`kernels._launch.gpu_sizes`: the tests
    and the offline compile checks switch CPU launches to the GPU sizes)."""

    def __init__(self, make):
        self._make, self._made = make, {}

    def __call__(self, device: torch.device):
        from fastrlhf.kernels._launch import gpu_sizes

        key = gpu_sizes(device)
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = self._make(device)
        return made


class _PolicyPlan:
    """What a `ppo_loss` call needs beyond its tensors, fixed by its options and shapes (made once
    per signature, `_policy_plan`): the checked arguments, which metrics it reports (name, column
    of the finalize's output) and `kernels(device)`: the loss kernels' `PPOLaunch` and the
    `Finalize` (aggregations, coefficients, totals)."""

    def __init__(self, args, metrics: tuple, make_kernels):
        self.args, self.metrics, self.kernels = args, metrics, _Kernels(make_kernels)


def _policy_metric_columns(*, dual_clip, has_ref: bool, has_entropy: bool, is_correction,
                           top_entropy_quantile: float) -> tuple[tuple[str, int], ...]:
    """(metric, position in the finalize's output), in the twin's order. The finalize writes the
    aggregated policy term at 0 (pg_loss) and at k >= 1 the mean over counted tokens of the sum in
    column k of `contracts.PPO_PARTIALS`."""
    names = [("clipfrac", "clipped")]
    if dual_clip is not None:
        names.append(("dual_clipfrac", "dual_clipped"))
    if is_correction is not None:
        names += [("is_weight_mean", "is_weight"), ("is_clipfrac", "is_clipped")]
    if top_entropy_quantile < 1.0:
        names.append(("entropy_kept_frac", "entropy_kept"))
    names.append(("pg_loss", None))
    if has_ref:
        names.append(("kl", "kl"))
    if has_entropy:
        names.append(("entropy", "entropy"))
    names += [("approx_kl", "approx_kl"), ("ratio_mean", "ratio")]
    return tuple((metric, 0 if column is None else PPO_PARTIALS.index(column)) for metric, column in names)


def _plain_totals(total_tokens, total_sequences) -> dict:
    """The totals as a plan may keep them: numbers and None as they are, a tensor as the marker
    "tensor" (its value arrives with each call)."""
    return {name: "tensor" if isinstance(value, torch.Tensor) else value
            for name, value in (("total_tokens", total_tokens), ("total_sequences", total_sequences))}


@once_per_signature
def _policy_plan(logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, **options) -> _PolicyPlan:
    args = check_ppo_args(logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy,
                          rollout_logps=rollout_logps, **options)
    o = options
    has_ref, has_entropy = ref_logps is not None, entropy is not None
    (B, T), loss_agg = logps.shape, o["loss_agg"]
    # Plain values only from here on: the plan outlives this call and must not keep its tensors.
    launch_options = dict(
        batch=B, seq_len=T, loss_type=o["loss_type"], clip_low=1.0 - o["clip_eps"],
        clip_high=1.0 + args.clip_eps_high, dual_clip=o["dual_clip"], kl_coef=o["kl_coef"],
        kl_estimator=args.kl_estimator, entropy_coef=o["entropy_coef"], sapo_tau_pos=o["sapo_tau_pos"],
        sapo_tau_neg=o["sapo_tau_neg"], is_correction=args.is_correction,
        is_log_bounds=twin.is_log_bounds(o["is_clip_min"], o["is_clip_max"]),
        seq_ratio=o["ratio_level"] == "sequence", adv_per_row=advantages.dim() == 1,
        select_entropy=o["top_entropy_quantile"] < 1.0, has_ref=has_ref, has_entropy=has_entropy,
    )
    finalize_options = dict(
        batch=B, num_partials=len(PPO_PARTIALS), aggs=(loss_agg, o["kl_agg"] or loss_agg, o["entropy_agg"] or loss_agg),
        # Absent terms get a 0 coefficient (their sums are 0, and 0 * an inf coefficient would be NaN).
        coefs=(1.0, float(o["kl_coef"]) if has_ref else 0.0, -float(o["entropy_coef"]) if has_entropy else 0.0),
        seq_len=T, norm_length=o["norm_length"], **_plain_totals(o["total_tokens"], o["total_sequences"]),
    )

    def make_kernels(device):
        from fastrlhf.kernels.aggregate import Finalize
        from fastrlhf.kernels.ppo import PPOLaunch

        launch = PPOLaunch(device=device, **launch_options)
        return launch, Finalize(chunks=launch.chunks, **finalize_options)

    metrics = _policy_metric_columns(dual_clip=o["dual_clip"], has_ref=has_ref, has_entropy=has_entropy,
                                     is_correction=args.is_correction, top_entropy_quantile=o["top_entropy_quantile"])
    return _PolicyPlan(args, metrics, make_kernels)


class _PPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, threshold, totals,
                kernels):
        from fastrlhf.kernels.ppo import ppo_forward

        launch, finalize = kernels
        inputs = (logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, threshold)
        loss, out, scales = finalize(ppo_forward(*inputs, launch=launch), *totals)
        ctx.save_for_backward(*inputs, scales)
        ctx.launch = launch
        ctx.mark_non_differentiable(out)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (absent) gradient
        return loss, out

    @staticmethod
    @first_order_only("ppo_loss")
    def backward(ctx, grad_loss, _grad_out):
        from fastrlhf.kernels.ppo import ppo_backward

        if grad_loss is None:
            return (None,) * 10
        *inputs, scales = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_logps, grad_ref, grad_entropy = ppo_backward(
            *inputs, scales, grad_loss, launch=ctx.launch, need=(need[0], need[4], need[5]))
        return grad_logps, None, None, None, grad_ref, grad_entropy, None, None, None, None


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


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
    """The per-row / per-batch constants the fused RL head's row kernel takes for these options
    (`policy_loss_from_hidden` / `policy_loss_from_logits` need the aggregation weights BEFORE their
    kernel, which writes the gradient), from the twin's helpers (one definition for both backends):
    row_scales, seq_log_ratio (GSPO), seq_is_log_weight (sequence-level IS), entropy_threshold.
    Torch ops; next to a pass over [N, V] logits they cost nothing measurable."""
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
    """The metrics dict of the fused RL head (`policy_loss_from_hidden` / `_from_logits`) from its
    row kernel's PPO_STATS sums (the names and order of `ppo_loss`'s)."""
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
    plan = _policy_plan(
        logps, old_logps, advantages, mask, ref_logps, entropy, rollout_logps, loss_type=loss_type,
        ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, is_correction=is_correction, is_clip_min=is_clip_min,
        is_clip_max=is_clip_max, top_entropy_quantile=top_entropy_quantile, kl_coef=kl_coef,
        kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg,
        entropy_agg=entropy_agg, total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
    )
    if resolve_backend(backend, logps, old_logps, advantages, ref_logps, entropy, rollout_logps) == "torch":
        args = plan.args
        return twin.ppo_loss(
            logps, old_logps, advantages, mask, loss_type=loss_type, ratio_level=ratio_level, clip_eps=clip_eps,
            clip_eps_high=args.clip_eps_high, dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos,
            sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps, is_correction=args.is_correction,
            is_clip_min=is_clip_min, is_clip_max=is_clip_max, top_entropy_quantile=top_entropy_quantile,
            ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=args.kl_estimator, entropy=entropy,
            entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg, entropy_agg=entropy_agg,
            total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
        )
    threshold = None
    if top_entropy_quantile < 1.0:  # a quantile of the values: torch ops (a sort), see the module docstring
        threshold = twin.entropy_threshold(entropy, mask, top_entropy_quantile).float()
    loss, out = _PPOLossFunction.apply(
        logps.contiguous(), old_logps.contiguous(), advantages.contiguous(), mask.contiguous(),
        _contiguous(ref_logps), _contiguous(entropy), _contiguous(rollout_logps), threshold,
        (total_tokens, total_sequences), plan.kernels(logps.device),
    )
    values = out.unbind()
    return loss, {name: values[column] for name, column in plan.metrics}


# ----------------------------------------------------------------------------- value_loss
class _ValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, totals, kernels):
        from fastrlhf.kernels.ppo import value_forward

        launch, finalize = kernels
        loss, out, scales = finalize(value_forward(values, old_values, returns, mask, launch=launch), *totals)
        ctx.save_for_backward(values, old_values, returns, mask, scales)
        ctx.launch = launch
        ctx.mark_non_differentiable(out)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (absent) gradient
        return loss, out

    @staticmethod
    @first_order_only("value_loss")
    def backward(ctx, grad_loss, _grad_out):
        from fastrlhf.kernels.ppo import value_backward

        values, old_values, returns, mask, scales = ctx.saved_tensors
        grad = None
        if grad_loss is not None and ctx.needs_input_grad[0]:
            grad = value_backward(values, old_values, returns, mask, scales, grad_loss, launch=ctx.launch)
        return grad, None, None, None, None, None


@once_per_signature
def _value_plan(values, old_values, returns, mask, **options) -> _Kernels:
    check_value_args(values, old_values, returns, mask, **options)
    (B, T), o = values.shape, options
    clip_eps = o["clip_eps"]
    finalize_options = dict(batch=B, num_partials=len(VALUE_PARTIALS), aggs=(o["loss_agg"],), coefs=(1.0,),
                            seq_len=T, norm_length=o["norm_length"],
                            **_plain_totals(o["total_tokens"], o["total_sequences"]))

    def make_kernels(device):
        from fastrlhf.kernels.aggregate import Finalize
        from fastrlhf.kernels.ppo import ValueLaunch

        launch = ValueLaunch(batch=B, seq_len=T, device=device, clip_eps=clip_eps)
        return launch, Finalize(chunks=launch.chunks, **finalize_options)

    return _Kernels(make_kernels)


# The metrics of `value_loss`: (name, column of the finalize's output; 0 = the aggregated loss).
_VALUE_METRICS = (("vf_loss", 0), ("vf_clipfrac", VALUE_PARTIALS.index("clipped")),
                  ("vpred", VALUE_PARTIALS.index("values")))


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
    kernels = _value_plan(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg,
                          total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    if resolve_backend(backend, values, old_values, returns) == "torch":
        return twin.value_loss(values, old_values, returns, mask, clip_eps=clip_eps, loss_agg=loss_agg,
                               total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    loss, out = _ValueLossFunction.apply(
        values.contiguous(), old_values.contiguous(), returns.contiguous(), mask.contiguous(),
        (total_tokens, total_sequences), kernels(values.device),
    )
    values_out = out.unbind()
    return loss, {name: values_out[column] for name, column in _VALUE_METRICS}
