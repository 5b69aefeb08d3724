"""Row kernels for token log-probabilities over a logits matrix `[N, V]` (no autograd here).

Forward, one program per row, one streaming pass over V in BLOCK_V chunks with an online
(max, sum-exp, sum-exp·shifted-logit) triple:

    z = cap(logits) / temperature     (fp32, whatever the storage dtype)
    lse      = logsumexp(z)
    logp     = min(z[target] - lse, 0)          (<= 0 always, by construction and by clamp)
    entropy  = -sum p log p = log(s) - t / s    with s = sum exp(z - m), t = sum exp(z - m)·(z - m)

`entropy = log(s) - t/s` is computed relative to the running max m, so it never subtracts two
large numbers (lse - sum p·z would cancel catastrophically for logits of scale 1e4).

Backward, one program per row, one pass over V, given the upstream grads g (of logp) and
gh (of entropy) and the saved lse and entropy:

    d logp    / d z_j = 1[j = target] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)       (= -p_j (z_j - sum_k p_k z_k))
    d logits_j        = (g (1[j = target] - p_j) - gh p_j (log p_j + entropy)) / temperature

Soft-capping (Gemma 2's final_logit_softcapping, HAS_SOFTCAP): cap(x) = c·tanh(x / c), applied
to the logits as they are read, before the temperature; otherwise cap(x) = x. Backward then
multiplies by d cap / dx = 1 - tanh²(x / c). A capped -inf logit is -c (as in the model itself),
and a NaN logit stays NaN through the cap.

It may write its result over the logits it reads (`out=logits`), which the fused linear path
uses to keep only one `[chunk, V]` buffer alive; a bf16/fp16 gradient of fp32 logits can go over
them too, as `dlogits_view` lays it out (the fused RL head does; see `_write_row_dlogits`).

Because lse and entropy come saved from the forward, backward needs no reduction over the row:
it can run on a vocab tile, columns [col_start, col_start + width) of every row (`col_start`,
targets stay full-vocabulary ids). The fused linear path uses that to produce the weight gradient
one vocab slice at a time (see `fastrlhf.losses.logprobs`).

Rows are addressed as groups of rows, row r at `(r // R) * stride_group + (r % R) * stride_row`,
so a `[B, T, V]` view that cannot be flattened without a copy (the usual `logits[:, :-1]`) is
read in place; a plain `[N, V]` matrix is R = 1 (Triton turns the division into nothing).
Row offsets are int64: N * V passes 2**31 at 14k rows of a 152k vocabulary.

Targets equal to IGNORE_INDEX (-100) give logp 0, entropy 0 and a zero gradient row, and their
logits are never read. Targets outside [0, V) (not checked on the host on CUDA, because that
would need a device sync) give logp NaN instead of an out-of-bounds read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import gpu_sizes

from fastrlhf.contracts import IGNORE_INDEX


@triton.jit
def _row_offset(row, rows_per_group, stride_group, stride_row):
    """Element offset of row `row` (int64) in a [groups, rows_per_group, V] strided layout."""
    return (row // rows_per_group) * stride_group + (row % rows_per_group) * stride_row


@triton.jit
def _tanh_parts(u):
    """(tanh(u), 1 - tanh(u)^2) from e = exp(-2|u|) in (0, 1]: never overflows, and the derivative
    4e / (1 + e)^2 does not cancel where tanh(u) is close to ±1 (1 - tanh^2 would). Triton has no
    tl.tanh in every version; exp works in the interpreter and on the GPU alike. NaN stays NaN:
    every step propagates it and the sign select keeps the NaN branch."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 + e
    magnitude = (1.0 - e) / r
    return tl.where(u < 0, -magnitude, magnitude), 4.0 * e / (r * r)


@triton.jit
def _softcap(x, softcap, inv_softcap):
    """c·tanh(x / c)."""
    tanh, _ = _tanh_parts(x * inv_softcap)
    return softcap * tanh


@triton.jit
def _row_logprob(
    row_ptr, target, skip, V, inv_temperature, softcap, inv_softcap,
    COMPUTE_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """(logp, lse, entropy) of one row of V logits at `row_ptr`, in one streaming pass.

    A row with `skip` set is never read and gives (0, 0, 0) (ignored targets; the fused head also
    skips rows outside the loss mask); a target outside [0, V) gives logp NaN. entropy is 0 unless
    COMPUTE_ENTROPY. Shared by `_logprobs_forward_kernel` and the fused head's row kernel.
    """
    in_range = (target >= 0) & (target < V)
    m = tl.full((), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((), tl.float32)  # sum exp(z - m)
    t = tl.zeros((), tl.float32)  # sum exp(z - m) * (z - m)
    n_cols = tl.where(skip, 0, V)  # skipped rows skip the pass entirely
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # Padding lanes stay -inf (the cap would make them -c, i.e. real entries).
            x = tl.where(cols < V, _softcap(x, softcap, inv_softcap), float("-inf"))
        z = x * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Stay finite while every z seen so far is -inf (masked vocab): shift by 0 instead.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        z_shifted = z - m_shift
        e = tl.exp(z_shifted)
        alpha = tl.exp(m - m_shift)
        if COMPUTE_ENTROPY:
            # exp(z)·z is 0·(-inf) = NaN for -inf logits (and padding lanes): define those terms as 0.
            t_block = tl.sum(e * tl.where(e > 0, z_shifted, 0.0), axis=0)
            # Re-centre the old sum on the new max (s = 0 while m = -inf: nothing to move).
            t_old = t + s * tl.where(s > 0, m - m_shift, 0.0)
            t = alpha * t_old + t_block
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new

    s = tl.where(skip, 1.0, s)  # skipped rows never summed: keep their arithmetic finite
    log_s = tl.log(s)
    lse = tl.where(skip, 0.0, m) + log_s
    z_target = tl.load(row_ptr + tl.where(in_range, target, 0), mask=~skip, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = _softcap(z_target, softcap, inv_softcap)
    # NaN-propagating clamp: the default min returns the non-NaN operand, i.e. logp 0 for a NaN row.
    logp = tl.minimum(z_target * inv_temperature - lse, 0.0, propagate_nan=tl.PropagateNan.ALL)
    logp = tl.where(skip, 0.0, tl.where(in_range, logp, float("nan")))
    entropy = tl.zeros((), tl.float32)
    if COMPUTE_ENTROPY:
        entropy = tl.maximum(log_s - t / s, 0.0, propagate_nan=tl.PropagateNan.ALL)
        entropy = tl.where(skip, 0.0, entropy)
    return logp, tl.where(skip, 0.0, lse), entropy


@triton.jit
def _write_row_dlogits(
    in_ptr, out_ptr, V, target_col, zero, lse, entropy, g, gh, inv_temperature, softcap, inv_softcap,
    HAS_GRAD_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NARROW_IN_PLACE: tl.constexpr,
    BLOCK_V: tl.constexpr, REVERSE: tl.constexpr,
):
    """Write d loss / d logits of one row of V logits (`in_ptr`) to `out_ptr`, in out's dtype:
    (g (1[j = target] - p_j) - gh p_j (log p_j + entropy)) / temperature (· d cap / dx), with p from
    the row's saved `lse`. A row with `zero` set is not read and gets zeros.

    `out_ptr` may alias `in_ptr`: same dtype, each element is read and written by the same thread.
    NARROW_IN_PLACE: a half-width out (bf16/fp16) over the same row of fp32 logits; column j's
    gradient lands in the bytes of fp32 column j / 2, which another thread of the program reads, so
    a barrier between each block's loads and its stores keeps every store behind every read of the
    bytes it overwrites (blocks already passed, or this one; later blocks lie beyond byte 4(s + B)).
    REVERSE: the blocks from the row's end to its start. A row just read front to back by the first
    pass then starts with the blocks most recently read, the ones most likely still in L2
    (`policy_loss_from_logits`); not with NARROW_IN_PLACE, whose safety needs the forward order.
    Shared by `_logprobs_backward_kernel` and the fused head's row kernel."""
    n_read = tl.where(zero, 0, V)  # zero rows only write zeros, never read their logits
    offsets = tl.arange(0, BLOCK_V)
    last = ((V - 1) // BLOCK_V) * BLOCK_V
    for block in range(0, V, BLOCK_V):
        start = block
        if REVERSE:
            start = last - block
        cols = start + offsets
        valid = cols < V
        x = tl.load(in_ptr + cols, mask=cols < n_read, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            tanh, dcap = _tanh_parts(x * inv_softcap)
            x = softcap * tanh
        z = x * inv_temperature
        log_p = z - lse
        p = tl.exp(log_p)
        dz = tl.where(cols == target_col, g, 0.0) - g * p
        if HAS_GRAD_ENTROPY:
            dz -= gh * p * tl.where(p > 0, log_p + entropy, 0.0)  # 0·(-inf) := 0
        dz = dz * inv_temperature
        if HAS_SOFTCAP:
            dz = dz * dcap  # chain rule through the cap: d z / d x = 1 - tanh²(x / c)
        dz = tl.where(zero, 0.0, dz)
        if NARROW_IN_PLACE:
            tl.debug_barrier()  # every thread has loaded this block before any thread overwrites half of it
        tl.store(out_ptr + cols, dz.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _logprobs_forward_kernel(
    logits_ptr, targets_ptr, logps_ptr, lse_ptr, entropy_ptr,
    V, rows_per_group, stride_group, stride_row, inv_temperature, softcap, inv_softcap,
    IGNORE: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64 before any stride multiply
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_per_group, stride_group, stride_row)
    logp, lse, entropy = _row_logprob(
        row_ptr, target, target == IGNORE, V, inv_temperature, softcap, inv_softcap,
        COMPUTE_ENTROPY=COMPUTE_ENTROPY, HAS_SOFTCAP=HAS_SOFTCAP, BLOCK_V=BLOCK_V,
    )
    tl.store(logps_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _logprobs_backward_kernel(
    logits_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logps_ptr, grad_entropy_ptr, dlogits_ptr,
    V, col_start, rows_per_group, stride_group, stride_row, out_stride_group, out_stride_row, inv_temperature,
    softcap, inv_softcap,
    IGNORE: tl.constexpr, HAS_GRAD_LOGPS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NARROW_IN_PLACE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # V here is the width of the logits read (a vocab tile, or all of it), col_start the vocab id
    # of their first column.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGPS:
        g = tl.load(grad_logps_ptr + row).to(tl.float32)
    gh = tl.zeros((), tl.float32)
    entropy = tl.zeros((), tl.float32)
    if HAS_GRAD_ENTROPY:
        gh = tl.load(grad_entropy_ptr + row).to(tl.float32)
        entropy = tl.load(entropy_ptr + row)
    _write_row_dlogits(
        logits_ptr + _row_offset(row, rows_per_group, stride_group, stride_row),
        dlogits_ptr + _row_offset(row, rows_per_group, out_stride_group, out_stride_row),
        V, target - col_start,  # target column outside [0, V) when the target lies in another tile
        target == IGNORE, lse, entropy, g, gh, inv_temperature, softcap, inv_softcap,
        HAS_GRAD_ENTROPY=HAS_GRAD_ENTROPY, HAS_SOFTCAP=HAS_SOFTCAP, NARROW_IN_PLACE=NARROW_IN_PLACE,
        BLOCK_V=BLOCK_V, REVERSE=False,
    )


def _block_v(V: int, device: torch.device, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    # GPU: 4096 per iteration = 16 elements per thread with 8 warps (four 16-byte loads of fp32),
    # no spills; the CPU interpreter pays per iteration, so there it takes the widest block that
    # is still a reasonable numpy array.
    cap = 4096 if gpu_sizes(device) else 32768
    return min(triton.next_power_of_2(V), cap)


def _num_warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int]:
    """(rows_per_group, stride_group, stride_row) of a [N, V] or [G, R, V] logits tensor."""
    if logits.dim() == 2:
        return 1, logits.stride(0), 0
    return logits.shape[1], logits.stride(0), logits.stride(1)


def _check_rows(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() not in (2, 3) or logits.stride(-1) != 1:
        raise ValueError("logits must be a [N, V] or [G, R, V] tensor with unit stride over V")
    n_rows = logits.shape[:-1].numel()
    if targets.shape != (n_rows,) or not targets.is_contiguous():
        raise ValueError(f"targets must be a contiguous [N] tensor with N = {n_rows} rows")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """`x [..., D]` (logits, or hidden states for the fused path) as [N, D] or [G, R, D] rows with
    unit stride over D: a view whenever the strides allow one (e.g. `logits[:, :-1]` of a
    contiguous [B, T, V] is a [B, T-1, V] view, where `reshape(-1, V)` would copy all of it),
    a contiguous copy only otherwise."""
    D = x.shape[-1]
    if x.stride(-1) == 1:
        for shape in ((-1, D), (-1, x.shape[-2], D)) if x.dim() >= 3 else ((-1, D),):
            try:
                return x.view(shape)
            except RuntimeError:  # leading dims not mergeable without a copy
                pass
    return x.reshape(-1, D).contiguous()


def _softcap_args(softcap: float | None) -> tuple[float, float]:
    """(c, 1 / c) kernel arguments; (1.0, 1.0) placeholders when off (HAS_SOFTCAP=False ignores them)."""
    return (float(softcap), 1.0 / softcap) if softcap else (1.0, 1.0)


def logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    compute_entropy: bool = False,
    block_v: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row `(logps [N], lse [N], entropy [N] or None)`, all fp32, of `cap(logits [N, V]) / temperature`
    with cap(x) = softcap·tanh(x / softcap), or cap(x) = x for softcap None / 0 (checked by the caller).

    `logits` may be fp32/bf16/fp16, `[N, V]` with any row stride or `[G, R, V]` (N = G * R rows)
    with any strides over G and R (see `rows_view`); `targets [N]` integer, -100 = ignored.
    `out` optionally gives the three fp32 `[N]` tensors to write (e.g. slices of a bigger result).
    """
    _check_rows(logits, targets)
    N, V = targets.shape[0], logits.shape[-1]
    if out is None:
        logps = torch.empty(N, device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if compute_entropy else None
    else:
        logps, lse, entropy = out
    if N == 0:
        return logps, lse, entropy
    block = _block_v(V, logits.device, block_v)
    _logprobs_forward_kernel[(N,)](
        logits, targets, logps, lse, entropy if compute_entropy else lse,
        V, *_row_layout(logits), 1.0 / temperature, *_softcap_args(softcap),
        IGNORE=IGNORE_INDEX, COMPUTE_ENTROPY=compute_entropy, HAS_SOFTCAP=bool(softcap), BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return logps, lse, entropy


def dlogits_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where to write d loss / d logits of `logits [C, V]` (contiguous rows) in `dtype`, without a
    second [C, V] buffer: the logits themselves for the same dtype; for half the width (bf16/fp16
    gradients of fp32 logits), a `[C, V]` view of the same bytes with row stride 2V (column j of row
    r at byte 4rV + 2j, which `logprobs_backward` and the fused head's row kernel write safely, see
    `_write_row_dlogits`; cuBLAS takes the row stride as a leading dimension). Otherwise a new tensor."""
    if logits.dtype == dtype:
        return logits
    C, V = logits.shape
    if 2 * dtype.itemsize == logits.dtype.itemsize and logits.stride() == (V, 1):
        return logits.view(dtype)[:, :V]
    return torch.empty((C, V), dtype=dtype, device=logits.device)


def narrow_in_place(logits: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `out` is `dlogits_view(logits, narrower dtype)`; ValueError for any other overlap of
    out and logits than that or out = logits (the kernels could not write it safely)."""
    # Storage identity and byte offsets, not data_ptr(): fake tensors (the memory planner) have none.
    if out.untyped_storage()._cdata != logits.untyped_storage()._cdata:
        return False
    same_start = out.storage_offset() * out.element_size() == logits.storage_offset() * logits.element_size()
    if out.dtype == logits.dtype and same_start and out.stride() == logits.stride():
        return False  # logits itself: every element read and written by the same thread
    if (logits.dim() == 2 and same_start and 2 * out.element_size() == logits.element_size()
            and logits.stride() == (logits.shape[1], 1) and out.stride() == (2 * logits.shape[1], 1)):
        return True
    raise ValueError("out may share memory with logits only as logits itself or as dlogits_view(logits, dtype)")


def logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logps: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    block_v: int | None = None,
    out: torch.Tensor | None = None,
    col_start: int = 0,
) -> torch.Tensor:
    """`d loss / d logits` (shaped like `logits`, [N, V] or [G, R, V]) from the upstream grads of
    logps and entropy (either may be None), through the same `softcap` as the forward.

    `out` (default: a new contiguous tensor of logits' dtype) may be `logits` itself: each element
    is read before it is overwritten, by the same program; or `dlogits_view(logits, dtype)` for a
    half-width gradient over [N, V] fp32 logits. `entropy` is needed only with `grad_entropy`.

    `col_start`: `logits` are the vocab columns [col_start, col_start + width) of the full rows (a
    vocab tile); `targets` are full-vocabulary ids and `lse` / `entropy` those of the full rows, as
    saved by `logprobs_forward`. Gives exactly those columns of the full-row gradient.
    """
    _check_rows(logits, targets)
    N, V = targets.shape[0], logits.shape[-1]
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.shape != logits.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have the shape of logits {tuple(logits.shape)} and unit stride over V")
    if N == 0:
        return out
    if grad_entropy is not None and entropy is None:
        raise ValueError("grad_entropy needs the entropy saved by logprobs_forward")
    block = _block_v(V, logits.device, block_v)
    _logprobs_backward_kernel[(N,)](
        logits, targets, lse,
        entropy if grad_entropy is not None else lse,
        grad_logps.contiguous() if grad_logps is not None else lse,
        grad_entropy.contiguous() if grad_entropy is not None else lse,
        out,
        V, col_start, *_row_layout(logits), *_row_layout(out)[1:], 1.0 / temperature, *_softcap_args(softcap),
        IGNORE=IGNORE_INDEX, HAS_GRAD_LOGPS=grad_logps is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, HAS_SOFTCAP=bool(softcap),
        NARROW_IN_PLACE=narrow_in_place(logits, out), BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return out
