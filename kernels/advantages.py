"""Masked whitening and GRPO group advantages as Triton kernels (launchers included, no autograd).

`whiten` needs the mean and variance of the WHOLE masked batch before any element's output, a
grid-wide dependency, so it is two launches each way (no torch op around them):

    forward   `_whiten_stats_kernel`: P programs (P <= MAX_PARTIALS) each reduce a contiguous
              range of blocks to Chan's (weight, mean, M2) with weight = sum m, mean = sum m x /
              weight, M2 = sum m (x - mean)^2, computed two-pass per block and merged with Chan et
              al.'s pairwise update (no E[x^2] - mean^2 cancellation);
              `_whiten_apply_kernel`: every program merges the P partials (a few hundred floats,
              from L2) and writes its block of (x - mean) * rsqrt(var + eps) (+ mean) * m.
    backward  `_whiten_grad_stats_kernel` (sum h and sum h (x - mean), h = upstream * m, in P
              partials) and `_whiten_grad_kernel` (the closed-form gradient below).

The statistics are exactly those of `fastrlhf.twins.advantages.whiten` (TRL's masked_whiten):
W = sum m, mean' = sum m x / max(W, 1), var = sum m (x - mean')^2 / max(W - 1, 1), recovered from
Chan's triple as mean' = W mean / max(W, 1) and sum m (x - mean')^2 = M2 + W (mean - mean')^2
(the same numbers for 0/1 masks; also right for a float mask whose weights sum below 1).

Gradient, with u = (x - mean') r [+ mean'] (out = u m), r = (var + eps)^-1/2, h = d loss / d u =
upstream * m, H1 = sum h, H2 = sum h (x - mean'), c = sum m (x - mean') (0 unless 0 < W < 1),
W' = max(W, 1), D = max(W - 1, 1), for m_j != 0 (0 elsewhere: x enters as where(m != 0, x, 0)):
    d loss / d x_j = h_j r - m_j r H1 / W' - m_j (r^3 / D) ((x_j - mean') - c / W') H2  [+ m_j H1 / W'
    without shift_mean]
(d mean' / d x_j = m_j / W', d var / d x_j = 2 m_j ((x_j - mean') - c / W') / D).

Bytes per element (fp32 x, uint8 mask): forward reads 5 twice (stats, apply) and writes 4;
backward reads 9 twice (x, mask, upstream) and writes 4. ~10 FLOPs per element per pass.
At B·T = 64k tokens that is ~1 MB: each launch is latency-bound, a few microseconds.

`group_advantages`: one program per tile of [GROUPS, BLOCK_S] scores (whole groups; a group
longer than BLOCK_S is walked in chunks), mean, spread and the result in one launch: reads 4 bytes
and writes 4 per score, ~8 FLOPs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import cdiv, check_int32_indexable, elementwise_block, next_power_of_2

# Partial statistics of the whiten reductions; every apply program merges all of them.
MAX_PARTIALS = 128
_STATS = 3  # (weight, mean, M2)
_GRAD_STATS = 2  # (sum h, sum h (x - mean'))
MAX_GROUP_BLOCK = 1024


# --------------------------------------------------------------------------- whiten


@triton.jit
def _chan_merge(w_a, mean_a, m2_a, w_b, mean_b, m2_b):
    """Merge two (weight, mean, M2) summaries (Chan, Golub & LeVeque 1979); empty ones merge as 0."""
    w = w_a + w_b
    delta = mean_b - mean_a
    frac = tl.where(w != 0.0, w_b / tl.where(w != 0.0, w, 1.0), 0.0)
    return w, mean_a + delta * frac, m2_a + m2_b + delta * delta * w_a * frac


@triton.jit
def _masked_block(x_ptr, mask_ptr, offs, valid):
    """x (fp32, 0 where the mask is 0 so padding cannot leak) and the fp32 mask of a block."""
    m = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.where(m != 0.0, x, 0.0), m


@triton.jit
def _whiten_stats_kernel(x_ptr, mask_ptr, partials_ptr, n, blocks_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    w = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for i in range(0, blocks_per_program):
        offs = (pid * blocks_per_program + i) * BLOCK + lanes
        x, m = _masked_block(x_ptr, mask_ptr, offs, offs < n)
        w_b = tl.sum(m, axis=0)
        mean_b = tl.sum(m * x, axis=0) / tl.where(w_b != 0.0, w_b, 1.0)
        d = x - mean_b
        m2_b = tl.sum(m * d * d, axis=0)
        w, mean, m2 = _chan_merge(w, mean, m2, w_b, mean_b, m2_b)
    tl.store(partials_ptr + pid * 3 + 0, w)
    tl.store(partials_ptr + pid * 3 + 1, mean)
    tl.store(partials_ptr + pid * 3 + 2, m2)


@triton.jit
def _whiten_moments(partials_ptr, P, BLOCK_P: tl.constexpr):
    """(W, mean', sum m (x - mean')^2) of the whole batch from the P Chan partials (module docstring)."""
    p = tl.arange(0, BLOCK_P)
    ok = p < P
    w_p = tl.load(partials_ptr + p * 3 + 0, mask=ok, other=0.0)
    mean_p = tl.load(partials_ptr + p * 3 + 1, mask=ok, other=0.0)
    m2_p = tl.load(partials_ptr + p * 3 + 2, mask=ok, other=0.0)
    w = tl.sum(w_p, axis=0)
    mean = tl.sum(w_p * mean_p, axis=0) / tl.where(w != 0.0, w, 1.0)
    d = mean_p - mean
    m2 = tl.sum(m2_p, axis=0) + tl.sum(w_p * d * d, axis=0)
    # TRL's mean divides by max(W, 1): the same as Chan's unless 0 < W < 1 (a float mask).
    mean_t = w * mean / tl.maximum(w, 1.0)
    dt = mean - mean_t
    return w, mean_t, m2 + w * dt * dt, w * dt


@triton.jit
def _whiten_apply_kernel(x_ptr, mask_ptr, partials_ptr, out_ptr, n, P, eps,
                         SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    w, mean, ss, _c = _whiten_moments(partials_ptr, P, BLOCK_P)
    var = ss / tl.maximum(w - 1.0, 1.0)
    r = tl.math.rsqrt(var + eps)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x, m = _masked_block(x_ptr, mask_ptr, offs, valid)
    out = (x - mean) * r
    if not SHIFT_MEAN:
        out = out + mean
    tl.store(out_ptr + offs, out * m, mask=valid)


@triton.jit
def _load_upstream(grad_ptr, offs, valid, SCALAR: tl.constexpr):
    if SCALAR:  # one value broadcast to every element (out.sum(), out.mean())
        g = tl.load(grad_ptr).to(tl.float32) + tl.zeros(offs.shape, tl.float32)
    else:
        g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return g


@triton.jit
def _whiten_grad_stats_kernel(x_ptr, mask_ptr, grad_ptr, partials_ptr, grad_partials_ptr, n, P, blocks_per_program,
                              GRAD_IS_SCALAR: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    _w, mean, _ss, _c = _whiten_moments(partials_ptr, P, BLOCK_P)
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    h1 = tl.zeros((BLOCK,), tl.float32)
    h2 = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, blocks_per_program):
        offs = (pid * blocks_per_program + i) * BLOCK + lanes
        valid = offs < n
        x, m = _masked_block(x_ptr, mask_ptr, offs, valid)
        h = _load_upstream(grad_ptr, offs, valid, GRAD_IS_SCALAR) * m
        h = tl.where(valid, h, 0.0)
        h1 += h
        h2 += h * (x - mean)
    tl.store(grad_partials_ptr + pid * 2 + 0, tl.sum(h1, axis=0))
    tl.store(grad_partials_ptr + pid * 2 + 1, tl.sum(h2, axis=0))


@triton.jit
def _whiten_grad_kernel(x_ptr, mask_ptr, grad_ptr, partials_ptr, grad_partials_ptr, grad_x_ptr, n, P, eps,
                        SHIFT_MEAN: tl.constexpr, GRAD_IS_SCALAR: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    w, mean, ss, c = _whiten_moments(partials_ptr, P, BLOCK_P)
    d_count = tl.maximum(w - 1.0, 1.0)
    w_count = tl.maximum(w, 1.0)
    r = tl.math.rsqrt(ss / d_count + eps)
    p = tl.arange(0, BLOCK_P)
    ok = p < P
    h1 = tl.sum(tl.load(grad_partials_ptr + p * 2 + 0, mask=ok, other=0.0), axis=0)
    h2 = tl.sum(tl.load(grad_partials_ptr + p * 2 + 1, mask=ok, other=0.0), axis=0)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x, m = _masked_block(x_ptr, mask_ptr, offs, valid)
    h = _load_upstream(grad_ptr, offs, valid, GRAD_IS_SCALAR) * m
    grad = h * r - m * (r * h1 / w_count) - m * (r * r * r / d_count) * ((x - mean) - c / w_count) * h2
    if not SHIFT_MEAN:
        grad += m * h1 / w_count
    grad = tl.where(m != 0.0, grad, 0.0)  # x enters through where(m != 0, x, 0): no gradient outside the mask
    tl.store(grad_x_ptr + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=valid)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _layout(n: int, device: torch.device, block: int | None) -> tuple[int, int, int]:
    """(BLOCK, programs of the stats kernels, blocks each of them reduces)."""
    check_int32_indexable("x", n)
    block = block or elementwise_block(n, device)
    blocks = cdiv(n, block)
    per_program = cdiv(blocks, MAX_PARTIALS) if blocks else 1
    return block, max(cdiv(blocks, per_program), 1), per_program


def whiten_forward(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool, eps: float,
                   block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked whitening of contiguous `x` (any shape, fp32/bf16/fp16) over `mask` (same shape,
    bool/int/float). Returns `(out, partials)`: fp32 out shaped like x, and the fp32 [P, 3] Chan
    partials the backward reuses. `block` overrides the elements per program (tests)."""
    n = x.numel()
    block, programs, per_program = _layout(n, x.device, block)
    partials = torch.empty((programs, _STATS), dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if n == 0:
        return out, partials
    mask = _mask_arg(mask)
    _whiten_stats_kernel[(programs,)](x, mask, partials, n, per_program, BLOCK=block)
    _whiten_apply_kernel[(cdiv(n, block),)](
        x, mask, partials, out, n, programs, float(eps), SHIFT_MEAN=bool(shift_mean), BLOCK=block,
        BLOCK_P=next_power_of_2(programs),
    )
    return out, partials


def whiten_backward(x: torch.Tensor, mask: torch.Tensor, partials: torch.Tensor, grad_out: torch.Tensor, *,
                    shift_mean: bool, eps: float, block: int | None = None) -> torch.Tensor:
    """d loss / d x in x's dtype from the upstream gradient of `whiten_forward`'s output (contiguous,
    or a broadcast scalar with all strides 0) and its partials."""
    n = x.numel()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n == 0:
        return grad_x
    block, programs, per_program = _layout(n, x.device, block)
    scalar = all(stride == 0 for stride in grad_out.stride())
    if not scalar:
        grad_out = grad_out.contiguous()
    mask = _mask_arg(mask)
    grad_partials = torch.empty((programs, _GRAD_STATS), dtype=torch.float32, device=x.device)
    block_p = next_power_of_2(programs)
    _whiten_grad_stats_kernel[(programs,)](
        x, mask, grad_out, partials, grad_partials, n, programs, per_program, GRAD_IS_SCALAR=scalar, BLOCK=block,
        BLOCK_P=block_p,
    )
    _whiten_grad_kernel[(cdiv(n, block),)](
        x, mask, grad_out, partials, grad_partials, grad_x, n, programs, float(eps), SHIFT_MEAN=bool(shift_mean),
        GRAD_IS_SCALAR=scalar, BLOCK=block, BLOCK_P=block_p,
    )
    return grad_x


# --------------------------------------------------------------------------- group advantages


@triton.jit
def _group_advantages_kernel(scores_ptr, out_ptr, groups, group_size, eps, std_divisor,
                             SCALE: tl.constexpr, GROUPS: tl.constexpr, BLOCK_S: tl.constexpr):
    group = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    group_ok = group < groups
    lanes = tl.arange(0, BLOCK_S)
    base = group[:, None].to(tl.int64) * group_size
    total = tl.zeros((GROUPS,), tl.float32)
    for start in range(0, group_size, BLOCK_S):
        cols = start + lanes
        ok = group_ok[:, None] & (cols[None, :] < group_size)
        total += tl.sum(tl.load(scores_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32), axis=1)
    mean = total / group_size
    inv = tl.full((GROUPS,), 1.0, tl.float32)
    if SCALE:
        ss = tl.zeros((GROUPS,), tl.float32)
        for start in range(0, group_size, BLOCK_S):
            cols = start + lanes
            ok = group_ok[:, None] & (cols[None, :] < group_size)
            d = tl.load(scores_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]
            ss += tl.sum(tl.where(ok, d * d, 0.0), axis=1)
        inv = 1.0 / (tl.sqrt(ss / std_divisor) + eps)
    for start in range(0, group_size, BLOCK_S):
        cols = start + lanes
        ok = group_ok[:, None] & (cols[None, :] < group_size)
        s = tl.load(scores_ptr + base + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + cols[None, :], (s - mean[:, None]) * inv[:, None], mask=ok)


def group_advantages_forward(scores: torch.Tensor, group_size: int, *, scale: bool, std: str,
                             eps: float) -> torch.Tensor:
    """fp32 `[B]` (s - group mean) / (group std + eps) (or s - group mean) of contiguous `[B]`
    scores in consecutive groups of `group_size` (which divides B). A group of one gets 0."""
    B = scores.shape[0]
    out = torch.empty(B, dtype=torch.float32, device=scores.device)
    if B == 0:
        return out
    check_int32_indexable("scores", B)
    groups = B // group_size
    block_s = min(next_power_of_2(group_size), MAX_GROUP_BLOCK)
    per_program = max(1, MAX_GROUP_BLOCK // block_s)
    per_program = min(per_program, next_power_of_2(groups))
    divisor = float(group_size - 1 if std == "sample" else group_size)
    _group_advantages_kernel[(cdiv(groups, per_program),)](
        scores, out, groups, group_size, float(eps), divisor, SCALE=bool(scale) and group_size > 1,
        GROUPS=per_program, BLOCK_S=block_s, num_warps=4 if per_program * block_s >= 512 else 1,
    )
    return out
