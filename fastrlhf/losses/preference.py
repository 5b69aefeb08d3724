"""Preference losses: DPO family, KTO and Bradley-Terry reward loss (fused Triton), sequence log-probs.

On CUDA (or under TRITON_INTERPRET=1) `dpo_loss`, `kto_loss` and `reward_loss` run one Triton kernel that
computes, in a single pass over the batch, the loss, every metric and the per-row gradients
(plus one single-program launch adding up the blocks when B > 1024); backward is one launch that
scales the stored gradients into each input's dtype. No torch op either way. Otherwise they run the PyTorch twins in
`fastrlhf.twins.preference` (same signatures minus `backend`, same metric names). Arguments are
checked once, here (`fastrlhf._checks`), whichever backend runs.
"""
from __future__ import annotations

import torch

from typing import Callable

from fastrlhf._checks import (
    check_dpo_args,
    check_kto_args,
    check_kto_kl_args,
    check_reward_args,
    check_sequence_logps_args,
)
from fastrlhf._dispatch import resolve_backend
from fastrlhf.contracts import DPO_LOSS_TYPES, DPO_STATS, KTO_STATS, ORPO_STATS, REWARD_STATS
from fastrlhf.losses._autograd import first_order_only
from fastrlhf.twins import preference as twin


def _empty_batch(device: torch.device, names) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((), device=device), torch.zeros(len(names), device=device)


class _PairwiseLossFunction(torch.autograd.Function):
    """Shared autograd wiring: the kernel returns d loss / d chosen and d loss / d rejected per
    row (already / B); reference inputs (when present) get the negatives, since the losses depend
    on them only through chosen - ref_chosen and rejected - ref_rejected. Backward is one launch."""

    @staticmethod
    def _save(ctx, grad_chosen, grad_rejected, *inputs):
        ctx.save_for_backward(grad_chosen, grad_rejected)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)  # (chosen, rejected, ref_c, ref_r)

    @staticmethod
    def _grads(ctx, grad_loss):
        from fastrlhf.kernels.preference import pairwise_backward

        if grad_loss is None:
            return (None,) * 4
        grad_chosen, grad_rejected = ctx.saved_tensors
        return pairwise_backward(grad_chosen, grad_rejected, grad_loss, ctx.dtypes, ctx.needs_input_grad[:4])


class _DPOLossFunction(_PairwiseLossFunction):
    @staticmethod
    def forward(ctx, chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, gamma):
        from fastrlhf.kernels.preference import dpo_loss_forward

        if chosen.shape[0] == 0:
            loss, stats = _empty_batch(chosen.device, DPO_STATS)
            grad_chosen = grad_rejected = torch.zeros(0, device=chosen.device)
        else:
            loss, stats, grad_chosen, grad_rejected = dpo_loss_forward(
                chosen, rejected, ref_chosen, ref_rejected,
                beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
            )
        _PairwiseLossFunction._save(ctx, grad_chosen, grad_rejected, chosen, rejected, ref_chosen, ref_rejected)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (absent) gradient
        return loss, stats

    @staticmethod
    @first_order_only("dpo_loss")
    def backward(ctx, grad_loss, _grad_stats):
        return (*_PairwiseLossFunction._grads(ctx, grad_loss), None, None, None, None)


class _RewardLossFunction(_PairwiseLossFunction):
    @staticmethod
    def forward(ctx, chosen, rejected, margin, center_coef):
        from fastrlhf.kernels.preference import reward_loss_forward

        if chosen.shape[0] == 0:
            loss, stats = _empty_batch(chosen.device, REWARD_STATS)
            grad_chosen = grad_rejected = torch.zeros(0, device=chosen.device)
        else:
            loss, stats, grad_chosen, grad_rejected = reward_loss_forward(
                chosen, rejected, margin=margin, center_coef=center_coef)
        _PairwiseLossFunction._save(ctx, grad_chosen, grad_rejected, chosen, rejected, None, None)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (absent) gradient
        return loss, stats

    @staticmethod
    @first_order_only("reward_loss")
    def backward(ctx, grad_loss, _grad_stats):
        grad_chosen, grad_rejected, _, _ = _PairwiseLossFunction._grads(ctx, grad_loss)
        return grad_chosen, grad_rejected, None, None


class _KTOLossFunction(_PairwiseLossFunction):
    """Rows instead of pairs: the kernel's per-row gradient fills the "chosen" slots of the pairwise
    backward (d policy_logps, and its negative for d ref_logps); kl is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, logps, ref_logps, labels, kl, beta, desirable_weight, undesirable_weight):
        from fastrlhf.kernels.preference import kto_loss_forward

        if logps.shape[0] == 0:
            loss, stats = _empty_batch(logps.device, KTO_STATS)
            if kl is not None:
                stats[KTO_STATS.index("kl")] = kl.detach().reshape(()) if isinstance(kl, torch.Tensor) else kl
            grad = torch.zeros(0, device=logps.device)
        else:
            loss, stats, grad = kto_loss_forward(logps, ref_logps, labels, 0.0 if kl is None else kl, beta=beta,
                                                 desirable_weight=desirable_weight,
                                                 undesirable_weight=undesirable_weight)
        _PairwiseLossFunction._save(ctx, grad, grad, logps, None, ref_logps, None)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros for the metrics' (absent) gradient
        return loss, stats

    @staticmethod
    @first_order_only("kto_loss")
    def backward(ctx, grad_loss, _grad_stats):
        from fastrlhf.kernels.preference import pairwise_backward

        if grad_loss is None:
            return (None,) * 7
        grad, _ = ctx.saved_tensors
        need_logps, need_ref = ctx.needs_input_grad[:2]
        grad_logps, _, grad_ref, _ = pairwise_backward(grad, grad, grad_loss, ctx.dtypes,
                                                       (need_logps, False, need_ref, False))
        return grad_logps, grad_ref, None, None, None, None, None


def _contiguous(t):
    return None if t is None else t.contiguous()


# Metric names and their slots in the kernels' statistics, per loss type (made once).
_DPO_METRICS = {loss_type: tuple((name, DPO_STATS.index(name)) for name in DPO_STATS
                                 if loss_type == "orpo" or name not in ORPO_STATS) for loss_type in DPO_LOSS_TYPES}
_REWARD_METRICS = tuple((name, i) for i, name in enumerate(REWARD_STATS))
_KTO_METRICS = tuple((name, i) for i, name in enumerate(KTO_STATS))


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss over sequence log-probs `[B]` (policy and reference, chosen and rejected);
    returns `(loss, metrics)`, loss = batch mean (fp32 on the Triton path; 0 for B = 0).

    With h = (chosen - ref_chosen) - (rejected - ref_rejected) and eps = label_smoothing:
      sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h)
      robust:  [-(1 - eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps)
      hinge:   relu(1 - beta h)
      ipo:     (h - 1 / (2 beta))^2                 (pass length-averaged logps)
      simpo:   -(1 - eps) log s(x) - eps log s(-x), x = beta (chosen - rejected) - gamma
               (reference-free: refs must be None; pass length-normalised logps)
      orpo:    -chosen - beta log s(log odds(chosen) - log odds(rejected)), odds(p) = p / (1 - p)
               (reference-free; pass length-averaged logps; beta = TRL's ORPO beta)
      apo_zero: 1 - s(beta (chosen - ref_chosen)) + s(beta (rejected - ref_rejected))
               (APO-zero, D'Oosterlinck et al. 2024, eq. 7)
    label_smoothing (in [0, 0.5)) applies to sigmoid, robust, simpo; gamma to simpo only.
    Gradients flow to all given log-prob tensors.

    Metrics (TRL names, detached 0-d tensors): rewards/chosen, rewards/rejected
    (beta (logp - ref); beta logp for simpo/orpo), rewards/accuracies, rewards/margins,
    logps/chosen, logps/rejected; orpo adds nll_loss, log_odds_ratio, log_odds_chosen.
    """
    check_dpo_args(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   beta, loss_type, label_smoothing, gamma)
    kwargs = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)
    tensors = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if resolve_backend(backend, *tensors) == "torch":
        return twin.dpo_loss(*tensors, **kwargs)
    loss, stats = _DPOLossFunction.apply(*map(_contiguous, tensors), beta, loss_type, label_smoothing, gamma)
    values = stats.unbind()
    return loss, {name: values[i] for name, i in _DPO_METRICS[loss_type]}


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss over scalar rewards `[B]`, as TRL's RewardTrainer:
        mean(-log s(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)
    (center_coef = TRL's `center_rewards_coefficient`); margin: None, a float or a `[B]` tensor
    (no gradient to it). Returns `(loss, metrics)`; loss 0 for B = 0.
    Metrics (detached): accuracy, margin (mean r_c - r_r), rewards/chosen, rewards/rejected.
    """
    check_reward_args(chosen_rewards, rejected_rewards, margin, center_coef)
    margin_tensor = margin if isinstance(margin, torch.Tensor) else None
    if resolve_backend(backend, chosen_rewards, rejected_rewards, margin_tensor) == "torch":
        return twin.reward_loss(chosen_rewards, rejected_rewards, margin=margin, center_coef=center_coef)
    loss, stats = _RewardLossFunction.apply(chosen_rewards.contiguous(), rejected_rewards.contiguous(),
                                            margin_tensor.contiguous() if margin_tensor is not None else margin,
                                            center_coef)
    values = stats.unbind()
    return loss, {name: values[i] for name, i in _REWARD_METRICS}


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    *,
    kl: torch.Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss (Ethayarajh et al. 2024, eq. 7; TRL's KTOTrainer) over unpaired completions:
    sequence log-probs `policy_logps`, `ref_logps` `[B]` and `labels` bool `[B]` (True = desirable).
    Returns `(loss, metrics)`; loss = batch mean (fp32 on the Triton path; 0 for B = 0).

    With r = policy_logps - ref_logps (the implied reward / beta) and z0 = `kl`, per row:
      desirable    desirable_weight   * (1 - s(beta (r - z0)))
      undesirable  undesirable_weight * (1 - s(beta (z0 - r)))
    loss = their sum / B (TRL: the mean of the concatenated weighted row losses).
    `kl` is the reference point z0, used as a constant (no gradient flows to it): a float or a
    one-element tensor, read on the device without a sync. KTO estimates it from mismatched
    prompt-completion pairs, clamped at 0: `kto_kl(policy_kl_logps, ref_kl_logps)`.
    loss_type="apo_zero_unpaired" (APO-zero unpaired, D'Oosterlinck et al. 2024; TRL's name) is the
    same loss with z0 = 0: pass kl=None. Weights (TRL's desirable_weight / undesirable_weight,
    the paper's lambda_D / lambda_U) balance unequal class sizes; the paper advises
    lambda_D n_D / (lambda_U n_U) in [1, 4/3] (eq. 8).
    Gradients flow to policy_logps and ref_logps (the negative); labels and kl get none.

    Metrics (TRL names, detached 0-d tensors): rewards/chosen, rewards/rejected (mean of beta r
    over the desirable / undesirable rows; 0 when the batch has no such row, where TRL logs
    nothing: a host-side branch would need a sync), rewards/margins (their difference),
    logps/chosen, logps/rejected (class means of policy_logps), kl (the z0 used; 0 for
    apo_zero_unpaired), count/chosen, count/rejected (rows of each class).
    NaN rules: a NaN log-prob makes the loss and its class's metrics NaN; a NaN kl, every row's.
    """
    check_kto_args(policy_logps, ref_logps, labels, kl, beta, desirable_weight, undesirable_weight, loss_type)
    kl_tensor = kl if isinstance(kl, torch.Tensor) else None
    if resolve_backend(backend, policy_logps, ref_logps, labels, kl_tensor) == "torch":
        return twin.kto_loss(policy_logps, ref_logps, labels, kl=kl, beta=beta, desirable_weight=desirable_weight,
                             undesirable_weight=undesirable_weight, loss_type=loss_type)
    if kl_tensor is not None:
        kl = kl_tensor.detach().reshape(())
    loss, stats = _KTOLossFunction.apply(policy_logps.contiguous(), ref_logps.contiguous(), labels.contiguous(), kl,
                                         beta, desirable_weight, undesirable_weight)
    values = stats.unbind()
    return loss, {name: values[i] for name, i in _KTO_METRICS}


def kto_kl(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    all_reduce: Callable[[torch.Tensor], object] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, sec. 4.1), as TRL estimates it:
    max(0, mean(policy_kl_logps - ref_kl_logps)), detached, from the `[B]` sequence log-probs of
    mismatched prompt-completion pairs (each prompt with another row's completion) under the
    policy and the reference. 0-d, float32 (float64 for float64 inputs); 0 for B = 0; NaN in, NaN out.

    all_reduce: under data parallelism, a function that sums a tensor over the ranks in place
    (`torch.distributed.all_reduce`, `DistContext.all_reduce_sum`): the mean is then over every
    rank's KL rows before the clamp (TRL gathers the ranks' means and averages them: the same for
    equal batch sizes). Plain torch ops on every backend; `backend` is accepted (and checked)."""
    check_kto_kl_args(policy_kl_logps, ref_kl_logps)
    resolve_backend(backend, policy_kl_logps, ref_kl_logps)
    return twin.kto_kl(policy_kl_logps, ref_kl_logps, all_reduce=all_reduce)


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False,
                   backend: str = "auto") -> torch.Tensor:
    """Per-sequence log-prob `[B]` from token log-probs `logps` `[B, T]` and `mask` `[B, T]`:
    the masked sum, or with `average=True` the masked mean (0 for an empty row).
    Differentiable in logps; values outside the mask are ignored (even -inf or NaN padding).
    float32 (float64 for float64 logps). Plain torch ops on every backend (one masked reduction);
    `backend` is accepted (and checked) like everywhere else."""
    check_sequence_logps_args(logps, mask)
    resolve_backend(backend, logps, mask)
    return twin.sequence_logps(logps, mask, average=average)
