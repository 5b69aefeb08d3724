"""The fused RL head: from final hidden states and the LM-head weight straight to `(loss, metrics)`.

    policy_loss_from_hidden   PPO / GRPO (token-level advantages, clip-higher, dual clip, KL, entropy)
    dpo_loss_from_hidden      DPO family over [chosen rows; rejected rows]
    sft_loss_from_hidden      mean NLL (SFT)

Each equals, in value, metrics and gradients, the composition of `token_logprobs` with `ppo_loss`
/ `sequence_logps` + `dpo_loss` / the SFT trainer's NLL (`fastrlhf.twins.fused_head` spells
the compositions out). The loss is the last node of the graph, so d loss / d logits is known the
moment the logits are: the gradients of hidden, weight and bias are computed DURING the forward
sweep, and backward only multiplies them by the incoming scalar gradient (exact for any use of the
scalar loss; differentiating through the gradient, or a second backward through the same call, raises). No
`[N, V]` buffer; the logits are made once and never recomputed.

Design (per chunk of C rows; the GEMMs are cuBLAS, the rest one Triton row kernel):

    logits  = hidden_c @ W.T (+ b)        fp32 [C, V]  `_chunk_logits`             2·C·V·H FLOPs
    row kernel: lse/entropy, per-token loss, metric partials, d logits (bf16 in place, see
            `kernels/fused_head.py`)                                              10·C·V bytes
    dH_c    = dlogits @ W                 written once into dH rows                 2·C·V·H
    dW     += dlogits.T @ hidden_c        accumulated in the weight dtype          2·C·V·H
    db     += column sums of dlogits      fp32 [V]

So fwd+bwd costs 6·N·V·H FLOPs (the recompute path of `token_logprobs` + a loss: 8·N·V·H, it makes
the logits twice). Forward only (no_grad, or nothing requires grad): 2·N·V·H and one read of the
logits. A frozen head (weight.requires_grad False, LoRA) skips the dW GEMM entirely. Rows the loss
does not depend on (mask 0, target -100) are never read by the row kernel and get zero d logits,
and their hidden rows are zeroed before the dW GEMM (0 · NaN padding would be NaN; C·H bytes);
they still go through the three GEMMs: dropping them needs their count on the host (a sync),
which prompt-heavy SFT/DPO batches could afford; not done.

Why chunked cuBLAS + a row kernel, not tl.dot tiles that keep the LSE and d logits in SRAM: d logits
of a row needs the row's LSE over all V, so a tile kernel that never materialises logits must make
them twice (LSE pass, then gradient pass) = 8·N·V·H, and a hand-written Triton GEMM mainloop reaches
~70-80% of cuBLAS on sm_90 (no warp-specialised TMA pipeline as tuned as cuBLAS'/CUTLASS'). To
beat 6·N·V·H on cuBLAS it would need ~1.33x cuBLAS's throughput. Materialising one chunk instead
costs ~10 bytes per logit of HBM traffic outside the GEMMs (the row kernel), ~8% of the GEMM time
at the shape below. So: cuBLAS for all three GEMMs, Triton only where cuBLAS cannot go.

Chunk size and the dW accumulator (the one real trade-off): with gradients in the forward, every
row chunk contributes to all of dW, so dW is read and written once per chunk: (N / C)·2·V·H·bytes.
Memory is C·V·4 bytes of fp32 logits. Memory x traffic is fixed (∝ N·V²·H): smaller chunks cost
dW traffic, bigger chunks cost memory. Default (CUDA): the most rows whose fp32 logits fit
`FUSED_CHUNK_BYTES_CUDA` = 1.25 GiB, balanced over the chunks: C = 2048 at N = 16384, V = 151936
(M = 2048 is a full-efficiency GEMM shape for the logits and dH GEMMs, and the K = 2048 of the dW GEMM
makes its 2.5 GB bf16 read+write of dW (0.52 ms at 4.8 TB/s) ~20% of its 2.6 ms of math at peak,
partly hidden in the GEMM epilogue).
dW is accumulated in the weight dtype, as Liger's FLCE does by default: an fp32 accumulator would
add 4·V·H bytes of memory (2.5 GB at the shape below, the memory the first H200 run flagged) plus
a final cast, and double the per-chunk traffic; the price is one bf16 rounding (2^-9 relative) of
the running sum per chunk, i.e. at most ceil(N / C) = 8 roundings at the shape below instead of
the 1 of an fp32 accumulator cast once; each GEMM itself accumulates in fp32. fp32 heads
accumulate in fp32.

Cost model at N = 16384, V = 151936, H = 4096, bf16 (C = 2048, 8 chunks), H200 bf16 dense peak
989 TFLOP/s, 4.8 TB/s (predictions, NOT measured on a GPU):
    logits GEMMs   20.4 TFLOP, ~20 GB (W read per chunk, fp32 logits written)    20.6 ms at peak
    row kernel     ~0 FLOP,    24.9 GB                                            5.2 ms
    dH GEMMs       20.4 TFLOP, ~15 GB                                             20.6 ms
    dW GEMMs       20.4 TFLOP, ~25 GB (incl. 8 x 2.5 GB dW read+write)            20.6 ms
    backward       scale dW and dH by grad_output: 2.8 GB                          0.6 ms
    total          61.2 TFLOP (6·N·V·H) ~ 68 ms at peak GEMMs (+ the row kernel), ~82 ms at
                   an 80%-of-peak cuBLAS; the recompute path needs 8·N·V·H = 82.5 ms at peak.
    memory beyond inputs: 1.25 GB chunk logits + 1.25 GB dW + 134 MB dH (the outputs) ≈ 2.65 GB.

DPO: a token's gradient depends on its pair's summed log-probs, known only after the pair's last
token. Chunks are therefore aligned to whole pairs (chosen rows of pairs [p0, p1) and their
rejected rows in one chunk, as Liger's chunked DPO): pass 1 (`logprobs_forward`) -> per-sequence
sums -> the DPO kernel's per-pair gradients -> pass 2 (`logprobs_backward`, in place) -> GEMMs:
6·N·V·H. When one pair (2T rows) exceeds the chunk budget, it falls back to two phases with
row chunks of any size: the recompute path (`token_logprobs` fwd+bwd under an inner autograd):
8·N·V·H, memory within the budget. At pairs = 4, T = 1024, V = 151936 one pair is 2048 rows
(1.25 GB fp32), which fits the default budget: 6·N·V·H.
"""
from __future__ import annotations

import math

import torch

from fastrlhf._checks import (
    check_choice,
    check_dpo_args,
    check_floating,
    check_hidden_args,
    check_bool,
    check_logits_args,
    check_ndim,
    check_ppo_args,
    check_same_device,
    check_softcap,
    check_totals,
)
from fastrlhf._dispatch import resolve_backend
from fastrlhf.contracts import (
    IGNORE_INDEX,
    LENGTH_AVERAGED_LOSS_TYPES,
    SFT_LOSS_AGGS,
)
from fastrlhf.losses._autograd import first_order_only
from fastrlhf.losses.logprobs import _chunk_logits, _rows, _spans, logprobs_from_logits, token_logprobs
from fastrlhf.losses.ppo import aggregation_row_scale, policy_constants, ppo_metrics
from fastrlhf.losses.preference import dpo_loss, sequence_logps
from fastrlhf.twins import fused_head as twin
from fastrlhf.twins import ppo as twin_ppo
from fastrlhf.twins.logprobs import CHUNK_BYTES_CPU, no_autocast

__all__ = ["policy_loss_from_hidden", "policy_loss_from_logits", "dpo_loss_from_hidden", "sft_loss_from_hidden"]

# One chunk's fp32 logits take at most this much on CUDA (see the module docstring).
FUSED_CHUNK_BYTES_CUDA = 5 * 2**28  # 1.25 GiB


def _kernels():
    # Imported on first Triton use only: `import fastrlhf` must not need triton.
    from fastrlhf.kernels import fused_head

    return fused_head


# --------------------------------------------------------------------------- chunking


def _max_chunk_rows(chunk_size: int | None, vocab: int, device: torch.device) -> int:
    """Rows one chunk may hold: `chunk_size`, or as many as keep the fp32 logits within the budget."""
    if chunk_size is not None:
        return chunk_size
    budget = FUSED_CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES_CPU
    return max(1, budget // (4 * vocab))


def _balanced_spans(n: int, max_size: int, explicit: bool):
    """[start, end) pieces of range(n) of at most `max_size`: exactly `max_size` long (the last one
    shorter) when the caller chose the size, else as equal as possible (16384 rows at most 2208
    per chunk -> 8 chunks of 2048, not 7 of 2208 and one of 928)."""
    if explicit or n == 0:
        return _spans(n, max_size)
    return _spans(n, math.ceil(n / math.ceil(n / max_size)))


# --------------------------------------------------------------------------- autograd


class _GradientsFromForward(torch.autograd.Function):
    """(loss, stats) of `compute(hidden, weight, bias, need)`, which also returns the gradients of
    the loss w.r.t. hidden, weight, bias (None where `need` is False). Backward hands them over,
    multiplied by grad_loss: no recomputation."""

    @staticmethod
    def forward(ctx, compute, hidden, weight, bias):
        loss, stats, grads = compute(hidden, weight, bias, ctx.needs_input_grad[1:4])
        ctx.grads = grads
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only("<policy|dpo|sft>_loss_from_hidden")
    def backward(ctx, grad_loss, _grad_stats):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over (autograd may keep them as .grad)
        if grads is None:
            raise RuntimeError(
                "backward through a fused head loss ran a second time (retain_graph=True): its gradients "
                "were computed in the forward pass and handed over by the first backward; call the "
                "loss function again for a second backward"
            )
        scale = grad_loss.float()
        return (None, *(None if g is None else g.mul_(scale) for g in grads))


def _apply(compute, hidden, weight, bias):
    """Run `compute` under autograd when a gradient is wanted, else forward only."""
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wanted:
        return _GradientsFromForward.apply(compute, hidden, weight, bias)
    loss, stats, _ = compute(hidden, weight, bias, (False, False, False))
    return loss, stats


def _head_sweep(hidden, weight, bias, chunks, need, process, active):
    """One pass over row chunks of the head: per chunk, cuBLAS makes the fp32 logits of its rows,
    `process(logits, ranges)` runs the row kernel(s) and returns d loss / d logits (in the weight
    dtype, or None when no gradient is wanted), and two GEMMs turn that into the chunk's dH rows and
    its share of dW (and db). `chunks`: lists of [start, end) row ranges (one chunk = their rows,
    in order). `active` (bool `[N]`): rows the loss depends on; the others get zero d logits, and
    their hidden states are zeroed for the dW GEMM, where 0 · NaN padding would still be NaN.
    Returns (dH `hidden.shape`, dW, db), None where not needed."""
    need_hidden, need_weight, need_bias = need
    n_rows, (vocab, dim) = hidden.shape[:-1].numel(), weight.shape
    # Every row lies in exactly one chunk, whose dH GEMM writes it.
    grad_hidden = torch.empty((n_rows, dim), dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_weight = None  # the first chunk's GEMM writes it, later ones add to it (in the weight dtype)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_bias else None
    with no_autocast(hidden.device):
        for ranges in chunks:
            parts = [_rows(hidden, start, end) for start, end in ranges]
            hidden_rows = parts[0] if len(parts) == 1 else torch.cat(parts)
            # Only one [C, V] buffer lives at a time: the logits, then their gradient in place.
            dlogits = process(_chunk_logits(hidden_rows, weight, bias), ranges)
            if dlogits is None:
                continue
            if need_hidden:
                offset = 0
                for start, end in ranges:
                    torch.mm(dlogits[offset:offset + end - start], weight, out=grad_hidden[start:end])
                    offset += end - start
            if need_weight:
                rows_active = torch.cat([active[start:end] for start, end in ranges])
                hidden_rows = torch.where(rows_active[:, None], hidden_rows, 0)  # C x H: ~1% of the chunk's bytes
                if grad_weight is None:
                    grad_weight = torch.mm(dlogits.t(), hidden_rows)
                else:
                    grad_weight.addmm_(dlogits.t(), hidden_rows)
            if need_bias:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
            del dlogits, hidden_rows, parts
    if need_weight and grad_weight is None:  # no rows at all
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    return (
        None if grad_hidden is None else grad_hidden.view(hidden.shape),
        grad_weight,
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


def _row_local_loss(hidden, weight, bias, need, *, targets, mask, row_scale, loss, scaling, chunk, ppo=None,
                    entropy_grad=False):
    """(loss, per-stat totals, grads) of a per-token loss (NLL or PPO) through the row kernel."""
    kernels = _kernels()
    n_rows, seq_len = targets.numel(), targets.shape[-1] if targets.dim() else 1
    stats = torch.empty((n_rows, len(kernels.ROW_STATS[loss])), dtype=torch.float32, device=hidden.device)
    write_grad = any(need)
    temperature, softcap = scaling

    def process(logits, ranges):
        ((start, _end),) = ranges
        dlogits = kernels.dlogits_view(logits, weight.dtype) if write_grad else None
        kernels.fused_head_rows(
            logits, dlogits, targets.reshape(-1), mask.reshape(-1), row_scale, stats, row0=start,
            seq_len=seq_len, loss=loss, temperature=temperature, softcap=softcap, ppo=ppo,
            entropy_grad=entropy_grad,
        )
        return dlogits

    max_rows, explicit = chunk
    chunks = [[span] for span in _balanced_spans(n_rows, _max_chunk_rows(max_rows, weight.shape[0], hidden.device),
                                                  explicit)]
    active = ((mask != 0) & (targets != IGNORE_INDEX)).reshape(-1)
    grads = _head_sweep(hidden, weight, bias, chunks, need, process, active)
    totals = stats.sum(0)
    return totals[0].clone(), totals, grads  # a clone: the differentiable loss must not view the stats


# --------------------------------------------------------------------------- checks


def _check_token_tensor(name: str, tensor: torch.Tensor | None, targets: torch.Tensor) -> None:
    if tensor is None:
        return
    check_floating(name, tensor)
    if tensor.shape != targets.shape:
        raise ValueError(f"{name} must have the shape of targets {tuple(targets.shape)}, got {tuple(tensor.shape)}")


def _chunk_arg(chunk_size: int | None) -> tuple[int | None, bool]:
    """(max rows per chunk or None for the default, whether the caller chose it)."""
    return chunk_size, chunk_size is not None


# --------------------------------------------------------------------------- PPO / GRPO


def _policy_row_options(presweep, args, mask_f: torch.Tensor, objective: dict) -> tuple[torch.Tensor, dict]:
    """(row_scale, the `ppo` options of `kernels.fused_head.fused_head_rows`) of a policy loss,
    shared by `policy_loss_from_hidden` and `policy_loss_from_logits`. `presweep()` gives the
    current (logps, entropy) [B, T] without grad; it runs only when an option needs a statistic of
    every token before any token's gradient (GSPO with old_logps, a sequence IS correction
    on-policy, top_entropy_quantile < 1). `objective`: the public function's ppo_loss options,
    tensors included (old_logps, advantages, ref_logps, rollout_logps)."""
    o = objective
    old_logps, advantages = o["old_logps"], o["advantages"]
    sequence_ratio = o["ratio_level"] == "sequence" and old_logps is not None
    # On-policy (old_logps=None) a sequence-level IS weight needs the current log-probs as pi_old.
    sequence_is = args.is_correction is not None and args.is_correction.startswith("sequence") and old_logps is None
    current_logps = current_entropy = None
    if sequence_ratio or sequence_is or o["top_entropy_quantile"] < 1.0:  # the forward-only pre-sweep
        with torch.no_grad():
            current_logps, current_entropy = presweep()
    constants = policy_constants(
        mask_f, logps=current_logps if sequence_ratio else None,
        old_logps=current_logps if old_logps is None else old_logps, entropy=current_entropy,
        rollout_logps=o["rollout_logps"], has_ref=o["ref_logps"] is not None, has_entropy=o["entropy_coef"] != 0,
        ratio_level=o["ratio_level"], is_correction=args.is_correction,
        top_entropy_quantile=o["top_entropy_quantile"], loss_agg=o["loss_agg"], kl_agg=o["kl_agg"],
        entropy_agg=o["entropy_agg"],
        totals=dict(total_tokens=o["total_tokens"], total_sequences=o["total_sequences"], norm_length=o["norm_length"]),
    )
    row_scale, kl_row_scale, ent_row_scale = constants["row_scales"]

    def flat(tensor):
        return None if tensor is None else tensor.detach().reshape(-1).contiguous()

    ppo = dict(
        old_logps=flat(old_logps), advantages=flat(advantages), advantages_per_row=advantages.dim() == 1,
        ref_logps=flat(o["ref_logps"]), rollout_logps=flat(o["rollout_logps"]), kl_row_scale=kl_row_scale,
        ent_row_scale=ent_row_scale, seq_log_ratio=constants.get("seq_log_ratio"),
        seq_is_log_weight=constants.get("seq_is_log_weight"), entropy_threshold=constants.get("entropy_threshold"),
        selection_entropy=None if current_entropy is None else current_entropy.float().reshape(-1).contiguous(),
        loss_type=o["loss_type"], clip_low=1.0 - o["clip_eps"], clip_high=1.0 + args.clip_eps_high,
        dual_clip=o["dual_clip"], kl_coef=o["kl_coef"], entropy_coef=o["entropy_coef"],
        sapo_tau_pos=o["sapo_tau_pos"], sapo_tau_neg=o["sapo_tau_neg"], is_correction=args.is_correction,
        is_log_bounds=twin_ppo.is_log_bounds(o["is_clip_min"], o["is_clip_max"]), estimator=args.kl_estimator,
    )
    return row_scale, ppo


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    loss_type: str = "ppo",
    ratio_level: str = "token",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    rollout_logps: torch.Tensor | None = None,
    is_correction: str | None = None,
    is_clip_min: float | None = None,
    is_clip_max: float | None = 2.0,
    top_entropy_quantile: float = 1.0,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    kl_agg: str | None = None,
    entropy_agg: str | None = None,
    total_tokens: float | torch.Tensor | None = None,
    total_sequences: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-family policy loss (PPO, GRPO, GSPO, CISPO, SAPO, with TIS/MIS and high-entropy token
    selection) straight from the final hidden states, gradients computed in the forward.

    Equals `logps, ent = token_logprobs(hidden, weight, targets, bias=, temperature=, softcap=,
    return_entropy=True)` followed by `ppo_loss(logps, old_logps, advantages, mask, ..., entropy=ent,
    ...)`, in value, metrics and the gradients w.r.t. hidden, weight and bias, without `[B, T, V]`
    logits and without making the logits twice (6·N·V·H FLOPs fwd+bwd; see the module docstring).
    Some options need a statistic of EVERY token's current log-prob or entropy before any token's
    gradient is known: ratio_level="sequence" (GSPO: each sequence's mean log-ratio; not needed
    on-policy, old_logps=None, where it is 0), a sequence_* IS correction on-policy (the sequence's
    sum of current minus rollout log-probs) and top_entropy_quantile < 1 (the batch's entropy
    quantile). They run one forward-only sweep first (`token_logprobs`, 2·N·V·H FLOPs): 8·N·V·H in all.

    Args:
        hidden: `[B, T, H]` final hidden states (fp32/bf16/fp16), strided views such as `h[:, :-1]`
            included (read chunk by chunk, never copied whole).
        weight: `[V, H]` LM head weight, hidden's dtype. bias: optional `[V]`.
        targets: `[B, T]` token ids; -100 = ignored (logp 0, entropy 0, no gradient: such a token
            still counts in the loss if `mask` says so, with logp 0, exactly as in the composition).
        old_logps: `[B, T]` log-probs of the sampling policy; advantages: `[B, T]` per token or `[B]`
            per sequence. CONSTANTS: no gradient flows to them (detached), as in every PPO
            implementation. old_logps=None: a single on-policy pass (as GRPOTrainer's
            `logps.detach()`): the current log-probs, as constants (ratio 1), without a separate
            forward to compute them.
        mask: `[B, T]` bool/int/float, tokens that count.
        loss_type, ratio_level, clip_eps, clip_eps_high, dual_clip, sapo_tau_pos, sapo_tau_neg,
            rollout_logps, is_correction, is_clip_min, is_clip_max, top_entropy_quantile, kl_coef,
            kl_estimator, entropy_coef, loss_agg, kl_agg, entropy_agg, total_tokens, total_sequences,
            norm_length: as in `ppo_loss`. The entropy of each token's softmax is computed in the
            same pass (the `entropy` metric is always reported); entropy_coef > 0 adds its gradient.
        ref_logps: `[B, T]` reference log-probs, needed when kl_coef > 0. A CONSTANT here (no
            gradient), unlike `ppo_loss` where it may require grad.
        temperature, softcap: as in `token_logprobs`.
        chunk_size: rows per chunk of fp32 logits (default: within 1.25 GiB on CUDA, 32 MiB on CPU).
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)` as `ppo_loss`: fp32 scalar loss; detached `pg_loss`, `clipfrac`,
        `approx_kl`, `ratio_mean`, `entropy`, plus `kl` (with ref_logps), `dual_clipfrac` (with
        dual_clip), `is_weight_mean` / `is_clipfrac` (with is_correction), `entropy_kept_frac` (with
        top_entropy_quantile < 1). The loss must be the final node: differentiating through its
        gradient raises.
    """
    check_hidden_args(hidden, weight, targets, bias, temperature, chunk_size, softcap)
    check_ndim("hidden", hidden, 3, "[B, T, H]")
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("rollout_logps", rollout_logps)):
        _check_token_tensor(name, tensor, targets)
    # A [B, T] float placeholder stands in for the log-probs and entropies this function computes
    # itself (shapes already checked against targets).
    placeholder = torch.empty((), device=hidden.device).expand(targets.shape)
    args = check_ppo_args(
        placeholder, placeholder if old_logps is None else old_logps, advantages, mask, loss_type=loss_type,
        ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps,
        is_correction=is_correction, is_clip_min=is_clip_min, is_clip_max=is_clip_max,
        top_entropy_quantile=top_entropy_quantile, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy=placeholder, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg, entropy_agg=entropy_agg,
        total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
    )
    check_same_device(hidden=hidden, old_logps=old_logps, advantages=advantages, mask=mask)
    softcap = check_softcap(softcap)
    totals = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    objective = dict(
        loss_type=loss_type, ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=args.clip_eps_high,
        dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps,
        is_correction=args.is_correction, is_clip_min=is_clip_min, is_clip_max=is_clip_max,
        top_entropy_quantile=top_entropy_quantile, ref_logps=ref_logps, kl_coef=kl_coef,
        kl_estimator=args.kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg,
        entropy_agg=entropy_agg, **totals,
    )
    if resolve_backend(backend, hidden, weight, targets, bias, old_logps, advantages, ref_logps,
                       rollout_logps) == "torch":
        return twin.policy_loss_from_hidden(hidden, weight, targets, old_logps, advantages, mask, bias=bias,
                                            temperature=temperature, softcap=softcap, chunk_size=chunk_size,
                                            **objective)

    mask_f = mask.to(torch.float32)

    def presweep():
        return token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                              return_entropy=True, chunk_size=chunk_size, backend="triton")

    row_scale, ppo = _policy_row_options(presweep, args, mask_f,
                                         dict(objective, old_logps=old_logps, advantages=advantages))

    def compute(hidden_rows, weight_, bias_, need):
        return _row_local_loss(
            hidden_rows, weight_, bias_, need, targets=targets.contiguous(), mask=mask_f.contiguous(),
            row_scale=row_scale, loss="ppo", scaling=(float(temperature), softcap), chunk=_chunk_arg(chunk_size),
            ppo=ppo, entropy_grad=entropy_coef != 0,
        )

    from fastrlhf.kernels.logprobs import rows_view

    loss, stats = _apply(compute, rows_view(hidden), weight, bias)
    metrics = ppo_metrics(stats, mask_f.sum().clamp(min=1), dual_clip=dual_clip, has_ref=ref_logps is not None,
                          has_entropy=True, is_correction=args.is_correction,
                          top_entropy_quantile=top_entropy_quantile)
    return loss, metrics


class _GradientInForwardFromLogits(torch.autograd.Function):
    """(loss, stats) of `compute(logits)`, which also writes d loss / d logits into `dlogits`:
    a new buffer, or (inplace) the logits themselves. Backward hands that buffer over, times
    grad_loss (one launch that does nothing when grad_loss is 1, the usual case).

    In place, the logits are marked dirty and returned as a third output: autograd then refuses
    every use of the overwritten values it can see. An earlier op that saved the logits for its
    backward fails there ("modified by an inplace operation"), and a later differentiable use of
    them sends a gradient to that output, which `backward` turns into an error."""

    @staticmethod
    def forward(ctx, logits, compute, inplace):
        dlogits = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss, stats = compute(logits, dlogits)
        ctx.dlogits = dlogits
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        if inplace:
            ctx.mark_dirty(logits)
            return loss, stats, logits
        return loss, stats

    @staticmethod
    @first_order_only("policy_loss_from_logits")
    def backward(ctx, grad_loss, _grad_stats, grad_overwritten=None):
        if grad_overwritten is not None:
            raise RuntimeError(
                "policy_loss_from_logits(..., inplace=True) overwrote the logits with their gradient, and they were "
                "used again afterwards; pass inplace=False when the logits are needed after the loss")
        dlogits, ctx.dlogits = ctx.dlogits, None
        if dlogits is None:
            raise RuntimeError(
                "backward through policy_loss_from_logits ran a second time (retain_graph=True): its gradient was "
                "computed in the forward pass and handed over by the first backward; call the loss again")
        if grad_loss is None:
            return None, None, None
        from fastrlhf.kernels.fused_head import scale_unless_one

        scale_unless_one(dlogits, grad_loss)
        return dlogits, None, None


def policy_loss_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "ppo",
    ratio_level: str = "token",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    rollout_logps: torch.Tensor | None = None,
    is_correction: str | None = None,
    is_clip_min: float | None = None,
    is_clip_max: float | None = 2.0,
    top_entropy_quantile: float = 1.0,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    kl_agg: str | None = None,
    entropy_agg: str | None = None,
    total_tokens: float | torch.Tensor | None = None,
    total_sequences: float | torch.Tensor | None = None,
    norm_length: float | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-family policy loss (PPO, GRPO, GSPO, CISPO, SAPO, TIS/MIS, high-entropy tokens) from the
    logits the model made, the gradient of the logits computed in the forward: Liger's
    `triton_grpo_loss` with every `ppo_loss` option.

    Equals `logps, ent = logprobs_from_logits(logits, targets, temperature=, softcap=,
    return_entropy=True)` followed by `ppo_loss(logps, old_logps, advantages, mask, ..., entropy=ent)`
    in value, metrics and d loss / d logits, with the logits read once: one program per row (the
    fused head's row kernel, `kernels/fused_head.py`) makes the row's log-sum-exp, log-prob and
    entropy in a first pass, the token's loss and d loss / d log-prob (the aggregation weights
    come from the mask before it), and in a second pass, back to front, writes the row's
    d loss / d logits. Rows outside the mask (or with target -100) are never read: their
    gradient rows are written as zeros, as is the last position of each sequence in the
    next-token layout. Backward hands the buffer over (times grad_output, in place, a no-op when
    that is 1: pass `total_tokens` / `total_sequences` rather than dividing the loss, or the
    division costs one more pass over the gradient).

    Bytes (B sequences, L tokens, V vocabulary, e bytes per logit, a fraction f of the tokens
    counted): first pass f·B·L·V·e, second pass f·B·L·V·e (its first blocks from L2), gradient
    B·(L+1)·V·e written once: at most (2f + 1)·B·(L+1)·V·e. B = 16, L = 1024, V = 151936 bf16
    (4.98 GB of logits), f = 0.75 (the benchmark's ragged masks): <= 12.5 GB, 2.6 ms at the
    H200's 4.8 TB/s; Liger's forward + backward kernels move the same 2 reads and 1 write
    (measured 3.09 ms on the H200, 2026-11-26), its second read from HBM. Forward only (no
    gradient wanted): f·B·L·V·e, 0.8 ms. ~25 FLOPs per logit read.
    Memory: one logits-sized gradient (as Liger with inplace=False); none with `inplace=True`.

    Args:
        logits: the model's `[B, T + 1, V]` logits (next-token layout: position t scores
            targets[t], the last position nothing), or `[B, T, V]` aligned with targets; any float
            dtype, strided views included (unit stride over V).
        targets: `[B, T]` token ids (input_ids[:, 1:] of the sequences); -100 = ignored (logp 0,
            entropy 0, no gradient; still counted in the loss if `mask` says so, as in the composition).
        old_logps: `[B, T]` log-probs of the sampling policy, or None on-policy (the current
            log-probs as constants, ratio 1, GRPOTrainer's single-pass case). advantages: `[B, T]`
            or `[B]`. mask: `[B, T]` bool/int/float. ref_logps: `[B, T]`, needed when kl_coef > 0.
            All constants: only the logits get a gradient.
        loss_type ... norm_length: as in `ppo_loss`; the entropy is the logits' own (the `entropy`
            metric is always reported; entropy_coef > 0 adds its gradient).
        temperature, softcap: as in `logprobs_from_logits`.
        inplace: write the gradient over the logits (no second logits-sized buffer), for callers
            that do not need the logits after this call (Liger's `inplace=True`). Refused
            (ValueError) for logits that are a leaf or a view; autograd refuses the overwritten
            logits wherever it sees them used again (see `_GradientInForwardFromLogits`). A use
            outside autograd (reading them under no_grad) would see the gradient.
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)` as `policy_loss_from_hidden`. The loss must be the final node:
        differentiating through its gradient raises, and so does a second backward.
    """
    check_logits_args(logits, targets, temperature, softcap)
    check_ndim("logits", logits, 3, "[B, T + 1, V] or [B, T, V]")
    check_ndim("targets", targets, 2, "[B, T]")
    check_bool("inplace", inplace)
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps), ("rollout_logps", rollout_logps)):
        _check_token_tensor(name, tensor, targets)
    placeholder = torch.empty((), device=logits.device).expand(targets.shape)
    args = check_ppo_args(
        placeholder, placeholder if old_logps is None else old_logps, advantages, mask, loss_type=loss_type,
        ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
        sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps,
        is_correction=is_correction, is_clip_min=is_clip_min, is_clip_max=is_clip_max,
        top_entropy_quantile=top_entropy_quantile, ref_logps=ref_logps, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy=placeholder, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg, entropy_agg=entropy_agg,
        total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
    )
    check_same_device(logits=logits, old_logps=old_logps, advantages=advantages, mask=mask)
    softcap = check_softcap(softcap)
    wants_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace and wants_grad and (logits.is_leaf or logits._is_view()):
        raise ValueError(
            "inplace=True writes the gradient over the logits, so they must be the model's own output tensor: "
            f"got a {'leaf tensor that requires grad' if logits.is_leaf else 'view of another tensor'} "
            f"(shape {tuple(logits.shape)}); pass inplace=False")
    objective = dict(
        loss_type=loss_type, ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=args.clip_eps_high,
        dual_clip=dual_clip, sapo_tau_pos=sapo_tau_pos, sapo_tau_neg=sapo_tau_neg, rollout_logps=rollout_logps,
        is_correction=args.is_correction, is_clip_min=is_clip_min, is_clip_max=is_clip_max,
        top_entropy_quantile=top_entropy_quantile, ref_logps=ref_logps, kl_coef=kl_coef,
        kl_estimator=args.kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg, kl_agg=kl_agg,
        entropy_agg=entropy_agg, total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length,
    )
    if resolve_backend(backend, logits, targets, old_logps, advantages, ref_logps, rollout_logps) == "torch":
        return twin.policy_loss_from_logits(logits, targets, old_logps, advantages, mask, temperature=temperature,
                                            softcap=softcap, inplace=inplace, **objective)

    mask_f = mask.to(torch.float32)

    def presweep():
        return logprobs_from_logits(logits.detach(), targets, temperature=temperature, softcap=softcap,
                                    return_entropy=True, backend="triton")

    row_scale, ppo = _policy_row_options(presweep, args, mask_f,
                                         dict(objective, old_logps=old_logps, advantages=advantages))
    B, T = targets.shape
    next_token = logits.shape[1] == T + 1

    def compute(rows, dlogits):
        kernels = _kernels()
        stats = torch.empty((B * T, len(kernels.ROW_STATS["ppo"])), dtype=torch.float32, device=rows.device)
        kernels.fused_head_rows(
            rows, dlogits, targets.reshape(-1).contiguous(), mask_f.reshape(-1).contiguous(), row_scale, stats,
            row0=0, seq_len=T, loss="ppo", temperature=float(temperature), softcap=softcap, ppo=ppo,
            entropy_grad=entropy_coef != 0, next_token=next_token, reverse_grad=dlogits is not None,
        )
        totals = stats.sum(0)
        return totals[0].clone(), totals  # a clone: the differentiable loss must not view the stats

    rows = logits if logits.stride(-1) == 1 else logits.contiguous()
    if wants_grad:
        loss, stats, *_ = _GradientInForwardFromLogits.apply(rows, compute, inplace)
    else:
        loss, stats = compute(rows.detach(), None)
    metrics = ppo_metrics(stats, mask_f.sum().clamp(min=1), dual_clip=dual_clip, has_ref=ref_logps is not None,
                          has_entropy=True, is_correction=args.is_correction,
                          top_entropy_quantile=top_entropy_quantile)
    return loss, metrics


# --------------------------------------------------------------------------- SFT


def _sft_row_scale(mask_f: torch.Tensor, loss_agg: str, total_tokens, total_sequences) -> torch.Tensor:
    """Per-sequence weight of the SFT trainer's aggregations, mask_f `[B, T]` -> `[B]` (torch ops)."""
    if loss_agg == "token-mean":
        return aggregation_row_scale(mask_f, "token-mean", total_tokens=total_tokens)
    # mean over all sequences (an empty one counts as 0) of each sequence's mean token NLL
    sequences = max(mask_f.shape[0], 1) if total_sequences is None else torch.as_tensor(total_sequences).to(mask_f)
    return 1.0 / (mask_f.sum(-1).clamp(min=1) * sequences)


def sft_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    loss_agg: str = "token-mean",
    total_tokens: float | torch.Tensor | None = None,
    total_sequences: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT loss straight from the final hidden states, gradients computed in the forward.

    "token-mean" (default): mean NLL over the non-ignored targets, `-sum(logp) / max(count, 1)`,
    which is what `SFTTrainer` computes from `token_logprobs` with mask = targets != -100;
    "seq-mean-token-mean" (SFTTrainer's other option, `targets` `[B, T]`): the mean over all B
    sequences of each one's mean token NLL. 6·N·V·H FLOPs fwd+bwd, no `[N, V]` logits.
    total_tokens (token-mean) / total_sequences (seq-mean-token-mean) replace the count / B by the
    WHOLE batch's (all micro-batches and ranks of an optimizer step; every sequence counts, empty
    ones too), so that micro-batch losses add up to the full-batch loss exactly (as in `ppo_loss`).

    Args:
        hidden: `[N, H]` or `[B, T, H]` (strided views included). weight: `[V, H]`. bias: `[V]`.
        targets: hidden's leading shape; -100 marks tokens outside the loss (no logits read for them).
        softcap: Gemma-2 logit soft-cap, as in `token_logprobs`.
        total_tokens, total_sequences: None (this call's counts), a number > 0, or a one-element
            tensor on hidden's device (no host sync).
        chunk_size, backend: as in `policy_loss_from_hidden`.

    Returns:
        `(loss, metrics)`: fp32 scalar loss; metrics `{}` (SFTTrainer logs the loss only). Final
        node only: differentiating through its gradient raises.
    """
    check_hidden_args(hidden, weight, targets, bias, 1.0, chunk_size, softcap)
    check_choice("loss_agg", loss_agg, SFT_LOSS_AGGS)
    if loss_agg != "token-mean":
        check_ndim("targets", targets, 2, "[B, T]")
    softcap = check_softcap(softcap)
    check_totals(total_tokens, total_sequences, None, hidden.device)
    if resolve_backend(backend, hidden, weight, targets, bias) == "torch":
        return twin.sft_loss_from_hidden(hidden, weight, targets, bias=bias, softcap=softcap,
                                         loss_agg=loss_agg, total_tokens=total_tokens,
                                         total_sequences=total_sequences, chunk_size=chunk_size)
    token_targets = (targets.reshape(1, -1) if targets.dim() != 2 else targets).contiguous()
    mask_f = (token_targets != IGNORE_INDEX).float()
    row_scale = _sft_row_scale(mask_f, loss_agg, total_tokens, total_sequences)

    def compute(hidden_rows, weight_, bias_, need):
        return _row_local_loss(
            hidden_rows, weight_, bias_, need, targets=token_targets, mask=mask_f,
            row_scale=row_scale, loss="nll", scaling=(1.0, softcap), chunk=_chunk_arg(chunk_size),
        )

    from fastrlhf.kernels.logprobs import rows_view

    loss, _stats = _apply(compute, rows_view(hidden), weight, bias)
    return loss, {}


# --------------------------------------------------------------------------- DPO family


def _pair_ranges(p0: int, p1: int, pairs: int, seq_len: int) -> list[tuple[int, int]]:
    """Row ranges of pairs [p0, p1): their chosen rows, then their rejected rows."""
    return [(p0 * seq_len, p1 * seq_len), ((pairs + p0) * seq_len, (pairs + p1) * seq_len)]


def _dpo_pair_chunks(hidden, weight, bias, need, *, targets, refs, options, scaling, max_pairs, explicit):
    """(loss, stats, grads) over chunks of whole pairs (6·N·V·H): pass 1, per-pair gradient, pass 2."""
    from fastrlhf.kernels.logprobs import logprobs_backward, logprobs_forward
    from fastrlhf.kernels.preference import dpo_loss_forward

    two_b, seq_len = targets.shape
    pairs = two_b // 2
    flat_targets = targets.reshape(-1)
    token_mask = (targets != IGNORE_INDEX).float()
    lengths = token_mask.sum(-1).clamp(min=1) if options["average"] else None
    seq = torch.zeros(two_b, dtype=torch.float32, device=hidden.device)
    write_grad = any(need)
    temperature, softcap = scaling
    ref_chosen, ref_rejected = refs

    def process(logits, ranges):
        (c0, c1), (r0, r1) = ranges
        p0, p1 = c0 // seq_len, c1 // seq_len
        k = p1 - p0
        rows = torch.cat([flat_targets[c0:c1], flat_targets[r0:r1]])
        logps, lse, _ = logprobs_forward(logits, rows, temperature=temperature, softcap=softcap)
        # sequence_logps, in its own arithmetic: where(m, logp, 0) * m summed (/ length when averaged)
        seq_ids = torch.cat([torch.arange(p0, p1, device=seq.device), torch.arange(pairs + p0, pairs + p1,
                                                                                 device=seq.device)])
        m = token_mask[seq_ids]
        chunk_seq = (torch.where(m != 0, logps.view(2 * k, seq_len), 0.0) * m).sum(-1)
        if lengths is not None:
            chunk_seq = chunk_seq / lengths[seq_ids]
        seq[seq_ids] = chunk_seq
        if not write_grad:
            return None
        chosen, rejected = chunk_seq[:k], chunk_seq[k:]
        _loss, _stats, grad_chosen, grad_rejected = dpo_loss_forward(
            chosen, rejected,
            None if ref_chosen is None else ref_chosen[p0:p1].contiguous(),
            None if ref_rejected is None else ref_rejected[p0:p1].contiguous(),
            beta=options["beta"], loss_type=options["loss_type"], label_smoothing=options["label_smoothing"],
            gamma=options["gamma"],
        )
        # The kernel averaged over these k pairs; the loss averages over all of them.
        per_sequence = torch.cat([grad_chosen, grad_rejected]) * (k / pairs)
        if lengths is not None:
            per_sequence = per_sequence / lengths[seq_ids]
        grad_logps = (per_sequence[:, None] * m).reshape(-1)
        out = _kernels().dlogits_view(logits, weight.dtype)
        return logprobs_backward(logits, rows, lse, None, grad_logps, None, temperature=temperature,
                                 softcap=softcap, out=out)

    pair_spans = _balanced_spans(pairs, max_pairs, explicit)
    chunks = [_pair_ranges(p0, p1, pairs, seq_len) for p0, p1 in pair_spans]
    grads = _head_sweep(hidden, weight, bias, chunks, need, process, flat_targets != IGNORE_INDEX)
    loss, metrics = dpo_loss(seq[:pairs], seq[pairs:], ref_chosen, ref_rejected, beta=options["beta"],
                             loss_type=options["loss_type"], label_smoothing=options["label_smoothing"],
                             gamma=options["gamma"], backend="triton")
    return loss, metrics, grads


def _dpo_two_phases(hidden, weight, bias, need, *, targets, refs, options, scaling, chunk_rows):
    """(loss, metrics, grads) when one pair does not fit a chunk: `token_logprobs` forward, the pair
    sums, `dpo_loss`, and token_logprobs' recompute backward run under an inner autograd (8·N·V·H)."""

    temperature, softcap = scaling
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(wanted) for t, wanted in
                  zip((hidden, weight, bias), need)]
        logps = token_logprobs(leaves[0], leaves[1], targets.reshape(hidden.shape[:-1]), bias=leaves[2],
                               temperature=temperature, softcap=softcap, chunk_size=chunk_rows, backend="triton")
        seq = sequence_logps(logps.reshape(targets.shape), targets != IGNORE_INDEX, average=options["average"])
        chosen, rejected = seq.chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, *refs, beta=options["beta"], loss_type=options["loss_type"],
                                 label_smoothing=options["label_smoothing"], gamma=options["gamma"],
                                 backend="triton")
        wrt = [t for t, wanted in zip(leaves, need) if wanted]
        found = iter(torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else ())
    grads = [next(found) if wanted else None for wanted in need]
    grads = [g if g is not None or not wanted else torch.zeros_like(t) for g, t, wanted in
             zip(grads, (hidden, weight, bias), need)]
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, tuple(grads)


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss straight from the final hidden states, gradients computed in the forward.

    Rows are batched as `DPOTrainer` does: `hidden [2B, T, H]` holds the B chosen sequences first,
    then the B rejected ones (pair b = rows b and B + b); `targets [2B, T]` with -100 outside the
    completion. Equals what `DPOTrainer.compute_loss` computes: `token_logprobs` -> `sequence_logps`
    over targets != -100 (length-averaged for ipo, simpo and orpo: SimPO's length normalisation,
    ORPO's per-sequence mean NLL term) -> `.chunk(2)` -> `dpo_loss`; in value, metrics and the
    gradients w.r.t. hidden, weight and bias. 6·N·V·H FLOPs when one pair's 2T rows fit a chunk,
    else 8·N·V·H (module docstring).

    Args:
        hidden, weight, bias, targets, temperature, softcap: as in `token_logprobs`, hidden 3-D.
        ref_chosen_logps, ref_rejected_logps: `[B]` reference sequence log-probs (summed, or
            averaged for ipo); CONSTANTS here (no gradient). None for simpo and orpo.
        beta, loss_type, label_smoothing, gamma: as in `dpo_loss` (gamma: SimPO's margin).
        chunk_size: rows per chunk; whole pairs go in a chunk while 2T <= chunk_size.
        backend: "auto" | "triton" | "torch".

    Returns:
        `(loss, metrics)` as `dpo_loss` (TRL names; orpo adds nll_loss, log_odds_ratio,
        log_odds_chosen). Final node only: differentiating through its gradient raises.
    """
    check_hidden_args(hidden, weight, targets, bias, temperature, chunk_size, softcap)
    check_ndim("hidden", hidden, 3, "[2B, T, H]")
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] (B chosen rows, then B rejected rows), got {tuple(hidden.shape)}")
    pairs = hidden.shape[0] // 2
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is not None:
            check_floating(name, ref)
            if ref.shape != (pairs,):
                raise ValueError(f"{name} must be [B] = ({pairs},) for hidden of {2 * pairs} rows, "
                                 f"got {tuple(ref.shape)}")
    placeholder = torch.empty((), device=hidden.device).expand(pairs)  # stands in for the policy's [B] logps
    check_dpo_args(placeholder, placeholder, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
                   label_smoothing, gamma)
    softcap = check_softcap(softcap)
    if resolve_backend(backend, hidden, weight, targets, bias, ref_chosen_logps, ref_rejected_logps) == "torch":
        return twin.dpo_loss_from_hidden(
            hidden, weight, targets, ref_chosen_logps, ref_rejected_logps, bias=bias, beta=beta,
            loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma, temperature=temperature,
            softcap=softcap, chunk_size=chunk_size,
        )
    refs = tuple(None if r is None else r.detach() for r in (ref_chosen_logps, ref_rejected_logps))
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=gamma,
                   average=loss_type in LENGTH_AVERAGED_LOSS_TYPES)
    seq_len = targets.shape[1]
    max_rows = _max_chunk_rows(chunk_size, weight.shape[0], hidden.device)
    max_pairs = max_rows // max(2 * seq_len, 1)
    scaling = (float(temperature), softcap)
    names = []  # the metric names dpo_loss returns for this loss type

    def compute(hidden_rows, weight_, bias_, need):
        if pairs and max_pairs == 0:
            loss, metrics, grads = _dpo_two_phases(hidden_rows, weight_, bias_, need, targets=targets, refs=refs,
                                                   options=options, scaling=scaling, chunk_rows=max_rows)
        else:
            loss, metrics, grads = _dpo_pair_chunks(
                hidden_rows, weight_, bias_, need, targets=targets.contiguous(), refs=refs, options=options,
                scaling=scaling, max_pairs=max(max_pairs, 1), explicit=chunk_size is not None,
            )
        names[:] = metrics
        return loss, torch.stack(list(metrics.values())), grads

    from fastrlhf.kernels.logprobs import rows_view

    loss, stats = _apply(compute, rows_view(hidden), weight, bias)
    return loss, dict(zip(names, stats.unbind()))
