"""GAE as one parallel scan per row (Triton kernel + launcher, no autograd).

GAE is the linear first-order recurrence, run backwards in time, A_t = d_t + c_t * A_{t+1}, with
one of two meanings for a masked token inside a row (`skip_masked`):

    skip (verl's `compute_gae_advantage_return`: tool observations in multi-turn responses):
        a masked token is the identity map (c = 1, d = 0): the advantage carries across it, and
        d_t = r_t + gamma * N_t - V_t for a counted token, N_t = the value of the next COUNTED token
        (0 if none), itself the scan N_t = m_{t+1} ? V_{t+1} : N_{t+1} (c = 1 - m, d = m V);
        c_t = gamma * lam.
    terminal (each masked token ends the episode before it):
        d_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,   c_t = gamma * lam * m_{t+1}.

The two agree when the mask has no holes (a prompt before, padding after the response). Each step
is the affine map X -> d_t + c_t * X, and composing affine maps is associative, so a whole block of
steps is solved by one `tl.associative_scan` over (c, d) pairs (two scans in skip mode: N, then A)
instead of T sequential launches (TRL, OpenRLHF and verl loop over t in Python).

One program handles one row. T is walked in blocks of BLOCK_T from the end; the advantage at the
first token of a block is the carry fed into the next (earlier) block, so T = 8192+ needs no huge
block. Loads are fp32 regardless of the input dtype (fp32 accumulation for bf16).

Why a forward scan over reversed offsets instead of `associative_scan(..., reverse=True)`: the
reverse flag has an open report of wrong results for non-commutative combine functions on GPU
(triton-lang/triton#4362) and its operand order differs between backends; loading the block in
reversed time order and scanning forward has one well-defined order everywhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_T = 1024


@triton.jit
def _compose_later_then_earlier(c_later, d_later, c_step, d_step):
    # `later` maps the carry X (advantage after the block) to A_{t+1} = d_later + c_later * X;
    # the step at t gives A_t = d_step + c_step * A_{t+1}.
    return c_step * c_later, d_step + c_step * d_later


@triton.jit
def _gae_forward_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    T, gamma, gamma_lam,
    SKIP_MASKED: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * T
    lane = tl.arange(0, BLOCK_T)
    carry = tl.zeros((), dtype=tl.float32)  # A at the first token after the current block
    carry_value = tl.zeros((), dtype=tl.float32)  # skip mode: N at the block's earliest token's successor
    for block in range(0, tl.cdiv(T, BLOCK_T)):
        t = T - 1 - block * BLOCK_T - lane  # lane 0 = latest token of the block
        in_row = t >= 0
        has_next = in_row & (t + 1 < T)
        r = tl.load(rewards_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + row_start + t, mask=in_row, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + row_start + t, mask=in_row, other=0).to(tl.float32)
        v_next = tl.load(values_ptr + row_start + t + 1, mask=has_next, other=0.0).to(tl.float32)
        m_next = tl.load(mask_ptr + row_start + t + 1, mask=has_next, other=0).to(tl.float32)
        # Tokens outside the mask count as 0: their NaN/inf padding would otherwise survive the
        # products with a zero mask (0 * NaN = NaN) and poison the whole row through the scan.
        r = tl.where(m != 0.0, r, 0.0)
        v = tl.where(m != 0.0, v, 0.0)
        v_next = tl.where(m_next != 0.0, v_next, 0.0)

        if SKIP_MASKED:
            # Lane t holds the map of token t + 1 for N (the next counted token's value): N_t =
            # m_{t+1} ? V_{t+1} : N_{t+1}; then A skips masked tokens (identity maps).
            counted_next = m_next != 0.0
            c_v, d_v = tl.associative_scan((tl.where(counted_next, 0.0, 1.0), tl.where(counted_next, v_next, 0.0)),
                                           0, _compose_later_then_earlier)
            next_value = d_v + c_v * carry_value
            counted = m != 0.0
            delta = tl.where(counted, r + gamma * next_value - v, 0.0)
            coef = tl.where(counted, gamma_lam, 1.0)
            # The block's earliest lane gives N for the token before the block.
            carry_value = tl.sum(tl.where(lane == BLOCK_T - 1, next_value, 0.0), axis=0)
        else:
            delta = r + gamma * v_next * m_next - v
            coef = gamma_lam * m_next
        c_acc, d_acc = tl.associative_scan((coef, delta), 0, _compose_later_then_earlier)
        adv = d_acc + c_acc * carry

        tl.store(adv_ptr + row_start + t, adv * m, mask=in_row)
        tl.store(ret_ptr + row_start + t, (adv + v) * m, mask=in_row)
        # The last lane is the block's earliest token; lanes with t < 0 only occur in the final
        # block, after which the carry is not used.
        carry = tl.sum(tl.where(lane == BLOCK_T - 1, adv, 0.0), axis=0)


def gae_forward(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    skip_masked: bool = True,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the scan: `rewards`, `values`, `mask` are `[B, T]` on one device (any float dtype;
    the mask may be bool/int/float). Returns `(advantages, returns)`, fp32 `[B, T]`, masked to 0.
    `skip_masked`: masked tokens inside a row are skipped (True) or end the episode (False).

    Bytes: reads 2 x [B, T] floats + the mask (the next token's value/mask are the same lines, from
    cache), writes 2 x [B, T] fp32; ~10 FLOPs per token (skip mode: a second scan, ~16).

    `block_t` (a power of two) overrides the block length; tests use small blocks to exercise
    the carry between blocks.
    """
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B == 0 or T == 0:
        return advantages, returns
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a dtype every Triton backend loads
    if block_t is None:
        block_t = min(triton.next_power_of_2(T), MAX_BLOCK_T)
    if block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two, got {block_t}")
    _gae_forward_kernel[(B,)](
        rewards.contiguous(), values.contiguous(), mask.contiguous(), advantages, returns,
        T, float(gamma), float(gamma * lam),
        SKIP_MASKED=bool(skip_masked), BLOCK_T=block_t, num_warps=4 if block_t <= 512 else 8,
    )
    return advantages, returns
