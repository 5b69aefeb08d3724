"""What users would run instead of fastrlhf: peer libraries (imported when installed) and faithful
re-implementations of peer code that is not importable as a function.

Every re-implementation names the file it follows. They are written for this benchmark (same
arithmetic, same loop structure, same host syncs as the original), not copied.

Optional peers (`pip install liger-kernel trl`, the `bench` extra):
  * TRL >= 1.x: `trl.trainer.utils.selective_log_softmax` (Triton on CUDA, a per-row loop elsewhere),
    `selective_log_softmax_and_entropy`, and `trl.kernels.ChunkedLogProbFunction` (the chunked
    hidden -> log-prob head behind `add_fused_lm_head`; cuBLAS tiles + Triton on CUDA, torch tiles on
    CPU). TRL 1.16's trainers (SFT, DPO, GRPO, RLOO) all score through `add_fused_lm_head`:
    `trl_fused_lm_head` below follows it.
  * Liger-Kernel 0.8.x: `LigerFusedLinearCrossEntropyFunction` (Triton, CUDA only),
    `liger_kernel.ops.grpo_loss.fused_selective_log_softmax` (Triton, CUDA only, no grad),
    `triton_grpo_loss` (Triton, CUDA only), `LigerFusedLinearDPOLoss` and `LigerFusedLinearGRPOLoss`
    (chunked torch + torch.compile of the loss math; run on CPU too), and
    `LigerFusedLinearScaledCrossEntropyFunction`: per-token NLL (+ entropy) from hidden states, a CuTe
    DSL kernel on sm_90 (needs `nvidia-cutlass-dsl`), Liger's 512-token torch loop elsewhere
    (`liger_scaled_ce` says which one runs).
"""
from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=None)
def _import(module: str):
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # ImportError, or a peer that breaks on import (version skew)
        return None, f"{type(exc).__name__}: {exc}"[:160]


def peer_status(module: str, *, needs_cuda: bool = False, device: str = "cpu") -> str:
    """"" when usable here, else a short reason (shown as the row's status)."""
    mod, err = _import(module)
    if mod is None:
        return f"not installed ({module}: {err})"
    if needs_cuda and not device.startswith("cuda"):
        return "needs CUDA (Triton kernel)"
    return ""


# ----------------------------------------------------------------------------- log-probs


def naive_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What most RL code writes: fp32 log_softmax over the full [N, V] logits, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Full logits h @ W^T ([N, V] materialised, in the input dtype), then the naive log-prob."""
    return naive_logprobs_from_logits(hidden @ weight.T, targets)


def naive_token_logprobs_entropy(hidden, weight, targets):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def trl_selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    utils, _ = _import("trl.trainer.utils")
    return utils.selective_log_softmax(logits, targets)


def trl_selective_log_softmax_and_entropy(logits, targets):
    utils, _ = _import("trl.trainer.utils")
    return utils.selective_log_softmax_and_entropy(logits, targets)


def trl_full_logits_logprobs(hidden, weight, targets):
    """TRL's way before its fused head: full logits, then selective_log_softmax."""
    return trl_selective_log_softmax(hidden @ weight.T, targets)


# TRL's add_fused_lm_head passes a vocabulary chunk of 32768 (trl/trainer/utils.py, _CHUNKED_LOGPROB_CHUNK_SIZE).
TRL_VOCAB_CHUNK = 32768


def trl_chunked_logprobs(hidden, weight, targets, *, return_entropy: bool = False):
    kernels, _ = _import("trl.kernels")
    outputs = ("entropy",) if return_entropy else ()
    logps, entropy, *_ = kernels.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, TRL_VOCAB_CHUNK, None, 1.0, outputs)
    return (logps, entropy) if return_entropy else logps


def liger_flce_logprobs(hidden, weight, targets):
    """Liger's fused linear cross-entropy with reduction="none" gives -logp per token."""
    flce, _ = _import("liger_kernel.ops.fused_linear_cross_entropy")
    loss, *_ = flce.LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0,
                                                               0.0, "none")
    return -loss


def liger_selective_log_softmax(padded_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's GRPO helper: logits [B, L+1, V] (last position unused) and ids [B, L]; no autograd."""
    grpo, _ = _import("liger_kernel.ops.grpo_loss")
    return grpo.fused_selective_log_softmax(padded_logits, targets.unsqueeze(0), temperature=1.0)[0]


def openrlhf_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """OpenRLHF (openrlhf/models/actor.py + openrlhf/models/utils.py log_probs_from_logits): the actor
    casts the logits to fp32, then (flash-attn absent) gathers the label logit and subtracts a
    logsumexp computed 1024 rows at a time (`_logsumexp_by_chunk`)."""
    logits = logits.to(torch.float32)
    picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    lse = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
    for start in range(0, logits.shape[0], chunk_rows):
        lse[start:start + chunk_rows] = torch.logsumexp(logits[start:start + chunk_rows], dim=-1)
    return picked - lse


# ----------------------------------------------------------------------------- KL estimators


def verl_kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl (verl/trainer/ppo/core_algos.py, kl_penalty_forward)."""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp((torch.exp(kl) - kl - 1).contiguous(), min=-10, max=10)
    raise NotImplementedError(kl_penalty)


def openrlhf_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """OpenRLHF (openrlhf/models/utils.py, compute_approx_kl): fp32 log-ratio, k3 clamped to [-10, 10]."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio ** 2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = -log_ratio
        log_ratio = log_ratio.exp() - 1 - log_ratio
    if kl_estimator == "k3":
        log_ratio = log_ratio.clamp(min=-10, max=10)
    return log_ratio


# ----------------------------------------------------------------------------- masked statistics


def masked_mean(values, mask, axis=None):
    """TRL trl/core.py / verl verl/utils/torch_functional.py masked_mean."""
    if axis is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(axis) / mask.sum(axis)


def masked_var(values, mask, unbiased=True):
    """TRL masked_var: unbiased (Bessel) variance; the `mask_sum == 0` check is a host sync in TRL too."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("The sum of the mask is zero")
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """TRL / verl masked_whiten."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ----------------------------------------------------------------------------- GAE loops
# All three walk the T axis backwards in Python: 2T small kernel launches (T on the GPU each
# ~4 ops) plus a stack. Their callers whiten the advantages afterwards (benchmarked as `whiten`).


def trl_gae(rewards, values, mask, gamma: float, lam: float):
    """TRL PPOTrainer (trl/trainer/ppo_trainer.py, trl 0.11-0.2x, "6. compute advantages and returns").
    TRL zeroes padded rewards/values before the loop (masked_fill with INVALID_LOGPROB / 0)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def openrlhf_gae(rewards, values, action_mask, gamma: float, lambd: float):
    """OpenRLHF (openrlhf/trainer/ppo_utils/experience_maker.py, get_advantages_and_returns)."""
    values = action_mask * values
    rewards = action_mask * rewards
    lastgaelam = 0
    advantages_reversed = []
    response_length = rewards.size(1)
    for t in reversed(range(response_length)):
        nextvalues = values[:, t + 1] if t < response_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages.detach(), returns


def verl_gae(token_level_rewards, values, response_mask, gamma: float, lam: float):
    """verl (verl/trainer/ppo/core_algos.py, compute_gae_advantage_return, recent versions): the mask
    carries the last value/advantage across padding so masked tokens don't break the recursion."""
    with torch.no_grad():
        nextvalues = 0
        lastgaelam = 0
        advantages_reversed = []
        gen_len = token_level_rewards.shape[-1]
        for t in reversed(range(gen_len)):
            delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
            lastgaelam_ = delta + gamma * lam * lastgaelam
            nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
            lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], dim=1)
        returns = advantages + values
    return advantages, returns


# ----------------------------------------------------------------------------- PPO / value losses


def agg_loss(loss_mat, loss_mask, loss_agg_mode: str = "token-mean"):
    """verl agg_loss (token-mean and seq-mean-token-mean)."""
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * loss_mask).sum(-1) / loss_mask.sum(-1)
        return seq_losses.mean()
    raise NotImplementedError(loss_agg_mode)


def verl_ppo_objective(log_prob, old_log_prob, advantages, response_mask, ref_log_prob, entropy, *,
                       cliprange=0.2, cliprange_high=0.28, clip_ratio_c=3.0, kl_coef=0.05, entropy_coef=0.01,
                       kl_type="k3", loss_agg_mode="token-mean"):
    """verl's actor loss (verl/trainer/ppo/core_algos.py compute_policy_loss with dual clip, plus
    verl/workers/actor/dp_actor.py adding -entropy_coef * entropy and +kl_coef * kl_penalty): the
    same terms as fastrlhf.ppo_loss, one PyTorch op at a time."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode)
    entropy_loss = agg_loss(entropy, response_mask, loss_agg_mode)
    kld = verl_kl_penalty(log_prob, ref_log_prob, kl_type)
    kl_loss = agg_loss(kld, response_mask, loss_agg_mode)
    loss = pg_loss - entropy_coef * entropy_loss + kl_coef * kl_loss
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    return loss, {"clipfrac": pg_clipfrac.detach(), "approx_kl": ppo_kl.detach()}


def trl_value_loss(vpred, mb_values, mb_return, mask, cliprange_value=0.2):
    """TRL PPOTrainer (trl/trainer/ppo_trainer.py, trl 0.11-0.2x, the minibatch loss)."""
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, mask)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return vf_loss, {"vf_clipfrac": vf_clipfrac.detach()}


def trl_group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """TRL GRPOTrainer (trl/trainer/grpo_trainer.py, scale_rewards="group"): nan-aware group mean/std
    repeated back to every completion, then (r - mean) / (std + 1e-4)."""
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    # trl.trainer.utils.nanstd: sqrt(nanmean(centred^2) * n / (n - 1))
    std = torch.sqrt(torch.nanmean(centred ** 2, dim=1) * count.squeeze(1) / (count.squeeze(1) - 1))
    std = std.repeat_interleave(num_generations, dim=0)
    return (rewards - mean) / (std + 1e-4)


# ----------------------------------------------------------------------------- preference losses


def trl_dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
                 loss_type="sigmoid", label_smoothing=0.0):
    """TRL DPOTrainer (trl/trainer/dpo_trainer.py, _compute_loss, f_divergence_type="reverse_kl")."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean - flipped) / (1 - 2 * label_smoothing)
    else:
        raise NotImplementedError(loss_type)
    loss = per_sequence_loss.mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
    }
    return loss, metrics


def trl_reward_loss(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """TRL RewardTrainer (trl/trainer/reward_trainer.py, compute_loss)."""
    if margin is not None:
        loss = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    else:
        loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss, {"accuracy": (rewards_chosen > rewards_rejected).float().mean().detach()}


def trl_kto_loss(policy_logps, ref_logps, labels, policy_KL_logps, reference_KL_logps, *, beta=0.1,
                 desirable_weight=1.0, undesirable_weight=1.0):
    """TRL KTOTrainer (trl/trainer/kto_trainer.py, _compute_loss, loss_type="kto", one process):
    rows split by label with index_select, z0 = clamp(mean KL log-ratio, min=0), nanmean of the
    concatenated weighted losses."""
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    kl = (policy_KL_logps - reference_KL_logps).mean().detach().clamp(min=0)
    chosen_logratios = policy_logps.index_select(0, chosen_idx) - ref_logps.index_select(0, chosen_idx)
    rejected_logratios = policy_logps.index_select(0, rejected_idx) - ref_logps.index_select(0, rejected_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses.nanmean(), {"kl": kl, "rewards/chosen": (beta * chosen_logratios.detach()).mean(),
                              "rewards/rejected": (beta * rejected_logratios.detach()).mean()}


def liger_fused_linear_dpo(weight, hidden, targets, ref_hidden, ref_weight, *, beta=0.1, compiled=True):
    """Liger's chunked fused-linear DPO (liger_kernel.chunked_loss.LigerFusedLinearDPOLoss): hidden
    [2B, T, H] (chosen rows first), targets [2B, T] with -100 on prompt/padding, reference hidden too."""
    chunked, _ = _import("liger_kernel.chunked_loss")
    loss_fn = chunked.LigerFusedLinearDPOLoss(beta=beta, compiled=compiled, use_ref_model=True)
    out = loss_fn(weight, hidden, targets, None, ref_hidden, ref_weight, None)
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- fused heads (hidden -> loss)


def trl_fused_lm_head(hidden, weight, labels, *, entropy: bool = False):
    """TRL 1.16's fused LM head (trl/trainer/utils.py, `add_fused_lm_head` -> `_fused_forward`), from
    the backbone's hidden states `[B, T, H]` (already aligned with `labels`, i.e. the `[:, :-1]`
    shift done) to per-token log-probs `[B, T]` (0 where labels == -100) and, with `entropy`, the
    entropies. On CUDA it scores only the valid positions (`hidden[mask]`, a gather and a host
    sync, then `masked_scatter` back); elsewhere every position, as TRL does."""
    kernels, _ = _import("trl.kernels")
    mask = labels != -100
    compact = hidden.device.type == "cuda"
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
    flat = hidden[mask] if compact else hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
    per_token = kernels.ChunkedLogProbFunction.apply(flat, weight, None, flat_labels, 1.0, TRL_VOCAB_CHUNK, None, 1.0,
                                                     outputs)
    if compact:
        per_token = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token]
    else:
        per_token = [None if x is None else x.view(mask.shape).masked_fill(~mask, 0) for x in per_token]
    return per_token[0], per_token[1]


@functools.lru_cache(maxsize=None)
def liger_scaled_ce(device_type: str, capability: tuple | None) -> tuple:
    """(autograd function, backend name, note) of Liger's per-token NLL/entropy head for this device.

    Liger's frontend (`LigerFusedLinearScaledCrossEntropyFunction`) runs the CuTe DSL kernel on sm_90
    and Liger's own 512-token chunked torch loop (`_FusedLinearPPOFallbackFunction`, adapted from
    verl) on every other device. On sm_90 without `nvidia-cutlass-dsl` the frontend raises instead
    of falling back; we then time that torch loop and say so in the row's note."""
    frontend, err = _import("liger_kernel.ops.fused_linear_scaled_cross_entropy")
    if frontend is None:
        return None, "", f"not installed ({err})"
    fallback = frontend._FusedLinearPPOFallbackFunction
    if device_type != "cuda" or capability != (9, 0):
        where = "CPU" if device_type == "cpu" else f"sm_{capability[0]}{capability[1]}" if capability else device_type
        return fallback, "torch", f"Liger's own path on {where}: 512-token torch chunks (the CuTe head is sm_90 only)"
    sm90, err = _import("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
    if sm90 is None:
        return fallback, "torch-fallback", (f"FELL BACK: the CuTe sm_90 head needs nvidia-cutlass-dsl ({err}); "
                                            "timed Liger's 512-token torch loop instead")
    return sm90.LigerFusedScaledCrossEntropySM90Function, "cute-dsl", "Liger CuTe DSL sm_90 head"


def liger_scaled_ce_apply(function, hidden, weight, targets, *, entropy: bool):
    """Per-token (nll, entropy or None) of Liger's scaled-CE head, hidden `[N, H]`, targets `[N]`
    (-100 = ignored, nll 0 there). The sm_90 function and the fallback take the same leading
    arguments; only the sm_90 one has `m_tiles_per_cluster` before `return_entropy`."""
    if function.__name__.endswith("SM90Function"):
        out = function.apply(hidden, weight, targets, 1.0, -100, 1, entropy)
    else:
        out = function.apply(hidden, weight, targets, 1.0, -100, entropy)
    return (out[0], out[1]) if entropy else (out, None)


def liger_fused_linear_grpo(hidden, weight, ids, mask, advantages, old_logps, ref_logps, *, beta=0.04,
                            eps_low=0.2, eps_high=0.28, compiled=True):
    """Liger's fused linear GRPO loss (liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss, defaults
    but loss_type="bnpo" = token-mean over the batch): hidden `[B, T, H]`, sequence advantages `[B]`,
    per-token old/reference log-probs `[B, T]`. Gradients are computed in its forward (chunk by
    chunk, `torch.autograd.grad`); its log-probs recompute the logits in that inner backward."""
    chunked, _ = _import("liger_kernel.chunked_loss")
    loss_fn = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=compiled, use_ref_model=True, epsilon_low=eps_low,
                                               epsilon_high=eps_high, loss_type="bnpo")
    loss, _metrics = loss_fn(hidden, weight, ids, mask, advantages, ref_per_token_logps=ref_logps,
                             old_per_token_logps=old_logps)
    return loss


def liger_flce_mean(hidden, weight, targets):
    """Liger's fused linear cross entropy, mean over targets != -100 (what its SFT patch computes)."""
    flce, _ = _import("liger_kernel.ops.fused_linear_cross_entropy")
    loss, *_ = flce.LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0, 0.0,
                                                               "mean")
    return loss


def hf_causal_lm_loss(hidden, weight, targets):
    """A Hugging Face causal LM's own loss: full logits, upcast to fp32, cross entropy over the
    targets != -100 (transformers/loss/loss_utils.py, ForCausalLMLoss, targets already shifted)."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
