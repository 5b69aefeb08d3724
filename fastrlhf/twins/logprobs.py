"""Token log-probabilities in plain PyTorch: the ground truth for `fastrlhf.losses.logprobs`.

    z[n]       = cap(logits[n]) / temperature,   cap(x) = c·tanh(x / c) with c = softcap, else x
    logps[n]   = log_softmax(z[n])[targets[n]]                          (clamped to <= 0)
    entropy[n] = -sum_v p[n, v] log p[n, v],  p = softmax(z[n])

The soft-cap is Gemma 2's final_logit_softcapping: the model scores with capped logits, so its
log-probs must be taken after the cap too.

`targets == -100` (IGNORE_INDEX) gives logp 0, entropy 0 and no gradient. Computation is fp32
for fp32/bf16/fp16 inputs (fp64 stays fp64, for gradcheck).

The argument checks for both backends live here too (`validate_*`), so the two paths reject
exactly the same inputs.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastrlhf._checks import check_floating, check_positive, check_same_device
from fastrlhf._dtypes import compute_dtype

IGNORE_INDEX = -100

# A row chunk's logits take at most this many bytes (fp32): the memory bound of token_logprobs.
CHUNK_BYTES_CUDA = 256 * 2**20
CHUNK_BYTES_CPU = 32 * 2**20


# --------------------------------------------------------------------------- argument checks


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


def validate_logits_args(
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


def validate_hidden_args(
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


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk such that one chunk's fp32 logits stay under CHUNK_BYTES_{CUDA,CPU}."""
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    return max(1, budget // (4 * vocab_size))


def no_autocast(device: torch.device):
    """Autocast off: the precision here follows the input dtypes (fp32 logits even for bf16
    inputs), and forward and recomputed backward logits must be bit-identical."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- reference functions


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets [...]` under `softmax(cap(logits [..., V]) / temperature)`, with
    cap(x) = softcap·tanh(x / softcap) (no cap for None / 0); also the next-token layout
    `logits [..., T+1, V]`, `targets [..., T]` (see `predicts_next`).

    Returns logps `[...]` (fp32), and entropy `[...]` too if `return_entropy`.
    """
    validate_logits_args(logits, targets, temperature, softcap)
    softcap = check_softcap(softcap)
    if predicts_next(logits, targets):
        logits = logits[..., :-1, :]
    logits = logits.to(compute_dtype(logits.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    ignored = targets == IGNORE_INDEX
    safe_targets = targets.masked_fill(ignored, 0).long().unsqueeze(-1)
    logps = log_probs.gather(-1, safe_targets).squeeze(-1)
    logps = logps.clamp(max=0.0).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logps
    probs = log_probs.exp()
    # -inf logits (a masked vocabulary) have p = 0 and contribute 0 (not 0 * -inf = NaN).
    entropy = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)
    return logps, entropy.masked_fill(ignored, 0.0)


def _chunk_logprobs(hidden, weight, bias, targets, temperature, return_entropy, softcap):
    dtype = compute_dtype(hidden.dtype)
    with no_autocast(hidden.device):
        logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return logprobs_from_logits(logits, targets, temperature=temperature, return_entropy=return_entropy,
                                softcap=softcap)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets` under the LM head: `log_softmax(cap(hidden @ weight.T + bias) / temperature)`,
    cap(x) = softcap·tanh(x / softcap) (no cap for None / 0).

    hidden `[N, H]` (or `[B, T, H]`), weight `[V, H]`, targets `[N]` (or `[B, T]`), bias `[V]`.
    Returns logps shaped like targets (fp32), and entropy too if `return_entropy`.

    Rows are processed `chunk_size` at a time under activation checkpointing, so no `N x V`
    logits tensor exists at any moment, forward or backward (each chunk is recomputed in backward).
    """
    validate_hidden_args(hidden, weight, targets, bias, temperature, chunk_size, softcap)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    pieces = []
    # An empty batch still runs one (empty) chunk, so the result stays attached to the graph.
    for start in range(0, max(flat_hidden.shape[0], 1), chunk):
        args = (flat_hidden[start:start + chunk], weight, bias, flat_targets[start:start + chunk],
                temperature, return_entropy, softcap)
        out = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if needs_grad else _chunk_logprobs(*args)
        pieces.append(out if return_entropy else (out,))
    outs = [torch.cat(parts).reshape(targets.shape) for parts in zip(*pieces)]
    return tuple(outs) if return_entropy else outs[0]
