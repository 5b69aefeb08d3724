"""Preference losses in readable PyTorch: DPO family, Bradley-Terry reward loss, sequence log-probs.

Ground truth for the Triton kernels in `fastrlhf.kernels.preference` and the torch path of
`fastrlhf.losses.preference` (same signatures there, plus `backend`). The public functions check
the arguments (`fastrlhf._checks`) before they call these; called directly, these trust their inputs.
"""
from __future__ import annotations

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
