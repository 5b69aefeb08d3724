"""Token log-probabilities (and entropy) from logits or straight from hidden states.

`token_logprobs` is the fused linear path: the `[N, V]` logits never exist. Rows go through in
chunks; per chunk, cuBLAS makes `[chunk, V]` fp32 logits and one Triton row kernel reduces them
to logp / logsumexp / entropy. Backward recomputes each chunk's logits, the kernel overwrites
them with d loss / d logits, and two matmuls turn that into the hidden and weight gradients.
Peak extra memory: one `[chunk, V]` buffer (plus its low-precision copy for bf16/fp16 weights)
and, when the weight needs a gradient, an fp32 `[V, H]` accumulator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf._dispatch import resolve_backend
from fastrlhf._dtypes import compute_dtype
from fastrlhf.reference import logprobs as reference
from fastrlhf.reference.logprobs import (
    default_chunk_size,
    no_autocast,
    validate_hidden_args,
    validate_logits_args,
)

__all__ = ["token_logprobs", "logprobs_from_logits"]


def _kernels():
    # Imported on first Triton use only: `import fastrlhf` must not need triton.
    from fastrlhf.kernels import logprobs as kernels

    return kernels


# --------------------------------------------------------------------------- fp32-output matmuls

# aten::mm / aten::addmm with out_dtype (bf16/fp16 in, fp32 out) exist on CUDA only, in recent torch.
# Each flag turns off for the process the first time its op is refused.
_fp32_out_ok = {"mm": hasattr(torch.ops.aten.mm, "dtype"), "addmm": hasattr(torch.ops.aten.addmm, "dtype")}


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`hidden @ weight.T + bias` as fp32 `[rows, V]` (fp64 for fp64 inputs).

    bf16/fp16 inputs: on CUDA a gemm with fp32 output, so the logits are not rounded to bf16; on
    CPU exact upcasting (fp32 gemm is the fast CPU path anyway). Only on CUDA without such a gemm
    are the logits rounded, as the model's own lm_head would round them.
    """
    dtype = compute_dtype(weight.dtype)
    logits = None
    if weight.dtype == dtype:
        logits = F.linear(hidden, weight)
    elif hidden.is_cuda and _fp32_out_ok["mm"]:
        try:
            logits = torch.mm(hidden, weight.t(), out_dtype=dtype)
        except (RuntimeError, TypeError):
            _fp32_out_ok["mm"] = False
    if logits is None:
        logits = F.linear(hidden, weight).to(dtype) if hidden.is_cuda else F.linear(hidden.to(dtype), weight.to(dtype))
    if bias is not None:
        logits += bias.to(dtype)
    return logits


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` with `acc` fp32 and `a, b` possibly bf16/fp16, summing in fp32 across calls."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _fp32_out_ok["addmm"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _fp32_out_ok["addmm"] = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))  # temporaries of a's and b's size: one chunk


# --------------------------------------------------------------------------- autograd functions


class _LogprobsFromLogits(torch.autograd.Function):
    """logits `[N, V]` or `[G, R, V]` -> logps `[N]` (+ entropy `[N]`); backward writes a new
    contiguous gradient shaped like the logits."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy):
        logps, lse, entropy = _kernels().logprobs_forward(
            logits, targets, temperature=temperature, compute_entropy=return_entropy
        )
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return (logps, entropy) if return_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None
        dlogits = _kernels().logprobs_backward(
            logits, targets, lse, entropy, grad_logps, grad_entropy, temperature=ctx.temperature
        )
        return dlogits, None, None, None


def _row_chunks(n_rows: int, chunk: int):
    return [(start, min(start + chunk, n_rows)) for start in range(0, n_rows, chunk)]


def _rows(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of `hidden` ([N, H], or [G, R, H] read as N = G * R rows) as a matrix:
    a view for [N, H], else a copy of just these rows. `hidden[:, :-1]` of a [B, T, H] batch does
    not flatten, and flattening it whole would copy N x H and keep the copy alive until backward."""
    if hidden.dim() == 2:
        return hidden[start:end]
    R = hidden.shape[1]
    parts = [hidden[g, max(start - g * R, 0):min(end - g * R, R)] for g in range(start // R, (end - 1) // R + 1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _FusedLinearLogprobs(torch.autograd.Function):
    """hidden `[N, H]` or `[G, R, H]`, weight `[V, H]`, bias `[V]` -> logps `[N]` (+ entropy), one
    row chunk at a time.

    Autocast is off inside: the matmul precision follows the input dtypes, and the logits
    recomputed in backward must be bit-identical to the forward ones.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, chunk):
        kernels = _kernels()
        n_rows = hidden.shape[:-1].numel()
        logps = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if return_entropy else None
        with no_autocast(hidden.device):
            for start, end in _row_chunks(n_rows, chunk):
                logits = _chunk_logits(_rows(hidden, start, end), weight, bias)
                kernels.logprobs_forward(
                    logits, targets[start:end], temperature=temperature, compute_entropy=return_entropy,
                    out=(logps[start:end], lse[start:end], entropy[start:end] if return_entropy else None),
                )
                del logits  # free before the next chunk's is made
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)
        return (logps, entropy) if return_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None and grad_entropy is None:
            return (None,) * 7
        kernels = _kernels()
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_hidden else None
        grad_hidden_rows = grad_hidden.view(-1, hidden.shape[-1]) if need_hidden else None
        # fp32 accumulators: bf16 weights would otherwise round the running sum once per chunk.
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=compute_dtype(weight.dtype)) if need_weight else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=compute_dtype(bias.dtype)) if need_bias else None
        with no_autocast(hidden.device):
            for start, end in _row_chunks(hidden.shape[:-1].numel(), ctx.chunk):
                rows = slice(start, end)
                hidden_rows = _rows(hidden, start, end)
                logits = _chunk_logits(hidden_rows, weight, bias)
                # d logits in the weight's dtype for the matmuls; in place when that is the logits' dtype.
                out = logits if logits.dtype == weight.dtype else torch.empty_like(logits, dtype=weight.dtype)
                dlogits = kernels.logprobs_backward(
                    logits, targets[rows], lse[rows], None if entropy is None else entropy[rows],
                    None if grad_logps is None else grad_logps[rows],
                    None if grad_entropy is None else grad_entropy[rows],
                    temperature=ctx.temperature, out=out,
                )
                del logits, out  # dlogits may be the same buffer; only one [chunk, V] stays alive
                if need_hidden:
                    torch.mm(dlogits, weight, out=grad_hidden_rows[rows])
                if need_weight:
                    _accumulate_matmul(grad_weight, dlogits.t(), hidden_rows)
                if need_bias:
                    grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)
                del dlogits, hidden_rows
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )


# --------------------------------------------------------------------------- public API


def _reshape_outputs(out, shape: torch.Size, return_entropy: bool):
    if return_entropy:
        return out[0].reshape(shape), out[1].reshape(shape)
    return out.reshape(shape)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under `softmax(logits / temperature)`.

    Args:
        logits: `[..., V]` (e.g. `[B, T, V]`), fp32/bf16/fp16; read in one pass with an online
            logsumexp, in fp32.
        targets: `[...]` integer token ids in `[0, V)`; `-100` marks ignored positions.
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy of `softmax(logits / temperature)`.
        backend: "auto" | "triton" | "torch".

    Returns:
        logps `[...]` fp32 (<= 0; 0 where targets == -100), or `(logps, entropy)`, both
        differentiable with respect to `logits`; ignored positions get no gradient.
    """
    validate_logits_args(logits, targets, temperature)
    if resolve_backend(backend, logits, targets) == "torch":
        return reference.logprobs_from_logits(
            logits, targets, temperature=temperature, return_entropy=return_entropy
        )
    # A view for the kernels whenever strides allow (logits[:, :-1] included): no copy of [N, V].
    rows = _kernels().rows_view(logits)
    out = _LogprobsFromLogits.apply(rows, targets.reshape(-1).contiguous(), float(temperature), return_entropy)
    return _reshape_outputs(out, targets.shape, return_entropy)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token straight from hidden states, without `[N, V]` logits.

    Computes `log_softmax((hidden @ weight.T + bias) / temperature)[targets]` in row chunks:
    memory is O(chunk_size * V), not O(N * V); backward recomputes each chunk's logits.

    Args:
        hidden: `[N, H]` or `[B, T, H]` final hidden states, fp32/bf16/fp16.
        weight: `[V, H]` LM head weight, same dtype as hidden (any V, no padding needed).
        targets: `[N]` or `[B, T]` (hidden's leading shape) integer token ids in `[0, V)`;
            `-100` marks ignored positions (logp 0, entropy 0, no gradient). The value range is
            checked (ValueError) only for CPU tensors; on CUDA that check would cost a host sync,
            so an out-of-range target gives logp NaN instead.
        bias: optional `[V]` LM head bias.
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy of each row's softmax.
        chunk_size: rows per chunk (default: as many as keep one chunk's fp32 logits under
            256 MiB on CUDA, 32 MiB on CPU).
        backend: "auto" | "triton" | "torch".

    Returns:
        logps shaped like targets, fp32 (<= 0), or `(logps, entropy)`; differentiable with respect
        to hidden, weight and bias. Logits and their sums are fp32 for bf16/fp16 inputs.
    """
    validate_hidden_args(hidden, weight, targets, bias, temperature, chunk_size)
    if resolve_backend(backend, hidden, weight, targets, bias) == "torch":
        return reference.token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            return_entropy=return_entropy, chunk_size=chunk_size,
        )
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    out = _FusedLinearLogprobs.apply(
        _kernels().rows_view(hidden),  # no copy of hidden[:, :-1]-style views (see _rows)
        weight, bias, targets.reshape(-1).contiguous(),
        float(temperature), return_entropy, chunk,
    )
    return _reshape_outputs(out, targets.shape, return_entropy)
