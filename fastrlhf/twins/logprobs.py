"""Token log-probabilities in plain PyTorch: the ground truth for `fastrlhf.losses.logprobs`.

    z[n]       = cap(logits[n]) / temperature,   cap(x) = c·tanh(x / c) with c = softcap, else x
    logps[n]   = log_softmax(z[n])[targets[n]]                          (clamped to <= 0)
    entropy[n] = -sum_v p[n, v] log p[n, v],  p = softmax(z[n])

The soft-cap is Gemma 2's final_logit_softcapping: the model scores with capped logits, so its
log-probs must be taken after the cap too.

`targets == -100` (IGNORE_INDEX) gives logp 0, entropy 0 and no gradient. Computation is fp32
for fp32/bf16/fp16 inputs (fp64 stays fp64, for gradcheck).

The public functions in `fastrlhf.losses.logprobs` check the arguments (`fastrlhf._checks`)
before they call these; called directly, these trust their inputs (softcap None or > 0).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastrlhf._checks import predicts_next
from fastrlhf._dtypes import compute_dtype
from fastrlhf.contracts import IGNORE_INDEX

# A row chunk's logits take at most this many bytes (fp32): the memory bound of token_logprobs.
CHUNK_BYTES_CUDA = 256 * 2**20
CHUNK_BYTES_CPU = 32 * 2**20


# --------------------------------------------------------------------------- chunking and precision


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
    """The PyTorch twin of `fastrlhf.logprobs_from_logits`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).
    """
    if predicts_next(logits, targets):
        logits = logits[..., :-1, :]
    logits = logits.to(compute_dtype(logits.dtype))
    ignored = targets == IGNORE_INDEX
    # Ignored rows are never used: zeroed, so NaN/inf there gets no (NaN) gradient through log_softmax.
    logits = logits.masked_fill(ignored.unsqueeze(-1), 0.0)
    if softcap:  # None or 0: no cap
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
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
    # Rows of ignored targets are zeroed: 0 * NaN would carry a NaN/inf row into the weight gradient.
    hidden = hidden.masked_fill((targets == IGNORE_INDEX).unsqueeze(-1), 0)
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
    """The PyTorch twin of `fastrlhf.token_logprobs`: same arguments (minus `backend`), same results and
    metrics (see its docstring), computed op by op; float64 inputs stay float64 (gradcheck).

    Rows go `chunk_size` at a time under activation checkpointing, so no `N x V` logits
    tensor exists at any moment, forward or backward (each chunk is recomputed in backward).
    """
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
