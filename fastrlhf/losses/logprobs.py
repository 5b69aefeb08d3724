"""Token log-probabilities (and entropy) from logits or straight from hidden states.

`token_logprobs` is the fused linear path: the `[N, V]` logits never exist. Rows go through in
chunks; per chunk, cuBLAS makes `[chunk, V]` fp32 logits and one Triton row kernel reduces them
to logp / logsumexp / entropy. Backward recomputes the logits, the kernel overwrites them with
d loss / d logits, and two matmuls turn that into the hidden and weight gradients: in row chunks
when the weight is frozen (or N >= V), else in vocab tiles of all N rows, which write each slice
of the weight gradient once instead of adding every row chunk into an fp32 `[V, H]` accumulator
(`_backward_over_vocab` says why). Peak extra memory: one chunk's fp32 logits (plus their
low-precision d logits for bf16/fp16 weights), and an fp32 `[N, H]` hidden-gradient accumulator
on the vocab-tile path.

`softcap=c` (Gemma 2's final_logit_softcapping) caps the logits, c·tanh(x / c), inside the row
kernels as they read them, forward and backward (vocab tiles too: the cap is elementwise); the
logits in memory stay raw, so no extra buffer and no extra pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrlhf._checks import (
    check_hidden_args,
    check_logits_args,
    check_softcap,
    predicts_next,
)
from fastrlhf._dispatch import resolve_backend
from fastrlhf._dtypes import compute_dtype
from fastrlhf.contracts import IGNORE_INDEX
from fastrlhf.losses._autograd import first_order_only
from fastrlhf.twins import logprobs as twin
from fastrlhf.twins.logprobs import CHUNK_BYTES_CPU, CHUNK_BYTES_CUDA, no_autocast

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


class _LogprobsFromLogitsFunction(torch.autograd.Function):
    """logits `[N, V]` or `[G, R, V]` -> logps `[N]` (+ entropy `[N]`); backward writes a new
    contiguous gradient shaped like the logits.

    `next_token=True`: the logits are `[..., T+1, V]` and the rows read are `logits[..., :-1, :]`.
    The gradient is then written straight into a `[..., T+1, V]` buffer (zero last position): had
    the caller sliced `logits[:, :-1]` itself, autograd's slice backward would allocate a second
    full-size zero tensor and copy the whole gradient into it."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, return_entropy, next_token, softcap):
        kernels = _kernels()
        rows = kernels.rows_view(logits[..., :-1, :]) if next_token else logits
        logps, lse, entropy = kernels.logprobs_forward(
            rows, targets, temperature=temperature, softcap=softcap, compute_entropy=return_entropy
        )
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.next_token, ctx.softcap = temperature, next_token, softcap
        ctx.set_materialize_grads(False)
        return (logps, entropy) if return_entropy else logps

    @staticmethod
    @first_order_only("logprobs_from_logits")
    def backward(ctx, grad_logps, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None, None, None
        kernels = _kernels()
        rows, out, dlogits = logits, None, None
        if ctx.next_token:
            rows = kernels.rows_view(logits[..., :-1, :])
            dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            dlogits[..., -1, :].zero_()
            out = kernels.rows_view(dlogits[..., :-1, :])
            assert out.data_ptr() == dlogits.data_ptr(), "a view of a contiguous buffer, never a copy"
        grad = kernels.logprobs_backward(
            rows, targets, lse, entropy, grad_logps, grad_entropy, temperature=ctx.temperature,
            softcap=ctx.softcap, out=out,
        )
        return (grad if dlogits is None else dlogits), None, None, None, None, None


def _spans(n: int, chunk: int):
    """[start, end) pieces of range(n), `chunk` long (the last one shorter)."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _rows(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of `hidden` ([N, H], or [G, R, H] read as N = G * R rows) as a matrix:
    a view for [N, H], else a copy of just these rows. `hidden[:, :-1]` of a [B, T, H] batch does
    not flatten, and flattening it whole would copy N x H and keep the copy alive until backward."""
    if hidden.dim() == 2:
        return hidden[start:end]
    R = hidden.shape[1]
    parts = [hidden[g, max(start - g * R, 0):min(end - g * R, R)] for g in range(start // R, (end - 1) // R + 1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _logits_budget(chunk_size: int | None, vocab: int, device: torch.device) -> int:
    """Bytes of fp32 logits one chunk may take, row chunk or vocab tile alike: `chunk_size` rows of
    the vocabulary when given, else CHUNK_BYTES_CUDA / CHUNK_BYTES_CPU."""
    if chunk_size is not None:
        return chunk_size * vocab * 4
    return CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU


def _row_chunk(budget: int, vocab: int) -> int:
    """Rows per row chunk: as many as keep their [rows, V] fp32 logits within `budget`."""
    return max(1, budget // (4 * vocab))


def _vocab_tile(n_rows: int, vocab: int, budget: int) -> int:
    """Columns per vocab tile: as many as keep the [N, Vc] fp32 logits within `budget`, a multiple
    of 128 (at least 128: a tile of N x 128 is still far below N x V), at most V."""
    width = budget // (4 * max(n_rows, 1)) // 128 * 128
    return min(max(width, 128), vocab)


def _backward_over_vocab(n_rows: int, vocab: int, need_weight: bool) -> bool:
    """Whether backward runs over vocab tiles instead of row chunks.

    With the same logits budget both loops have the same number of chunks (rows x V = N x Vc);
    what differs is the fp32 accumulator each chunk reads and writes once: [V, H] (the weight
    gradient, 8 V H bytes per row chunk) for row chunks, [N, H] (the hidden gradient) for vocab
    tiles, whose weight-gradient slices are each written once by one GEMM. So vocab tiles move
    N / V of the bytes when the weight needs a gradient and N < V. Without a weight gradient
    (LoRA with a frozen lm_head) row chunks need no accumulator at all and keep the hidden
    states as they come (no [N, H] copy).
    """
    return need_weight and n_rows < vocab


def _dlogits(logits, weight_dtype, upstream, rows, scaling, col_start=0):
    """d loss / d logits of `logits` (rows `rows` of the batch; vocab columns from `col_start`) in
    the weight's dtype, for the matmuls: written over the logits when that is their dtype.
    `scaling` = (temperature, softcap); the cap is elementwise, so a vocab tile caps like a row."""
    temperature, softcap = scaling
    targets, lse, entropy, grad_logps, grad_entropy = (None if t is None else t[rows] for t in upstream)
    out = logits if logits.dtype == weight_dtype else torch.empty_like(logits, dtype=weight_dtype)
    return _kernels().logprobs_backward(
        logits, targets, lse, entropy, grad_logps, grad_entropy,
        temperature=temperature, softcap=softcap, out=out, col_start=col_start,
    )


def _counted_rows(hidden_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`hidden_rows` [n, H] with the rows of ignored targets set to 0, for the weight-gradient GEMM:
    their d logits rows are 0, but 0 * NaN = NaN, so a NaN/inf hidden row (padding) would otherwise
    make the whole weight gradient non-finite."""
    return hidden_rows.masked_fill((targets == IGNORE_INDEX).unsqueeze(-1), 0)


def _backward_row_chunks(hidden, weight, bias, upstream, scaling, budget, need):
    """(d hidden, d weight, d bias) one row chunk at a time: each chunk adds its share of the
    weight gradient to an fp32 [V, H] accumulator."""
    need_hidden, need_weight, need_bias = need
    grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype) if need_hidden else None
    grad_hidden_rows = grad_hidden.view(-1, hidden.shape[-1]) if need_hidden else None
    # fp32 accumulators: bf16 weights would otherwise round the running sum once per chunk.
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=compute_dtype(weight.dtype)) if need_weight else None
    grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=compute_dtype(bias.dtype)) if need_bias else None
    n_rows = hidden.shape[:-1].numel()
    for start, end in _spans(n_rows, _row_chunk(budget, weight.shape[0])):
        rows = slice(start, end)
        hidden_rows = _rows(hidden, start, end)
        # The fp32 logits are a temporary: only one [chunk, V] buffer outlives the kernel call.
        dlogits = _dlogits(_chunk_logits(hidden_rows, weight, bias), weight.dtype, upstream, rows, scaling)
        if need_hidden:
            torch.mm(dlogits, weight, out=grad_hidden_rows[rows])
        if need_weight:
            _accumulate_matmul(grad_weight, dlogits.t(), _counted_rows(hidden_rows, upstream[0][rows]))
        if need_bias:
            grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)
        del dlogits, hidden_rows
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


def _backward_vocab_tiles(hidden, weight, bias, upstream, scaling, budget, need):
    """(d hidden, d weight, d bias) one vocab tile [v0, v1) at a time, for all rows at once:

        logits  = hidden @ W[v0:v1].T            fp32 [N, Vc], lse / entropy saved by forward
        dW[v0:v1] = dlogits.T @ hidden           one GEMM straight into the weight dtype
        dH       += dlogits @ W[v0:v1]           fp32 [N, H] accumulator

    No fp32 [V, H] accumulator: each weight-gradient row is written once. Bytes for N = 16384,
    V = 151936, H = 4096 bf16 (256 MiB tiles: Vc = 4096, 38 tiles vs 38 row chunks): accumulator
    traffic ~190 GB -> ~20 GB (38 x 2 x 268 MB of [N, H] fp32 instead of 38 x 2 x 2.5 GB of [V, H]),
    peak memory ~2.1-2.3 GB lower (the 2.5 GB fp32 [V, H] buffer goes, a 268 MB fp32 [N, H] one
    comes, plus a 134 MB copy of hidden when it is a strided view). The benchmark rows of
    token_logprobs (benchmarks/results) say what a GPU measured.
    """
    need_hidden, need_weight, need_bias = need
    n_rows, (vocab, dim) = hidden.shape[:-1].numel(), weight.shape
    # All rows as one [N, H] matrix, ignored rows zeroed for the weight-gradient GEMM: one copy of
    # N x H, small next to the V x H weight gradient it replaces.
    hidden_all = hidden.reshape(n_rows, dim)
    if need_weight:
        hidden_all = _counted_rows(hidden_all, upstream[0])
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_hidden = torch.zeros(n_rows, dim, device=hidden.device, dtype=compute_dtype(hidden.dtype)) if need_hidden else None
    grad_bias = torch.empty(bias.shape, device=bias.device, dtype=compute_dtype(bias.dtype)) if need_bias else None
    for v0, v1 in _spans(vocab, _vocab_tile(n_rows, vocab, budget)):
        cols = slice(v0, v1)
        logits = _chunk_logits(hidden_all, weight[cols], None if bias is None else bias[cols])
        dlogits = _dlogits(logits, weight.dtype, upstream, slice(None), scaling, col_start=v0)
        del logits  # only one [N, Vc] buffer stays alive for the matmuls
        if need_weight:
            torch.mm(dlogits.t(), hidden_all, out=grad_weight[cols])
        if need_hidden:
            _accumulate_matmul(grad_hidden, dlogits, weight[cols])
        if need_bias:
            torch.sum(dlogits, 0, dtype=grad_bias.dtype, out=grad_bias[cols])
        del dlogits
    return (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype).view(hidden.shape),
        grad_weight,
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class _TokenLogprobsFunction(torch.autograd.Function):
    """hidden `[N, H]` or `[G, R, H]`, weight `[V, H]`, bias `[V]` -> logps `[N]` (+ entropy).

    Forward goes one row chunk at a time. Backward recomputes the logits, in row chunks or, when
    the weight needs a gradient and N < V, in vocab tiles (`_backward_over_vocab`); both keep one
    chunk's fp32 logits within `budget` bytes.

    Autocast is off inside: the matmul precision follows the input dtypes, and the logits
    recomputed in backward must match the forward ones (the same fp32 GEMM; a vocab tile's GEMM
    may differ from the forward's in the last bits, which the saved lse absorbs harmlessly).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, return_entropy, budget, softcap):
        kernels = _kernels()
        n_rows = hidden.shape[:-1].numel()
        logps = torch.empty(n_rows, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if return_entropy else None
        with no_autocast(hidden.device):
            for start, end in _spans(n_rows, _row_chunk(budget, weight.shape[0])):
                logits = _chunk_logits(_rows(hidden, start, end), weight, bias)
                kernels.logprobs_forward(
                    logits, targets[start:end], temperature=temperature, softcap=softcap,
                    compute_entropy=return_entropy,
                    out=(logps[start:end], lse[start:end], entropy[start:end] if return_entropy else None),
                )
                del logits  # free before the next chunk's is made
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.scaling, ctx.budget = (temperature, softcap), budget
        ctx.set_materialize_grads(False)
        return (logps, entropy) if return_entropy else logps

    @staticmethod
    @first_order_only("token_logprobs")
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logps is None and grad_entropy is None:
            return (None,) * 8
        need = ctx.needs_input_grad[:3]
        upstream = (targets, lse, entropy, grad_logps, grad_entropy)
        over_vocab = _backward_over_vocab(hidden.shape[:-1].numel(), weight.shape[0], need[1])
        backward = _backward_vocab_tiles if over_vocab else _backward_row_chunks
        with no_autocast(hidden.device):
            grads = backward(hidden, weight, bias, upstream, ctx.scaling, ctx.budget, need)
        return (*grads, None, None, None, None, None)


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
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token under `softmax(cap(logits) / temperature)`.

    Args:
        logits: `[..., V]` (e.g. `[B, T, V]`), fp32/bf16/fp16; read in one pass with an online
            logsumexp, in fp32. Or the model's logits as they are, `[..., T+1, V]`, with targets
            `[..., T]` (= input_ids[..., 1:]): the last position is skipped, and backward writes
            the gradient for all T+1 positions in one buffer. Prefer that to `logits[:, :-1]`,
            whose slice backward costs a second logits-sized gradient and a full copy.
        targets: `[...]` integer token ids in `[0, V)`; `-100` marks ignored positions.
        temperature: > 0; the (capped) logits are divided by it.
        return_entropy: also return the entropy of `softmax(cap(logits) / temperature)`.
        softcap: c > 0 applies Gemma-2-style soft-capping, cap(x) = c·tanh(x / c), to the logits
            before the temperature (the model's `config.final_logit_softcapping`); None or 0: none.
            Pass it only for raw lm_head outputs, not for logits the model has already capped.
        backend: "auto" | "triton" | "torch".

    Returns:
        logps `[...]` fp32 (<= 0; 0 where targets == -100), or `(logps, entropy)`, both
        differentiable with respect to `logits`; ignored positions get no gradient.
    """
    check_logits_args(logits, targets, temperature, softcap)
    softcap = check_softcap(softcap)
    if resolve_backend(backend, logits, targets) == "torch":
        return twin.logprobs_from_logits(
            logits, targets, temperature=temperature, return_entropy=return_entropy, softcap=softcap
        )
    flat_targets = targets.reshape(-1).contiguous()
    if predicts_next(logits, targets):
        out = _LogprobsFromLogitsFunction.apply(logits, flat_targets, float(temperature), return_entropy, True, softcap)
    else:
        # A view for the kernels whenever strides allow (logits[:, :-1] included): no copy of [N, V].
        rows = _kernels().rows_view(logits)
        out = _LogprobsFromLogitsFunction.apply(rows, flat_targets, float(temperature), return_entropy, False, softcap)
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
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token straight from hidden states, without `[N, V]` logits.

    Computes `log_softmax(cap(hidden @ weight.T + bias) / temperature)[targets]` in row chunks:
    memory is O(chunk_size * V), not O(N * V); backward recomputes each chunk's logits.

    Args:
        hidden: `[N, H]` or `[B, T, H]` final hidden states, fp32/bf16/fp16.
        weight: `[V, H]` LM head weight, same dtype as hidden (any V, no padding needed).
        targets: `[N]` or `[B, T]` (hidden's leading shape) integer token ids in `[0, V)`;
            `-100` marks ignored positions (logp 0, entropy 0, no gradient). The value range is
            checked (ValueError) only for CPU tensors; on CUDA that check would cost a host sync,
            so an out-of-range target gives logp NaN instead.
        bias: optional `[V]` LM head bias.
        temperature: > 0; the (capped) logits are divided by it.
        return_entropy: also return the entropy of each row's softmax.
        chunk_size: rows per chunk (default: as many as keep one chunk's fp32 logits under
            256 MiB on CUDA, 32 MiB on CPU). When the weight needs a gradient and there are
            fewer rows than vocabulary entries, backward goes over vocab tiles of all rows
            instead, within the same logits budget (chunk_size x V x 4 bytes).
        softcap: c > 0 applies Gemma-2-style soft-capping, cap(x) = c·tanh(x / c), to the logits
            (after the bias, before the temperature), as `config.final_logit_softcapping` models
            do; None or 0: no cap.
        backend: "auto" | "triton" | "torch".

    Returns:
        logps shaped like targets, fp32 (<= 0), or `(logps, entropy)`; differentiable with respect
        to hidden, weight and bias. Logits and their sums are fp32 for bf16/fp16 inputs.
    """
    check_hidden_args(hidden, weight, targets, bias, temperature, chunk_size, softcap)
    softcap = check_softcap(softcap)
    if resolve_backend(backend, hidden, weight, targets, bias) == "torch":
        return twin.token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature,
            return_entropy=return_entropy, chunk_size=chunk_size, softcap=softcap,
        )
    out = _TokenLogprobsFunction.apply(
        _kernels().rows_view(hidden),  # no copy of hidden[:, :-1]-style views (see _rows)
        weight, bias, targets.reshape(-1).contiguous(),
        float(temperature), return_entropy, _logits_budget(chunk_size, weight.shape[0], hidden.device), softcap,
    )
    return _reshape_outputs(out, targets.shape, return_entropy)
