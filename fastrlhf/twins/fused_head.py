"""The fused RL head in plain PyTorch: each loss is the composition it must equal.

    policy_loss_from_hidden = token_logprobs(..., return_entropy=True) -> ppo_loss(..., entropy=entropy)
    policy_loss_from_logits = logprobs_from_logits(..., return_entropy=True) -> ppo_loss(..., entropy=entropy)
    dpo_loss_from_hidden    = token_logprobs -> sequence_logps (averaged for ipo/simpo/orpo) -> dpo_loss
    sft_loss_from_hidden    = token_logprobs -> mean NLL over targets != -100

Ground truth for `fastrlhf.losses.fused_head` (the Triton path, which computes the gradients in the
forward pass) and the path used off-GPU. Same signatures there, plus `backend`. Here gradients come
from ordinary autograd (token_logprobs' checkpointed chunks recompute the logits in backward).
old_logps, advantages, ref_logps and the DPO reference log-probs are constants (detached). The public
functions check the arguments (`fastrlhf._checks`) before they call these.
"""
from __future__ import annotations

import torch

from fastrlhf.contracts import IGNORE_INDEX, LENGTH_AVERAGED_LOSS_TYPES
from fastrlhf.twins.logprobs import logprobs_from_logits, token_logprobs
from fastrlhf.twins.ppo import ppo_loss
from fastrlhf.twins.preference import dpo_loss, sequence_logps


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    ref_logps: torch.Tensor | None = None,
    rollout_logps: torch.Tensor | None = None,
    **objective,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-family policy loss from hidden `[B, T, H]`, weight `[V, H]`, targets `[B, T]`: the log-probs
    and entropies of `token_logprobs` fed to `ppo_loss` (see `fastrlhf.losses.fused_head`).
    old_logps=None: on-policy, the current log-probs detached (GRPOTrainer's single-pass case).
    `objective`: ppo_loss's options (loss_type, clip_eps, ..., norm_length)."""
    logps, entropy = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                    return_entropy=True, chunk_size=chunk_size)
    old_logps = logps.detach() if old_logps is None else old_logps.detach()
    return ppo_loss(logps, old_logps, advantages.detach(), mask, ref_logps=_detached(ref_logps),
                    rollout_logps=_detached(rollout_logps), entropy=entropy, **objective)


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace: bool = False,
    ref_logps: torch.Tensor | None = None,
    rollout_logps: torch.Tensor | None = None,
    **objective,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-family policy loss from logits `[B, T + 1, V]` (the model's, next-token layout) or
    `[B, T, V]` and targets `[B, T]`: the log-probs and entropies of `logprobs_from_logits` fed to
    `ppo_loss` (see `fastrlhf.losses.fused_head.policy_loss_from_logits`). old_logps=None: on-policy.
    `inplace` only concerns the Triton path's gradient buffer; autograd here keeps the logits."""
    logps, entropy = logprobs_from_logits(logits, targets, temperature=temperature, softcap=softcap,
                                          return_entropy=True)
    old_logps = logps.detach() if old_logps is None else old_logps.detach()
    return ppo_loss(logps, old_logps, advantages.detach(), mask, ref_logps=_detached(ref_logps),
                    rollout_logps=_detached(rollout_logps), entropy=entropy, **objective)


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss from hidden `[2B, T, H]` (B chosen rows, then B rejected rows) and targets
    `[2B, T]` (-100 outside the completion), as DPOTrainer computes it."""
    logps = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                           chunk_size=chunk_size)
    average = loss_type in LENGTH_AVERAGED_LOSS_TYPES
    chosen, rejected = sequence_logps(logps, targets != IGNORE_INDEX, average=average).chunk(2)
    return dpo_loss(chosen, rejected, _detached(ref_chosen_logps), _detached(ref_rejected_logps), beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma)


def sft_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    loss_agg: str = "token-mean",
    total_tokens: float | torch.Tensor | None = None,
    total_sequences: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFTTrainer's NLL from hidden `[N, H]` / `[B, T, H]` and targets (-100 = not in the loss):
    "token-mean" -sum(logp) / max(count, 1); "seq-mean-token-mean" (targets `[B, T]`) the mean over
    the B sequences of their mean token NLL. total_tokens / total_sequences replace max(count, 1) /
    B (the whole batch's counts). Metrics: none (`{}`)."""
    logps = token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap, chunk_size=chunk_size)
    mask = targets != IGNORE_INDEX
    if loss_agg == "token-mean":
        tokens = mask.sum().clamp(min=1) if total_tokens is None else total_tokens
        loss = -logps.sum() / tokens
    else:
        sequences = max(targets.shape[0], 1) if total_sequences is None else total_sequences
        loss = -sequence_logps(logps, mask, average=True).sum() / sequences
    return loss, {}
