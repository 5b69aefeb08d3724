"""Argument checks of the public API: each raises ValueError naming the argument (or option).

The one home of every check: the public losses (`fastrlhf.losses`) run them once, before they
dispatch to a Triton kernel or to its PyTorch twin (`fastrlhf.twins`), so both backends reject
exactly the same inputs and neither checks again; the trainer configs and the CLI use the same
value checks for their options.

Tensor checks look at shapes, dtypes and Python scalars only, never at tensor values (which would
cost a host-device sync), except the token-id range of CPU targets.

What a call needs that follows from its shapes and options alone is made once per signature
(`once_per_signature`): `check_ppo_args` (~10 us of Python, which a training loop would pay every
step with the same shapes and options) and the losses' kernel plans. The other checks cost about
what looking a signature up costs (2-6 us), so they simply run.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Sequence

import torch

from fastrlhf.contracts import (
    DPO_LOSS_TYPES,
    GROUP_STD_KINDS,
    IGNORE_INDEX,
    IS_CORRECTION_ALIASES,
    KL_ESTIMATOR_ALIASES,
    KTO_LOSS_TYPES,
    LABEL_SMOOTHING_LOSS_TYPES,
    LOSS_AGGS,
    POLICY_LOSS_TYPES,
    RATIO_LEVELS,
    REFERENCE_FREE_LOSS_TYPES,
)

# --------------------------------------------------------------------------- primitives

def check_floating(name: str, tensor: torch.Tensor) -> None:
    """`tensor` must be a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` (None skipped) must have the shape of `reference`."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """`tensor` must have `ndim` dimensions; `layout` (e.g. "[B, T]") is quoted in the error."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(tensor.shape)}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        listed = ", ".join(f"{n}: {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_mask(name: str, mask: torch.Tensor, like: torch.Tensor) -> None:
    """A bool / integer / float mask shaped like `like` (1 = counts; a float mask weighs its tokens)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or float, got {mask.dtype}")


# --------------------------------------------------------------------------- checks run once per signature

# Signatures kept per function; the cache is emptied when full (a loop over many shapes only re-checks).
SIGNATURES_KEPT = 256


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a check may look at: each tensor's shape, dtype and device (never its values), every
    other argument's value, and all the arguments' types (which keep True, 1 and 1.0 apart)."""
    values = (*args, *kwargs.values())
    return (tuple(kwargs), tuple([(v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else v for v in values]),
            tuple(map(type, values)))


def once_per_signature(function: Callable) -> Callable:
    """Run `function(*args, **kwargs)` once per signature (`_signature`): later calls whose tensors
    have the same shapes, dtypes and devices and whose other arguments are equal values of the same
    types return the first call's result. For checks, and for what a call needs that follows from
    its options and shapes alone (kernel constexprs, metric names): nothing that depends on tensor
    values or identities. A failing call caches nothing (a bad argument raises every time); an
    argument that cannot be hashed (a list given for a name, say) runs the function every time."""
    seen: dict = {}

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            key = _signature(args, kwargs)
            return seen[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable argument
            return function(*args, **kwargs)
        result = function(*args, **kwargs)
        if len(seen) >= SIGNATURES_KEPT:
            seen.clear()
        seen[key] = result
        return result

    wrapper.cache_clear = seen.clear
    return wrapper


# --------------------------------------------------------------------------- option values

def check_int(name: str, value: Any, minimum: int) -> None:
    """`value` must be an int (not bool) >= minimum; ValueError naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")



def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """`value` must be a real number in the given interval; ValueError naming the option otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be a finite number {' and '.join(s for s in (lo, hi) if s)}, got {value!r}")


# --------------------------------------------------------------------------- log-probabilities

def check_targets(targets: torch.Tensor, expected_shape: torch.Size, vocab_size: int) -> None:
    """`targets` must be integer class ids of `expected_shape`, in [0, V) or -100.

    The value range is checked only on CPU tensors: on an accelerator it would need a host-device
    sync on every call. There the Triton kernels return NaN for an out-of-range target instead of
    reading out of bounds (and PyTorch's gather raises its own device-side error).
    """
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got dtype {targets.dtype}")
    if targets.shape != expected_shape:
        raise ValueError(f"targets must have shape {tuple(expected_shape)}, got {tuple(targets.shape)}")
    if targets.device.type == "cpu" and targets.numel():
        bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
        if bad.any():
            raise ValueError(
                f"targets must be in [0, {vocab_size}) or {IGNORE_INDEX} (ignored), "
                f"got {targets[bad].flatten()[0].item()}"
            )



def check_softcap(softcap: float | None) -> float | None:
    """`softcap` as a float, or None when off (None or 0); else a finite number > 0 (ValueError)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise ValueError(f"softcap must be a number > 0, 0 or None, got {softcap!r}")
    if softcap == 0:
        return None
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 (or 0 / None for no cap), got {softcap!r}")
    return float(softcap)



def predicts_next(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """The next-token layout: `logits [..., T+1, V]` straight from the model and `targets [..., T]`
    (= input_ids[..., 1:]); position t's logits score targets[t] and the last position scores nothing."""
    return (
        isinstance(targets, torch.Tensor) and logits.dim() >= 2 and targets.dim() == logits.dim() - 1
        and targets.shape[:-1] == logits.shape[:-2] and logits.shape[-2] == targets.shape[-1] + 1
    )



def check_logits_args(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, softcap: float | None = None
) -> None:
    check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    check_positive("temperature", temperature)
    check_softcap(softcap)
    check_same_device(logits=logits, targets=targets)
    positions = logits.shape[:-1]
    if predicts_next(logits, targets):
        positions = torch.Size((*positions[:-1], positions[-1] - 1))
    elif isinstance(targets, torch.Tensor) and targets.shape != positions:
        raise ValueError(
            f"targets must have shape {tuple(positions)} (one per logits row) or "
            f"{(*positions[:-1], positions[-1] - 1) if len(positions) else ()} (next-token layout: logits "
            f"[..., T+1, V], targets [..., T]), got {tuple(targets.shape)}"
        )
    check_targets(targets, positions, logits.shape[-1])



def check_hidden_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    chunk_size: int | None,
    softcap: float | None = None,
) -> None:
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V >= 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    check_positive("temperature", temperature)
    check_softcap(softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    check_targets(targets, hidden.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------- PPO family

def canonical_kl_estimator(name: str, estimator: str) -> str:
    """Map an estimator name or alias to "k1" | "k2" | "k3"; ValueError naming argument `name` otherwise."""
    check_choice(name, estimator, tuple(KL_ESTIMATOR_ALIASES))
    return KL_ESTIMATOR_ALIASES[estimator]



def check_kl_args(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> str:
    check_floating("logps", logps)
    check_floating("ref_logps", ref_logps)
    check_same_shape("logps", logps, ref_logps=ref_logps)
    check_same_device(logps=logps, ref_logps=ref_logps)
    return canonical_kl_estimator("estimator", estimator)



@dataclasses.dataclass(frozen=True)
class PolicyArgs:
    """What `check_ppo_args` resolved: canonical names, defaults filled in."""

    kl_estimator: str
    clip_eps_high: float
    is_correction: str | None


def check_totals(total_tokens, total_sequences, norm_length, device: torch.device) -> None:
    """The aggregation denominators of the whole batch (`fastrlhf.twins.ppo.aggregation_row_scale`):
    None, a number > 0 or (counts) a 0-d / one-element tensor on `device` (its value is not checked:
    that would need a host sync)."""
    for name, value in (("total_tokens", total_tokens), ("total_sequences", total_sequences)):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                raise ValueError(f"{name} must be a number > 0 or a one-element real tensor, got a tensor of shape "
                                 f"{tuple(value.shape)} and dtype {value.dtype}")
            if value.device != device:
                raise ValueError(f"{name} must be on the inputs' device {device}, got {value.device}")
        else:
            check_number(name, value, low=0, low_open=True)
    if norm_length is not None:
        check_number("norm_length", norm_length, low=0, low_open=True)


@once_per_signature
def check_ppo_args(
    logps, old_logps, advantages, mask, *, loss_type="ppo", ratio_level="token", clip_eps, clip_eps_high,
    dual_clip, sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout_logps=None, is_correction=None, is_clip_min=None,
    is_clip_max=None, top_entropy_quantile=1.0, ref_logps, kl_coef, kl_estimator, entropy, entropy_coef, loss_agg,
    kl_agg=None, entropy_agg=None, total_tokens=None, total_sequences=None, norm_length=None,
) -> PolicyArgs:
    """Validate `ppo_loss` arguments (and the policy part of `policy_loss_from_hidden`)."""
    check_choice("loss_type", loss_type, POLICY_LOSS_TYPES)
    check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    for name, tensor in (("logps", logps), ("old_logps", old_logps), ("advantages", advantages)):
        check_floating(name, tensor)
    if ratio_level == "sequence" and logps.dim() != 2:
        raise ValueError(
            "ratio_level='sequence' (GSPO) takes each sequence's mean log-ratio, so it needs [B, T] inputs "
            f"with one sequence per row; got logps of shape {tuple(logps.shape)}"
        )
    check_ndim("logps", logps, 2, "[B, T]")
    for name, tensor in (("ref_logps", ref_logps), ("entropy", entropy), ("rollout_logps", rollout_logps)):
        if tensor is not None:
            check_floating(name, tensor)
    check_same_shape("logps", logps, old_logps=old_logps, ref_logps=ref_logps, entropy=entropy,
                     rollout_logps=rollout_logps)
    if advantages.shape != logps.shape and advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"advantages must be [B, T] = {tuple(logps.shape)} (per token) or [B] = {tuple(logps.shape[:1])} "
            f"(per sequence), got {tuple(advantages.shape)}"
        )
    check_mask("mask", mask, logps)
    check_same_device(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask,
                      ref_logps=ref_logps, entropy=entropy, rollout_logps=rollout_logps)
    check_positive("clip_eps", clip_eps)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    check_positive("clip_eps_high", clip_eps_high)
    if dual_clip is not None:
        if not dual_clip > 1:
            raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip!r}")
        if loss_type != "ppo":
            raise ValueError(f"dual_clip applies to loss_type='ppo' only, got loss_type={loss_type!r}")
    check_number("sapo_tau_pos", sapo_tau_pos, low=0, low_open=True)
    check_number("sapo_tau_neg", sapo_tau_neg, low=0, low_open=True)
    if is_correction is not None:
        check_choice("is_correction", is_correction, tuple(IS_CORRECTION_ALIASES))
        is_correction = IS_CORRECTION_ALIASES[is_correction]
        if rollout_logps is None:
            raise ValueError(
                f"is_correction={is_correction!r} needs rollout_logps: the [B, T] log-probs the rollout engine "
                "(vLLM, SGLang) reported for the sampled tokens; got rollout_logps=None"
            )
    elif rollout_logps is not None:
        raise ValueError(
            "rollout_logps is only used by an is_correction (e.g. 'token_truncate'); got is_correction=None"
        )
    if is_clip_min is not None:
        check_number("is_clip_min", is_clip_min, low=0)
    if is_clip_max is not None:
        check_number("is_clip_max", is_clip_max, low=0, low_open=True)
    if is_clip_min is not None and is_clip_max is not None and not is_clip_min < is_clip_max:
        raise ValueError(f"is_clip_min must be < is_clip_max, got {is_clip_min!r} and {is_clip_max!r}")
    check_number("top_entropy_quantile", top_entropy_quantile, low=0, high=1)
    if top_entropy_quantile < 1 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 selects tokens by entropy and needs entropy ([B, T]), got None")
    check_non_negative("kl_coef", kl_coef)
    check_non_negative("entropy_coef", entropy_coef)
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("kl_coef > 0 needs ref_logps ([B, T] reference log-probs), got ref_logps=None")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy ([B, T] per-token entropy), got entropy=None")
    check_choice("loss_agg", loss_agg, LOSS_AGGS)
    for name, value in (("kl_agg", kl_agg), ("entropy_agg", entropy_agg)):
        if value is not None:
            check_choice(name, value, LOSS_AGGS)
    check_totals(total_tokens, total_sequences, norm_length, logps.device)
    return PolicyArgs(canonical_kl_estimator("kl_estimator", kl_estimator), clip_eps_high, is_correction)



def check_value_args(values, old_values, returns, mask, *, clip_eps, loss_agg, total_tokens=None,
                     total_sequences=None, norm_length=None) -> None:
    """Validate `value_loss` arguments."""
    for name, tensor in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_floating(name, tensor)
    check_ndim("values", values, 2, "[B, T]")
    check_same_shape("values", values, old_values=old_values, returns=returns)
    check_mask("mask", mask, values)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    check_positive("clip_eps", clip_eps)
    check_choice("loss_agg", loss_agg, LOSS_AGGS)
    check_totals(total_tokens, total_sequences, norm_length, values.device)


# --------------------------------------------------------------------------- advantages

def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")



def check_gae_args(rewards, values, mask, gamma: float, lam: float, skip_masked: bool = True,
                   whiten: bool = False) -> None:
    check_bool("skip_masked", skip_masked)
    check_bool("whiten", whiten)
    check_floating("rewards", rewards)
    check_floating("values", values)
    check_ndim("rewards", rewards, 2, "[B, T]")
    check_same_shape("rewards", rewards, values=values, mask=mask)
    check_mask("mask", mask, rewards)
    check_same_device(rewards=rewards, values=values, mask=mask)
    check_unit_interval("gamma", gamma)
    check_unit_interval("lam", lam)



def check_advantage_args(rewards, mask, values, group_size: int, *, needs_values: bool) -> None:
    """`compute_advantages`'s tensors: [B, T] float rewards, a mask and (gae) values of that shape."""
    check_floating("rewards", rewards)
    check_ndim("rewards", rewards, 2, "[B, T]")
    check_mask("mask", mask, rewards)
    if needs_values and values is None:
        raise ValueError("the 'gae' advantage estimator needs values ([B, T] value predictions), got values=None")
    if values is not None:
        check_floating("values", values)
        check_same_shape("rewards", rewards, values=values)
    check_same_device(rewards=rewards, mask=mask, values=values)
    check_int("group_size", group_size, 1)
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size must divide the batch size B = {rewards.shape[0]} "
            f"(groups are consecutive blocks of group_size rows), got {group_size}"
        )


def check_whiten_args(x, mask, eps: float) -> None:
    check_floating("x", x)
    check_mask("mask", mask, x)
    check_same_device(x=x, mask=mask)
    check_non_negative("eps", eps)



def check_group_args(scores, group_size: int, eps: float, std: str = "sample") -> None:
    check_choice("std", std, GROUP_STD_KINDS)
    check_floating("scores", scores)
    check_ndim("scores", scores, 1, "[B]")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if scores.shape[0] % group_size:
        raise ValueError(
            f"group_size must divide the batch size B = {scores.shape[0]} "
            f"(groups are consecutive blocks of group_size scores), got {group_size}"
        )
    check_non_negative("eps", eps)


# --------------------------------------------------------------------------- preference losses

def check_dpo_args(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
    beta: float, loss_type: str, label_smoothing: float, gamma: float,
) -> None:
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_floating("chosen_logps", chosen_logps)
    check_ndim("chosen_logps", chosen_logps, 1, "[B]")
    check_floating("rejected_logps", rejected_logps)
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        for name, ref in refs.items():
            if ref is not None:
                raise ValueError(f"{name} must be None for the reference-free loss_type={loss_type!r}")
    else:
        for name, ref in refs.items():
            if ref is None:
                raise ValueError(
                    f"{name} is required for loss_type={loss_type!r} "
                    f"(only {REFERENCE_FREE_LOSS_TYPES} are reference-free)"
                )
            check_floating(name, ref)
    check_same_shape("chosen_logps", chosen_logps, rejected_logps=rejected_logps, **refs)
    check_same_device(chosen_logps=chosen_logps, rejected_logps=rejected_logps, **refs)
    check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing must be 0 for loss_type={loss_type!r} "
            f"(it applies to {LABEL_SMOOTHING_LOSS_TYPES}), got {label_smoothing!r}"
        )
    if gamma and loss_type != "simpo":
        raise ValueError(f"gamma must be 0 unless loss_type='simpo', got {gamma!r}")



def check_reward_args(chosen_rewards, rejected_rewards, margin, center_coef: float) -> None:
    check_floating("chosen_rewards", chosen_rewards)
    check_ndim("chosen_rewards", chosen_rewards, 1, "[B]")
    check_floating("rejected_rewards", rejected_rewards)
    check_same_shape("chosen_rewards", chosen_rewards, rejected_rewards=rejected_rewards)
    if isinstance(margin, torch.Tensor):
        check_floating("margin", margin)
        check_same_shape("chosen_rewards", chosen_rewards, margin=margin)
        check_same_device(chosen_rewards=chosen_rewards, margin=margin)
    elif margin is not None and not isinstance(margin, (int, float)):
        raise ValueError(f"margin must be None, a float or a [B] tensor, got {type(margin).__name__}")
    check_same_device(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef!r}")


def check_kto_args(policy_logps, ref_logps, labels, kl, beta: float, desirable_weight: float,
                   undesirable_weight: float, loss_type: str) -> None:
    """`kto_loss`: [B] float log-probs, bool labels, the reference point kl (a number or a
    one-element float tensor on the inputs' device) for "kto", none for "apo_zero_unpaired"."""
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_floating("policy_logps", policy_logps)
    check_ndim("policy_logps", policy_logps, 1, "[B]")
    check_floating("ref_logps", ref_logps)
    check_same_shape("policy_logps", policy_logps, ref_logps=ref_logps)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a bool torch.Tensor [B] (True = desirable), got {type(labels).__name__}")
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor [B] (True = desirable), got dtype {labels.dtype}")
    check_same_shape("policy_logps", policy_logps, labels=labels)
    check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    if loss_type == "apo_zero_unpaired":
        if kl is not None:
            raise ValueError("kl must be None for loss_type='apo_zero_unpaired' (its reference point is 0), "
                             f"got {kl!r}")
    elif kl is None:
        raise ValueError("kl is required for loss_type='kto': the reference point z0, a float or a one-element "
                         "tensor (e.g. fastrlhf.kto_kl(policy_kl_logps, ref_kl_logps))")
    elif isinstance(kl, torch.Tensor):
        if kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(f"kl must be a number or a one-element float tensor, got a tensor of shape "
                             f"{tuple(kl.shape)} and dtype {kl.dtype}")
        if kl.device != policy_logps.device:
            raise ValueError(f"kl must be on the inputs' device {policy_logps.device}, got {kl.device}")
    elif isinstance(kl, bool) or not isinstance(kl, numbers.Real):
        raise ValueError(f"kl must be a number or a one-element float tensor, got {type(kl).__name__}")
    check_number("beta", beta, low=0, low_open=True)
    check_number("desirable_weight", desirable_weight, low=0)
    check_number("undesirable_weight", undesirable_weight, low=0)


def check_kto_kl_args(policy_kl_logps, ref_kl_logps) -> None:
    check_floating("policy_kl_logps", policy_kl_logps)
    check_ndim("policy_kl_logps", policy_kl_logps, 1, "[B]")
    check_floating("ref_kl_logps", ref_kl_logps)
    check_same_shape("policy_kl_logps", policy_kl_logps, ref_kl_logps=ref_kl_logps)
    check_same_device(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)


def check_sequence_logps_args(logps, mask) -> None:
    check_floating("logps", logps)
    check_ndim("logps", logps, 2, "[B, T]")
    check_same_device(logps=logps, mask=mask)
    check_mask("mask", mask, logps)
