"""The aggregation of a [B, T] per-token loss into a scalar, on the GPU, without torch ops.

The token losses of `ppo_loss` and `value_loss` are reduced in two launches:

    1. the loss kernel (kernels/ppo.py), one program per tile of rows x token chunk, writes per
       (row, chunk) partial sums, UNWEIGHTED: n = sum m (the mask, a float mask weighs its
       tokens), sum m * l for each aggregated term, and the metric numerators;
    2. `_aggregate_finalize_kernel`, ONE program, reads them in a fixed order (deterministic, no
       atomics): per row n_b and the term sums, then N = sum n_b, S = #{b : n_b > 0}, the
       aggregation weight s_b of each term (`row_scale`), the loss sum_i coef_i sum_b s_i(b) A_i(b),
       the metrics (numerator / max(N, 1)), and s_i(b) for the backward kernel.

Why two launches and not "the last program finalises" (an atomic ticket in the loss kernel): the
ticket needs a zeroed counter (one more launch, or a cached counter that concurrent streams would
share) and a release/acquire handshake across programs whose correctness the CPU interpreter,
which runs programs one after another, cannot test. A second single-program launch costs a few
microseconds of GPU time and no ordering argument.

The weights, with n_b = sum_t m_bt, N = sum_b n_b, S = #{b : n_b > 0} (fully masked rows never
count, as verl's agg_loss and OpenRLHF's aggregate_loss), exactly as
`fastrlhf.twins.ppo.aggregation_row_scale`:
    token-mean               s_b = 1 / N',            N' = total_tokens or max(N, 1)
    seq-mean-token-mean      s_b = 1 / (max(n_b, 1) S'),  S' = total_sequences or max(S, 1)
    seq-mean-token-sum-norm  s_b = 1 / (S' L),        L = norm_length or max(T, 1)

Cost of the finalize: reads 4·B·C·NP bytes twice (B rows, C chunks per row, NP partials: for
B·T = 64k tokens in 64 tiles, a few KB), ~10 FLOPs per partial; one program, latency-bound
(~2-5 us), whatever B·T is, until B·C reaches tens of thousands.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastrlhf.kernels._launch import next_power_of_2

from fastrlhf.contracts import LOSS_AGGS

# Aggregation codes: positions in LOSS_AGGS. Globals read inside @triton.jit must be tl.constexpr.
_TOKEN_MEAN, _SEQ_MEAN_TOKEN_MEAN, _SEQ_MEAN_TOKEN_SUM_NORM = (
    tl.constexpr(LOSS_AGGS.index(name)) for name in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
)
# How a total (total_tokens / total_sequences) reaches the finalize kernel.
TOTAL_FROM_BATCH, TOTAL_NUMBER, TOTAL_TENSOR = 0, 1, 2
MAX_AGGREGATED = 3  # terms with their own aggregation: PPO's policy, KL and entropy terms


def agg_code(loss_agg: str) -> int:
    return LOSS_AGGS.index(loss_agg)


def total_mode(total) -> int:
    """TOTAL_* code of a total_tokens / total_sequences argument: None, a number, or a 1-element
    tensor (or the marker "tensor": a plan made once per signature keeps no tensor)."""
    if total is None:
        return TOTAL_FROM_BATCH
    return TOTAL_TENSOR if isinstance(total, (torch.Tensor, str)) else TOTAL_NUMBER


@triton.jit
def row_scale(n_b, tokens, sequences, length, AGG: tl.constexpr):
    """The aggregation weight s_b of rows with n_b counted tokens (vectors or scalars), given the
    batch's tokens N', sequences S' and length L (module docstring)."""
    if AGG == _TOKEN_MEAN:
        s = tl.zeros_like(n_b) + 1.0 / tokens
    elif AGG == _SEQ_MEAN_TOKEN_MEAN:
        s = 1.0 / (tl.maximum(n_b, 1.0) * sequences)
    else:
        s = tl.zeros_like(n_b) + 1.0 / (sequences * length)
    return s


@triton.jit
def _load_total(ptr, value, counted, MODE: tl.constexpr):
    """A batch total: `counted` from this batch (MODE 0), the number `value` (1), or *ptr (2)."""
    if MODE == 2:
        total = tl.load(ptr).to(tl.float32)
    elif MODE == 1:
        total = tl.zeros_like(counted) + value
    else:
        total = tl.maximum(counted, 1.0)
    return total


@triton.jit
def _row_partials(partials_ptr, rows, kcols, row_ok, C, NP: tl.constexpr):
    """[BLOCK_R, BLOCK_K] sums over the C chunks of each row's partials (fp32; 0 outside)."""
    acc = tl.zeros((rows.shape[0], kcols.shape[0]), tl.float32)
    ok = row_ok[:, None] & (kcols[None, :] < NP)
    base = rows[:, None].to(tl.int64) * C * NP + kcols[None, :]
    for c in range(0, C):
        acc += tl.load(partials_ptr + base + c * NP, mask=ok, other=0.0)
    return acc


@triton.jit
def _column(tile, kcols, k: tl.constexpr):
    return tl.sum(tl.where(kcols[None, :] == k, tile, 0.0), axis=1)


@triton.jit
def _aggregate_finalize_kernel(
    partials_ptr, scales_ptr, loss_ptr, out_ptr, tokens_ptr, sequences_ptr,
    B, C, length, tokens_value, sequences_value, coef0, coef1, coef2,
    NP: tl.constexpr, N_AGG: tl.constexpr, AGG0: tl.constexpr, AGG1: tl.constexpr, AGG2: tl.constexpr,
    TOKENS: tl.constexpr, SEQUENCES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partials: fp32 [B, C, NP] with column 0 = n and columns 1..N_AGG = the aggregated sums.
    Writes loss (0-d), out [NP] = (sum_b s_0(b) A_0(b), then column k's total / max(N, 1) for
    k >= 1), and scales [N_AGG, B] = s_i(b), the weights the backward kernels apply."""
    kcols = tl.arange(0, BLOCK_K)
    lanes = tl.arange(0, BLOCK_R)
    counted = tl.zeros((), tl.float32)
    sequences_seen = tl.zeros((), tl.float32)
    totals = tl.zeros((BLOCK_K,), tl.float32)
    for r0 in range(0, B, BLOCK_R):
        rows = r0 + lanes
        row_ok = rows < B
        acc = _row_partials(partials_ptr, rows, kcols, row_ok, C, NP)
        n_b = _column(acc, kcols, 0)
        counted += tl.sum(n_b, axis=0)
        sequences_seen += tl.sum(tl.where(row_ok & (n_b > 0.0), 1.0, 0.0), axis=0)
        totals += tl.sum(acc, axis=0)
    tokens = _load_total(tokens_ptr, tokens_value, counted, TOKENS)
    sequences = _load_total(sequences_ptr, sequences_value, sequences_seen, SEQUENCES)

    loss = tl.zeros((), tl.float32)
    first = tl.zeros((), tl.float32)
    for r0 in range(0, B, BLOCK_R):
        rows = r0 + lanes
        row_ok = rows < B
        acc = _row_partials(partials_ptr, rows, kcols, row_ok, C, NP)
        n_b = _column(acc, kcols, 0)
        s0 = row_scale(n_b, tokens, sequences, length, AGG0)
        tl.store(scales_ptr + rows, s0, mask=row_ok)
        term0 = tl.sum(tl.where(row_ok, s0 * _column(acc, kcols, 1), 0.0), axis=0)
        first += term0
        loss += coef0 * term0
        if N_AGG > 1:
            s1 = row_scale(n_b, tokens, sequences, length, AGG1)
            tl.store(scales_ptr + B + rows, s1, mask=row_ok)
            loss += coef1 * tl.sum(tl.where(row_ok, s1 * _column(acc, kcols, 2), 0.0), axis=0)
        if N_AGG > 2:
            s2 = row_scale(n_b, tokens, sequences, length, AGG2)
            tl.store(scales_ptr + 2 * B + rows, s2, mask=row_ok)
            loss += coef2 * tl.sum(tl.where(row_ok, s2 * _column(acc, kcols, 3), 0.0), axis=0)
    tl.store(loss_ptr, loss)
    metrics = tl.where(kcols == 0, first, totals / tl.maximum(counted, 1.0))
    tl.store(out_ptr + kcols, metrics, mask=kcols < NP)


class Finalize:
    """One `_aggregate_finalize_kernel` configuration, fixed per call signature (made once by the
    public function's plan): partials [B, C, NP] (column 0 = n, columns 1..len(aggs) the sums
    aggregated with `aggs` and weighted by `coefs` in the loss), the batch length T, and the
    totals (None, a number, or "tensor": a 1-element tensor passed at each call)."""

    def __init__(self, *, batch: int, chunks: int, num_partials: int, aggs: tuple[str, ...], coefs: tuple[float, ...],
                 seq_len: int, total_tokens=None, total_sequences=None, norm_length: float | None = None):
        n_agg = len(aggs)
        assert 1 <= n_agg <= MAX_AGGREGATED and len(coefs) == n_agg and num_partials > n_agg
        self.shape = (batch, chunks, num_partials)
        self.n_agg = n_agg
        self.tokens_mode, self.sequences_mode = total_mode(total_tokens), total_mode(total_sequences)
        codes = [agg_code(a) for a in aggs] + [0] * (MAX_AGGREGATED - n_agg)
        self.scalars = (
            batch, chunks, float(max(seq_len, 1) if norm_length is None else norm_length),
            float(total_tokens) if self.tokens_mode == TOTAL_NUMBER else 0.0,
            float(total_sequences) if self.sequences_mode == TOTAL_NUMBER else 0.0,
            *([float(c) for c in coefs] + [0.0] * (MAX_AGGREGATED - n_agg)),
        )
        self.constexprs = dict(NP=num_partials, N_AGG=n_agg, AGG0=codes[0], AGG1=codes[1], AGG2=codes[2],
                               TOKENS=self.tokens_mode, SEQUENCES=self.sequences_mode,
                               # [BLOCK_R, 16] fp32 tiles at 8 per thread: no more than ~100 registers
                               BLOCK_R=64 if batch <= 64 else 128, BLOCK_K=next_power_of_2(num_partials),
                               num_warps=4 if batch <= 64 else 8)

    def __call__(self, partials: torch.Tensor, total_tokens=None,
                 total_sequences=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns `(loss, out, scales)`: fp32 0-d loss; fp32 [NP] = (sum_b s_0(b) A_0(b), column
        totals / max(N, 1)); fp32 [len(aggs), B] aggregation weights."""
        device = partials.device
        loss = torch.empty((), dtype=torch.float32, device=device)
        out = torch.empty(self.shape[2], dtype=torch.float32, device=device)
        scales = torch.empty((self.n_agg, self.shape[0]), dtype=torch.float32, device=device)
        _aggregate_finalize_kernel[(1,)](
            partials, scales, loss, out,
            total_tokens if self.tokens_mode == TOTAL_TENSOR else loss,
            total_sequences if self.sequences_mode == TOTAL_TENSOR else loss,
            *self.scalars, **self.constexprs,
        )
        return loss, out, scales
