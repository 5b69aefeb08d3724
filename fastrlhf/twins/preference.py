"""Preference losses in readable PyTorch: DPO family, KTO, Bradley-Terry reward loss, sequence log-probs.

Ground truth for the Triton kernels in `fastrlhf.kernels.preference` and the torch path of
`fastrlhf.losses.preference` (same signatures there, plus `backend`). The public functions check
the arguments (`fastrlhf._checks`) before they call these; called directly, these trust their inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastrlhf._dtypes import compute_dtype
from fastrlhf.contracts import ORPO_MAX_LOGP, REFERENCE_FREE_LOSS_TYPES


def _batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch that is 0 (not NaN) for an empty batch."""
    return x.sum() / max(x.shape[0], 1)


# ---- metrics (shared names) -------------------------------------------------------------------

def dpo_metrics(
    chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, log_odds=None
) -> dict[str, torch.Tensor]:
    """TRL's DPOTrainer / ORPOTrainer metric names, as detached batch means."""
    metrics = {
        "rewards/chosen": _batch_mean(chosen_rewards),
        "rewards/rejected": _batch_mean(rejected_rewards),
        "rewards/accuracies": _batch_mean((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
        "rewards/margins": _batch_mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _batch_mean(chosen_logps),
        "logps/rejected": _batch_mean(rejected_logps),
    }
    if log_odds is not None:
        metrics["nll_loss"] = _batch_mean(-chosen_logps)
        metrics["log_odds_ratio"] = _batch_mean(F.logsigmoid(log_odds))
        metrics["log_odds_chosen"] = _batch_mean(log_odds)
    return {name: value.detach() for name, value in metrics.items()}


def reward_metrics(chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    metrics = {
        "accuracy": _batch_mean((chosen_rewards > rejected_rewards).to(chosen_rewards.dtype)),
        "margin": _batch_mean(chosen_rewards - rejected_rewards),
        "rewards/chosen": _batch_mean(chosen_rewards),
        "rewards/rejected": _batch_mean(rejected_rewards),
    }
    return {name: value.detach() for name, value in metrics.items()}


# ---- losses -------------------------------------------------------------------------------------

def sequence_logps(logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """The PyTorch twin of `fastrlhf.sequence_logps`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    m = mask.to(torch.float32).to(compute_dtype(logps))
    masked = torch.where(m != 0, logps.to(m.dtype), 0.0) * m
    total = masked.sum(dim=-1)
    if average:
        return total / m.sum(dim=-1).clamp(min=1)
    return total


def orpo_log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)), odds(p) = p / (1 - p), from log-probs (clamped < 0)."""

    def log_odds(logp: torch.Tensor) -> torch.Tensor:
        logp = logp.clamp(max=ORPO_MAX_LOGP)
        return logp - torch.log(-torch.expm1(logp))

    return log_odds(chosen_logps) - log_odds(rejected_logps)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.dpo_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    dtype = compute_dtype(*(t for t in (chosen_logps, rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps) if t is not None))
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        chosen_ratio, rejected_ratio = chosen, rejected
    else:
        chosen_ratio = chosen - ref_chosen_logps.to(dtype)
        rejected_ratio = rejected - ref_rejected_logps.to(dtype)
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    log_odds = None

    if loss_type in ("sigmoid", "simpo"):
        x = beta * h - (gamma if loss_type == "simpo" else 0.0)
        losses = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    elif loss_type == "robust":
        x = beta * h
        losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    else:  # orpo
        log_odds = orpo_log_odds(chosen, rejected)
        losses = -chosen - beta * F.logsigmoid(log_odds)

    metrics = dpo_metrics(beta * chosen_ratio, beta * rejected_ratio, chosen, rejected, log_odds)
    return _batch_mean(losses), metrics


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.reward_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    dtype = compute_dtype(chosen_rewards, rejected_rewards)
    chosen, rejected = chosen_rewards.to(dtype), rejected_rewards.to(dtype)
    x = chosen - rejected
    if margin is not None:
        x = x - (margin.detach().to(dtype) if isinstance(margin, torch.Tensor) else margin)
    losses = -F.logsigmoid(x) + center_coef * (chosen + rejected) ** 2
    return _batch_mean(losses), reward_metrics(chosen, rejected)


# ---- KTO ----------------------------------------------------------------------------------------

def kto_kl(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    all_reduce: Callable[[torch.Tensor], object] | None = None,
) -> torch.Tensor:
    """The twin of `fastrlhf.kto_kl` (and its only implementation: a few torch ops on every backend)."""
    dtype = compute_dtype(policy_kl_logps, ref_kl_logps)
    diff = policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)
    total = torch.stack([diff.sum(), torch.tensor(float(diff.shape[0]), dtype=diff.dtype, device=diff.device)])
    if all_reduce is not None:
        all_reduce(total)  # sums over ranks in place: the mean below is over every rank's KL rows
    return (total[0] / total[1].clamp(min=1)).clamp(min=0)


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PyTorch twin of `fastrlhf.kto_loss`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    dtype = compute_dtype(policy_logps, ref_logps)
    logps = policy_logps.to(dtype)
    ratio = logps - ref_logps.to(dtype)
    if kl is None:  # apo_zero_unpaired: the reference point is 0
        z0 = torch.zeros((), dtype=dtype, device=ratio.device)
    elif isinstance(kl, torch.Tensor):
        z0 = kl.detach().to(dtype).reshape(())  # a constant: no gradient reaches the KL rows
    else:
        z0 = torch.tensor(float(kl), dtype=dtype, device=ratio.device)
    x = beta * (ratio - z0)
    # desirable: w_D (1 - s(x)); undesirable: w_U (1 - s(-x)). Written s(-x), s(x): exact in the tails.
    losses = torch.where(labels, desirable_weight * torch.sigmoid(-x), undesirable_weight * torch.sigmoid(x))

    chosen, rejected = labels, ~labels
    n_chosen, n_rejected = chosen.sum().to(dtype), rejected.sum().to(dtype)
    rewards = beta * ratio

    def class_mean(values, rows, count):
        return torch.where(rows, values, 0.0).sum() / count.clamp(min=1)

    rewards_chosen = class_mean(rewards, chosen, n_chosen)
    rewards_rejected = class_mean(rewards, rejected, n_rejected)
    metrics = {
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": rewards_chosen - rewards_rejected,
        "logps/chosen": class_mean(logps, chosen, n_chosen),
        "logps/rejected": class_mean(logps, rejected, n_rejected),
        "kl": z0,
        "count/chosen": n_chosen,
        "count/rejected": n_rejected,
    }
    return _batch_mean(losses), {name: value.detach() for name, value in metrics.items()}
