"""The fused RL head (policy / DPO / SFT losses from hidden states, gradients computed in the forward):
Triton path vs the PyTorch twin (the composition token_logprobs + loss) vs an independent float64
closed form, values, metrics and the gradients of hidden, weight and bias.

The float64 closed forms are the suite's own, written from the formulas (none calls a twin):
`test_logprobs.closed_form` (log-softmax, entropy and d loss / d logits for given per-token
upstream gradients), `test_ppo.ppo_closed_form` (per-token PPO loop with hand-derived
derivatives), `test_preference.closed_form_dpo` (per-pair DPO losses, gradients by central
differences). Chained: logits -> logps/entropy -> loss and d loss / d (logps, entropy) -> d logits ->
dH = dlogits W, dW = dlogits^T h, db = sum dlogits.

Tolerances (relative to max(1, |expected|.max()), as in test_logprobs): fp32 2e-5 for values,
metrics and gradients; bf16: values and metrics 1e-4 (the logits are fp32 products of the exact
bf16 numbers on both paths), gradients 2e-2 (returned in bf16; dW summed in bf16 per chunk).
"""
from __future__ import annotations

import pytest
import torch
from test_logprobs import Allocations, LargestAllocation, assert_close, closed_form
from test_ppo import ppo_closed_form
from test_preference import closed_form_dpo
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastrlhf

IGNORE = -100
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
H = 16


# --------------------------------------------------------------------------- inputs


def make_head(lead, V, dtype, device, *, bias=False, shift=False, scale=3.0):
    """hidden of shape lead + (H,) (with shift: the strided view hidden[:, :-1] of a [B, T+1, H]
    tensor, returned as (view, full)), weight [V, H], bias [V]."""
    full_lead = (lead[0], lead[1] + 1, *lead[2:]) if shift else lead
    full = torch.randn(*full_lead, H, device=device).to(dtype)
    hidden = full[:, :-1] if shift else full
    weight = (torch.randn(V, H, device=device) * H**-0.5 * scale).to(dtype)
    b = (torch.randn(V, device=device) * 0.5).to(dtype) if bias else None
    return hidden, full, weight, b


def float64_logits(hidden, weight, bias):
    h = hidden.double().reshape(-1, hidden.shape[-1])
    return h @ weight.double().T + (0 if bias is None else bias.double()), h


def head_grads(dlogits, h, weight, bias, hidden_shape):
    """(dH, dW, db) of a float64 d loss / d logits [N, V]."""
    return [(dlogits @ weight.double()).reshape(hidden_shape), dlogits.T @ h,
            None if bias is None else dlogits.sum(0)]


def run(fn, hidden_full, weight, bias, *args, shift=False, grad_scale=1.0, **kwargs):
    """fn(hidden, weight, *args, bias=, **kwargs) forward + backward of grad_scale·loss.
    Returns (loss, metrics, [dH, dW, db]) with dH w.r.t. the rows actually passed."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden_full, weight, bias)]
    hidden = leaves[0][:, :-1] if shift else leaves[0]
    loss, metrics = fn(hidden, leaves[1], *args, bias=leaves[2], **kwargs)
    (loss * grad_scale).backward()
    grads = [None if t is None else t.grad for t in leaves]
    if shift:
        assert (grads[0][:, -1] == 0).all()
        grads[0] = grads[0][:, :-1]
    return loss.detach(), metrics, grads


def as_expected(value, like):
    """A closed-form number (Python float or float64 tensor) on `like`'s device."""
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


def check_result(result, expected, dtype, what):
    loss, metrics, grads = result
    exp_loss, exp_metrics, exp_grads = expected
    assert loss.dtype == torch.float32 and loss.dim() == 0, what
    assert set(metrics) == set(exp_metrics), (what, set(metrics) ^ set(exp_metrics))
    assert_close(loss, as_expected(exp_loss, loss), VALUE_TOL[dtype], f"{what} loss")
    for name, value in metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, (what, name)
        assert_close(value, as_expected(exp_metrics[name], value), VALUE_TOL[dtype], f"{what} {name}")
    for name, grad, exp in zip(("hidden", "weight", "bias"), grads, exp_grads):
        if exp is None:
            assert grad is None, (what, name)
            continue
        assert grad.shape == exp.shape, (what, name)
        assert_close(grad, exp, GRAD_TOL[dtype], f"{what} d{name}")


# --------------------------------------------------------------------------- policy (PPO / GRPO)


def policy_inputs(B, T, V, dtype, device, *, bias=False, shift=False, spread=0.6):
    hidden, full, weight, b = make_head((B, T), V, dtype, device, bias=bias, shift=shift)
    targets = torch.randint(0, V, (B, T), device=device)
    targets[-1, -1] = V - 1
    mask = torch.rand(B, T, device=device) > 0.25
    mask[0, :2] = True
    mask[1] = False  # a fully masked sequence
    targets[0, 1] = IGNORE  # ignored target inside the mask: counts with logp 0, no gradient
    targets[2 % B, T // 2] = IGNORE
    logits, _ = float64_logits(hidden, weight, b)
    zeros = torch.zeros(B * T, device=device)
    logps, _, _ = closed_form(logits, targets.reshape(-1), 1.0, zeros, zeros)
    logps = logps.reshape(B, T).float()
    old = logps + torch.randn(B, T, device=device) * spread
    ref = logps + torch.randn(B, T, device=device) * spread
    adv = torch.randn(B, T, device=device)
    return dict(hidden=hidden, full=full, weight=weight, bias=b, targets=targets, old=old, adv=adv, mask=mask,
                ref=ref)


def policy_closed_form(x, *, temperature=1.0, softcap=None, ref_logps=None, rollout_logps=None, **ppo):
    """float64 (loss, metrics, [dH, dW, db]) of the policy loss, from the formulas."""
    aliases = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}  # verl's names (ppo_closed_form knows k1-k3)
    if "kl_estimator" in ppo:
        ppo["kl_estimator"] = aliases.get(ppo["kl_estimator"], ppo["kl_estimator"])
    hidden, weight, b, targets = x["hidden"], x["weight"], x["bias"], x["targets"]
    logits, h = float64_logits(hidden, weight, b)
    flat = targets.reshape(-1)
    zeros = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
    logps, entropy, _ = closed_form(logits, flat, temperature, zeros, zeros, softcap)
    old = logps.reshape(targets.shape) if x["old"] is None else x["old"]  # None: on-policy
    loss, metrics, grads = ppo_closed_form(
        logps.reshape(targets.shape), old, x["adv"], x["mask"], ref=ref_logps, rollout=rollout_logps,
        entropy=entropy.reshape(targets.shape), **ppo)
    g = torch.as_tensor(grads["logps"], device=flat.device).reshape(-1)
    gh = torch.as_tensor(grads["entropy"], device=flat.device).reshape(-1)
    _, _, dlogits = closed_form(logits, flat, temperature, g, gh, softcap)
    return loss, metrics, head_grads(dlogits, h, weight, b, hidden.shape)


def run_policy(x, backend, *, shift=False, **kwargs):
    return run(fastrlhf.policy_loss_from_hidden, x["full"] if shift else x["hidden"], x["weight"], x["bias"],
               x["targets"], x["old"], x["adv"], x["mask"], shift=shift, backend=backend, **kwargs)


def run_policy_recompute(x, **kwargs):
    """The recompute path on the Triton backend: token_logprobs + ppo_loss."""
    opts = {k: v for k, v in kwargs.items() if k in ("temperature", "softcap", "chunk_size")}
    ppo = {k: v for k, v in kwargs.items() if k not in opts}

    def fn(hidden, weight, targets, old, adv, mask, *, bias):
        logps, ent = fastrlhf.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                             backend="triton", **opts)
        return fastrlhf.ppo_loss(logps, old, adv, mask, entropy=ent, backend="triton", **ppo)

    return run(fn, x["hidden"], x["weight"], x["bias"], x["targets"], x["old"], x["adv"], x["mask"])


POLICY_CASES = {
    "defaults": dict(),
    "clip-higher": dict(clip_eps=0.1, clip_eps_high=0.3),
    "dual-clip": dict(dual_clip=2.0),
    "kl-k1": dict(kl_coef=0.1, kl_estimator="k1"),
    "kl-k2": dict(kl_coef=0.1, kl_estimator="mse"),
    "kl-k3-entropy": dict(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01),
    "seq-mean-token-mean": dict(loss_agg="seq-mean-token-mean", entropy_coef=0.02),
    "seq-mean-token-sum-norm": dict(loss_agg="seq-mean-token-sum-norm", dual_clip=3.0),
    "temperature": dict(temperature=0.7, entropy_coef=0.01),
    "softcap": dict(softcap=2.0, kl_coef=0.1, entropy_coef=0.01),
    # the objectives of issue 11 (tests/test_objectives.py covers them on ppo_loss)
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", kl_coef=0.05),
    "cispo": dict(loss_type="cispo", clip_eps_high=0.28, entropy_coef=0.01),
    "sapo": dict(loss_type="sapo", sapo_tau_neg=2.0, kl_coef=0.1, kl_estimator="k1"),
    "tis": dict(is_correction="token_truncate", is_clip_max=1.3),
    "seq-mask": dict(is_correction="sequence_mask", is_clip_min=0.3, is_clip_max=3.0, dual_clip=2.0),
    "entropy-top": dict(top_entropy_quantile=0.3, entropy_coef=0.01),
    "seq-adv": dict(seq_adv=True, clip_eps_high=0.3),
    "own-aggs-totals": dict(loss_agg="seq-mean-token-sum-norm", kl_agg="token-mean", entropy_agg="seq-mean-token-mean",
                            kl_coef=0.1, entropy_coef=0.02, total_sequences=5.0, norm_length=9.0, total_tokens=20.0),
}


def policy_case(case, x, **extra):
    """(kwargs, the inputs) of a POLICY_CASES entry: the reference / rollout log-probs and [B]
    advantages it needs put in place."""
    kwargs = dict(POLICY_CASES[case], **extra)
    x = dict(x)
    if kwargs.pop("seq_adv", False):
        x["adv"] = torch.randn(x["adv"].shape[0], device=x["adv"].device)
    if "kl_coef" in kwargs:
        kwargs["ref_logps"] = x["ref"]
    if "is_correction" in kwargs:
        kwargs["rollout_logps"] = x["old"] + 0.4 * torch.randn_like(x["old"])
    return kwargs, x


@pytest.mark.parametrize("V,bias,shift", [(131, False, True), (1000, True, False)])
@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy_matches_twin_closed_form_and_recompute_path(case, V, bias, shift, device):
    """fp32; chunk_size 5 over sequences of 7 tokens puts chunk boundaries inside sequences."""
    B, T = 3, 7
    kwargs, x = policy_case(case, policy_inputs(B, T, V, torch.float32, device, bias=bias, shift=shift), chunk_size=5)
    closed_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size",)}
    expected = policy_closed_form(x, **closed_kwargs)
    for backend in ("triton", "torch"):
        check_result(run_policy(x, backend, shift=shift, **kwargs), expected, torch.float32, f"{case} {backend}")
    check_result(run_policy_recompute(x, **kwargs), expected, torch.float32, f"{case} token_logprobs+ppo_loss")


@pytest.mark.parametrize("case", ["kl-k3-entropy", "softcap", "gspo", "tis"])
def test_policy_bf16(case, device):
    kwargs, x = policy_case(case, policy_inputs(3, 5, 1000, torch.bfloat16, device, bias=True), chunk_size=6)
    kwargs["ref_logps"] = x["ref"]
    expected = policy_closed_form(x, **{k: v for k, v in kwargs.items() if k != "chunk_size"})
    for backend in ("triton", "torch"):
        result = run_policy(x, backend, **kwargs)
        assert all(g.dtype == torch.bfloat16 for g in result[2])
        check_result(result, expected, torch.bfloat16, f"bf16 {case} {backend}")


@pytest.mark.parametrize("options", [{}, dict(ratio_level="sequence", top_entropy_quantile=0.5),
                                     dict(is_correction="sequence_truncate", is_clip_min=0.5, is_clip_max=1.5),
                                     dict(is_correction="token_mask", is_clip_min=0.8, is_clip_max=1.2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_on_policy_without_old_logps(dtype, options, device):
    """old_logps=None: the current log-probs as constants (GRPO's single pass): ratio 1, no clipping,
    d loss / d logp = -A w; the same as passing those log-probs. GSPO's sequence ratio is 1 too (no
    pre-sweep for it); the entropy selection and a sequence-level IS weight still need one."""
    x = policy_inputs(3, 5, 1000, dtype, device, bias=True)
    rollout = x["old"] + 0.3 * torch.randn_like(x["old"])
    x["old"] = None
    kwargs = dict(ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01, dual_clip=2.0, chunk_size=4, **options)
    if "is_correction" in options:
        kwargs["rollout_logps"] = rollout
    expected = policy_closed_form(x, **{k: v for k, v in kwargs.items() if k != "chunk_size"})
    assert expected[1]["ratio_mean"] == pytest.approx(1.0) and expected[1]["clipfrac"] == 0
    for backend in ("triton", "torch"):
        check_result(run_policy(x, backend, **kwargs), expected, dtype, f"on-policy {backend}")


def test_policy_large_prime_vocab(device):
    """V = 32003 (prime) with few rows and a tiny H."""
    x = policy_inputs(3, 2, 32003, torch.float32, device)
    kwargs = dict(ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01, dual_clip=2.0)
    expected = policy_closed_form(x, **kwargs)
    check_result(run_policy(x, "triton", **kwargs), expected, torch.float32, "V=32003")


def test_policy_default_chunking_and_one_row_chunks(device):
    """Default chunk size (one chunk here), and chunks of a single row."""
    x = policy_inputs(3, 4, 131, torch.float32, device, bias=True)
    kwargs = dict(ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01)
    expected = policy_closed_form(x, **kwargs)
    for chunk_size in (None, 1):
        check_result(run_policy(x, "triton", chunk_size=chunk_size, **kwargs), expected, torch.float32,
                     f"chunk_size={chunk_size}")


# --------------------------------------------------------------------------- DPO family


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")


def dpo_options(loss_type):
    return dict(beta=0.3 if loss_type != "ipo" else 0.5, loss_type=loss_type,
                label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0,
                gamma=0.4 if loss_type == "simpo" else 0.0)


def dpo_inputs(pairs, T, V, dtype, device, *, loss_type, bias=False, shift=False):
    hidden, full, weight, b = make_head((2 * pairs, T), V, dtype, device, bias=bias, shift=shift)
    targets = torch.randint(0, V, (2 * pairs, T), device=device)
    targets[:, 0] = IGNORE  # prompt positions
    targets[pairs, :2] = IGNORE  # ragged completions
    targets[-1, 1:] = IGNORE  # an almost empty rejected completion
    refs = (None, None)
    if loss_type not in ("simpo", "orpo"):
        scale = 1.0 if loss_type == "ipo" else T
        refs = tuple(-torch.rand(pairs, device=device) * 4 * scale for _ in range(2))
    return dict(hidden=hidden, full=full, weight=weight, bias=b, targets=targets, refs=refs)


CLOSED_FORM_AVERAGED = ("ipo", "simpo", "orpo")  # length-normalised sequence log-probs


def dpo_closed_form(x, options, *, temperature=1.0, softcap=None):
    hidden, weight, b, targets = x["hidden"], x["weight"], x["bias"], x["targets"]
    logits, h = float64_logits(hidden, weight, b)
    flat = targets.reshape(-1)
    zeros = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
    logps, _, _ = closed_form(logits, flat, temperature, zeros, zeros, softcap)
    m = (targets != IGNORE).double()
    length = m.sum(-1).clamp(min=1) if options["loss_type"] in CLOSED_FORM_AVERAGED else torch.ones_like(m[:, 0])
    seq = (logps.reshape(targets.shape) * m).sum(-1) / length
    pairs = targets.shape[0] // 2
    loss, metrics, grads = closed_form_dpo((seq[:pairs], seq[pairs:], *x["refs"]), options["beta"],
                                           options["loss_type"], options["label_smoothing"], options["gamma"])
    d_seq = torch.tensor(grads[0] + grads[1], dtype=torch.float64, device=flat.device)
    g = (d_seq[:, None] * m / length[:, None]).reshape(-1)
    _, _, dlogits = closed_form(logits, flat, temperature, g, zeros, softcap)
    return loss, metrics, head_grads(dlogits, h, weight, b, hidden.shape)


def run_dpo(x, backend, options, *, shift=False, **kwargs):
    return run(fastrlhf.dpo_loss_from_hidden, x["full"] if shift else x["hidden"], x["weight"], x["bias"],
               x["targets"], *x["refs"], shift=shift, backend=backend, **options, **kwargs)


# pairs = 3, T = 5: chunk_size 10 = one pair per chunk, 20 = two pairs then one, 4 < 2T = the
# two-phase fallback (row chunks of 4, boundaries inside sequences), None = one chunk of 3 pairs.
DPO_CHUNKS = {"sigmoid": 4, "robust": 10, "hinge": 20, "ipo": None, "simpo": 10, "orpo": 4}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_matches_twin_and_closed_form(loss_type, device):
    options = dpo_options(loss_type)
    x = dpo_inputs(3, 5, 131, torch.float32, device, loss_type=loss_type, bias=loss_type in ("hinge", "orpo"),
                   shift=loss_type in ("robust", "orpo"))
    expected = dpo_closed_form(x, options)
    for backend in ("triton", "torch"):
        result = run_dpo(x, backend, options, shift=loss_type in ("robust", "orpo"),
                         chunk_size=DPO_CHUNKS[loss_type])
        check_result(result, expected, torch.float32, f"{loss_type} {backend}")


@pytest.mark.parametrize("chunk_size", [4, 10, 20, None])
def test_dpo_chunkings_temperature_softcap(chunk_size, device):
    options = dpo_options("sigmoid")
    x = dpo_inputs(3, 5, 1000, torch.float32, device, loss_type="sigmoid", bias=True)
    expected = dpo_closed_form(x, options, temperature=0.8, softcap=3.0)
    result = run_dpo(x, "triton", options, chunk_size=chunk_size, temperature=0.8, softcap=3.0)
    check_result(result, expected, torch.float32, f"chunk_size={chunk_size}")


@pytest.mark.parametrize("chunk_size", [4, 10])
def test_dpo_bf16(chunk_size, device):
    options = dpo_options("orpo")
    x = dpo_inputs(2, 5, 1000, torch.bfloat16, device, loss_type="orpo", bias=True)
    expected = dpo_closed_form(x, options)
    for backend in ("triton", "torch"):
        check_result(run_dpo(x, backend, options, chunk_size=chunk_size), expected, torch.bfloat16,
                     f"bf16 {backend}")


def test_dpo_length_averaging_is_the_contracts():
    """The closed form above averages exactly the loss types the contract says the library
    (dpo_loss_from_hidden and DPOTrainer) averages."""
    from fastrlhf.contracts import LENGTH_AVERAGED_LOSS_TYPES

    assert set(LENGTH_AVERAGED_LOSS_TYPES) == set(CLOSED_FORM_AVERAGED)


# --------------------------------------------------------------------------- SFT


def sft_closed_form(x, loss_agg, softcap=None):
    hidden, weight, b, targets = x["hidden"], x["weight"], x["bias"], x["targets"]
    logits, h = float64_logits(hidden, weight, b)
    flat = targets.reshape(-1)
    zeros = torch.zeros(flat.shape, dtype=torch.float64, device=flat.device)
    logps, _, _ = closed_form(logits, flat, 1.0, zeros, zeros, softcap)
    m = (targets != IGNORE).double()
    if loss_agg == "token-mean":
        w = m / m.sum().clamp(min=1)
    else:
        w = m / (m.sum(-1, keepdim=True).clamp(min=1) * targets.shape[0])
    loss = -(logps.reshape(targets.shape) * w).sum().item()
    _, _, dlogits = closed_form(logits, flat, 1.0, -w.reshape(-1), zeros, softcap)
    return loss, {}, head_grads(dlogits, h, weight, b, hidden.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_agg,softcap,shift", [("token-mean", None, True), ("seq-mean-token-mean", 2.0, False)])
def test_sft_matches_twin_and_closed_form(loss_agg, softcap, shift, dtype, device):
    hidden, full, weight, b = make_head((3, 6), 1000, dtype, device, bias=True, shift=shift)
    targets = torch.randint(0, 1000, (3, 7), device=device)[:, 1:]  # input_ids[:, 1:]: not contiguous
    targets[:, :2] = IGNORE  # prompts
    targets[1] = IGNORE  # a sequence without completion tokens
    x = dict(hidden=hidden, weight=weight, bias=b, targets=targets)
    expected = sft_closed_form(x, loss_agg, softcap)
    for backend in ("triton", "torch"):
        result = run(fastrlhf.sft_loss_from_hidden, full if shift else hidden, weight, b, targets, shift=shift,
                     backend=backend, loss_agg=loss_agg, softcap=softcap, chunk_size=4)
        check_result(result, expected, dtype, f"{loss_agg} {backend}")


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_sft_whole_batch_totals_add_micro_batches_up_to_the_full_batch(loss_agg, device):
    """total_tokens / total_sequences of the whole batch: the losses and gradients of two micro-batches
    add up to the full batch's closed form (float64), on both backends; a tensor total works too."""
    hidden, _, weight, b = make_head((4, 6), 131, torch.float32, device, bias=True)
    targets = torch.randint(0, 131, (4, 6), device=device)
    targets[:, :2] = IGNORE
    targets[0, 3:] = IGNORE  # micro-batches with different token counts
    targets[3] = IGNORE  # a sequence without completion tokens (counts as a sequence)
    loss_exp, _, grads_exp = sft_closed_form(dict(hidden=hidden, weight=weight, bias=b, targets=targets), loss_agg)
    totals = ({"total_tokens": torch.tensor(float((targets != IGNORE).sum()), device=device)}
              if loss_agg == "token-mean" else {"total_sequences": 4})
    for backend in ("triton", "torch"):
        loss, grads = 0.0, [0.0, 0.0, 0.0]
        for rows in (slice(0, 1), slice(1, 4)):
            part, _, part_grads = run(fastrlhf.sft_loss_from_hidden, hidden[rows], weight, b, targets[rows],
                                      backend=backend, loss_agg=loss_agg, chunk_size=4, **totals)
            loss += part
            grads[0] = part_grads[0] if rows.start == 0 else torch.cat([grads[0], part_grads[0]])
            grads[1], grads[2] = grads[1] + part_grads[1], grads[2] + part_grads[2]
        check_result((loss, {}, grads), (loss_exp, {}, grads_exp), torch.float32, f"{loss_agg} {backend}")


def test_sft_flat_rows_equal_the_trainer_formula(device):
    """[N, H] rows and the SFTTrainer expression -sequence_logps(logps, mask).sum() / mask.sum()."""
    hidden, _, weight, _ = make_head((11,), 131, torch.float32, device)
    targets = torch.randint(0, 131, (11,), device=device)
    targets[:3] = IGNORE
    loss, metrics = fastrlhf.sft_loss_from_hidden(hidden, weight, targets, backend="triton", chunk_size=3)
    logps = fastrlhf.token_logprobs(hidden, weight, targets, backend="triton")[None]
    mask = (targets != IGNORE)[None]
    expected = -fastrlhf.sequence_logps(logps, mask).sum() / mask.sum().clamp(min=1)
    assert metrics == {}
    assert_close(loss, expected, 2e-5, "loss")


# --------------------------------------------------------------------------- autograd contract


class MatmulShapes(TorchDispatchMode):
    """Output shapes of every matmul-family op run inside the block."""

    OPS = ("mm", "addmm", "matmul", "linear", "bmm")

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.rstrip("_") in self.OPS:
            self.shapes += [tuple(t.shape) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _policy_call(x, hidden, weight, bias=None, **kwargs):
    return fastrlhf.policy_loss_from_hidden(hidden, weight, x["targets"], x["old"], x["adv"], x["mask"],
                                            bias=bias, ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01,
                                            chunk_size=4, backend="triton", **kwargs)


def test_frozen_head_does_no_weight_gradient_work(device):
    """LoRA case: weight.requires_grad False -> only dH; no [V, H] GEMM runs at all."""
    x = policy_inputs(3, 5, 131, torch.float32, device)
    V = x["weight"].shape[0]
    expected = policy_closed_form(x, ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01)
    hidden = x["hidden"].clone().requires_grad_()
    mode = MatmulShapes()
    with mode:
        loss, _ = _policy_call(x, hidden, x["weight"])
        loss.backward()
    assert x["weight"].grad is None
    assert (V, H) not in mode.shapes, mode.shapes
    assert (4, H) in mode.shapes, "the dH GEMM of a 4-row chunk must have run"
    assert_close(loss, as_expected(expected[0], loss), 2e-5, "loss")
    assert_close(hidden.grad, expected[2][0], 2e-5, "dH")


def test_frozen_head_under_autocast_keeps_input_precision(device):
    """fp32 inputs under bf16 autocast: the head's matmuls must not be re-cast (same values as fp32)."""
    x = policy_inputs(3, 5, 131, torch.float32, device)
    expected = policy_closed_form(x, ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01)
    hidden = x["hidden"].clone().requires_grad_()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        loss, _ = _policy_call(x, hidden, x["weight"])
    loss.backward()
    assert_close(loss, as_expected(expected[0], loss), 2e-5, "loss")
    assert_close(hidden.grad, expected[2][0], 2e-5, "dH")


def test_memory_is_one_chunk_of_logits_independent_of_n(device):
    """bf16 head: the largest allocation is one chunk's fp32 logits, the same for 4x more rows, and
    the bf16 d logits are written over them (no [chunk, V] bf16 buffer is ever allocated)."""
    V, chunk = 2048, 32  # chunk x V x 4 bytes above the CPU path's fp32 copy of the [V, H] weight
    largest = []
    for B in (16, 64):
        x = policy_inputs(B, 8, V, torch.bfloat16, device)
        leaves = [x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()]
        sizes, made = LargestAllocation(), Allocations()
        with sizes, made:
            loss, _ = fastrlhf.policy_loss_from_hidden(*leaves, x["targets"], x["old"], x["adv"], x["mask"],
                                                       ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01,
                                                       chunk_size=chunk, backend="triton")
            sizes.phase = "backward"
            loss.backward()
        assert B * 8 * V * 4 >= 4 * chunk * V * 4  # an N x V fp32 tensor would be caught
        assert sizes.largest["forward"] >= chunk * V * 4 and sizes.largest["forward"] <= chunk * V * 4 + 4096
        assert (chunk, V) not in [shape for shape, dtype in made.made if dtype == torch.bfloat16]
        largest.append(sizes.largest)
    assert largest[0] == largest[1], largest


def test_shifted_hidden_is_read_chunk_by_chunk_not_copied(device):
    """hidden[:, :-1] does not flatten to [N, H]: the rows are copied chunk by chunk, never whole
    (forward only here: with gradients, the [N, H] gradient itself is an allocation of that size)."""
    B, T, chunk = 4, 33, 5
    full = torch.randn(B, T + 1, 64, device=device)
    weight = torch.randn(131, 64, device=device) * 0.3
    targets = torch.randint(0, 131, (B, T), device=device)
    mask = torch.ones(B, T, device=device)
    mode = LargestAllocation()
    with mode, torch.no_grad():
        fastrlhf.policy_loss_from_hidden(full[:, :-1], weight, targets, mask, mask, mask, entropy_coef=0.1,
                                         chunk_size=chunk, backend="triton")
        fastrlhf.sft_loss_from_hidden(full[:, :-1], weight, targets, chunk_size=chunk, backend="triton")
    assert mode.largest["forward"] < B * T * 64 * 4 // 4, mode.largest


@pytest.mark.parametrize("mode", ["no_grad", "no_leaf_requires_grad"])
def test_forward_only_runs_only_the_logits_gemm(mode, device):
    x = policy_inputs(3, 5, 131, torch.float32, device)
    expected = policy_closed_form(x, ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01)
    hidden, weight = x["hidden"].clone(), x["weight"].clone()
    if mode == "no_grad":
        hidden.requires_grad_(), weight.requires_grad_()
    shapes = MatmulShapes()
    with shapes, (torch.no_grad() if mode == "no_grad" else torch.enable_grad()):
        loss, metrics = _policy_call(x, hidden, weight)
    assert loss.grad_fn is None and not loss.requires_grad
    assert {s[1] for s in shapes.shapes} == {131}, shapes.shapes  # [chunk, V] logits only
    assert_close(loss, as_expected(expected[0], loss), 2e-5, "loss")
    for name, value in metrics.items():
        assert_close(value, as_expected(expected[1][name], value), 2e-5, name)


def test_backward_scales_by_the_incoming_gradient(device):
    """Any use of the scalar loss: grad_output scales the precomputed gradients (2·loss·dL here)."""
    x = policy_inputs(3, 5, 131, torch.float32, device)
    _, _, grads = policy_closed_form(x, ref_logps=x["ref"], kl_coef=0.1, entropy_coef=0.01)
    leaves = [t.clone().requires_grad_() for t in (x["hidden"], x["weight"])]
    loss, _ = _policy_call(x, *leaves)
    (3.0 * loss + loss.square()).backward()
    factor = 3.0 + 2.0 * loss.detach().double()
    for leaf, grad in zip(leaves, grads):
        assert_close(leaf.grad, grad * factor, 2e-5, "scaled")


def test_double_backward_and_second_backward_raise(device):
    x = policy_inputs(2, 4, 131, torch.float32, device)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    loss, _ = _policy_call(x, hidden, weight)
    grads = torch.autograd.grad(loss, [hidden, weight], create_graph=True)  # first order: exact
    with pytest.raises(RuntimeError, match="no second derivative"):
        sum((g ** 2).sum() for g in grads).backward()
    loss, _ = _policy_call(x, hidden, weight)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    for loss, _ in (
        fastrlhf.sft_loss_from_hidden(hidden, weight, x["targets"], backend="triton"),
        fastrlhf.dpo_loss_from_hidden(hidden, weight, x["targets"], None, None, loss_type="simpo", backend="triton"),
    ):
        (grad,) = torch.autograd.grad(loss, [hidden], create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative"):
            (grad ** 2).sum().backward()


# --------------------------------------------------------------------------- edge cases


def test_nan_inside_the_mask_propagates_padding_does_not(device):
    x = policy_inputs(3, 5, 131, torch.float32, device)
    counted = x["mask"].nonzero()[0].tolist()
    padding = (~x["mask"]).nonzero()[0].tolist()
    for where, expect_nan in ((counted, True), (padding, False)):
        hidden = x["hidden"].clone()
        hidden[where[0], where[1], 3] = float("nan")
        leaves = [hidden.requires_grad_(), x["weight"].clone().requires_grad_()]
        loss, metrics = _policy_call(x, *leaves)
        loss.backward()
        if expect_nan:
            assert loss.isnan() and metrics["pg_loss"].isnan() and metrics["entropy"].isnan()
            assert leaves[1].grad.isnan().any() and leaves[0].grad[where[0], where[1]].isnan().all()
        else:  # padding: nothing of it reaches the loss, the metrics or the gradients
            assert loss.isfinite() and all(v.isfinite() for v in metrics.values())
            assert leaves[0].grad.isfinite().all() and leaves[1].grad.isfinite().all()
    # SFT and DPO: a NaN in a counted token reaches the loss
    hidden = x["hidden"].clone()
    hidden[0, 0, 0] = float("nan")
    targets = x["targets"][:2].clone()
    targets[0, 0] = 5
    assert fastrlhf.sft_loss_from_hidden(hidden[:2], x["weight"], targets, backend="triton")[0].isnan()
    assert fastrlhf.dpo_loss_from_hidden(hidden[:2], x["weight"], targets, None, None, loss_type="simpo",
                                         backend="triton")[0].isnan()
    targets[0, 0] = IGNORE  # the same NaN under an ignored target is padding
    assert fastrlhf.sft_loss_from_hidden(hidden[:2], x["weight"], targets, backend="triton")[0].isfinite()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_and_empty_batches(backend, device):
    x = policy_inputs(3, 4, 131, torch.float32, device, bias=True)
    x["mask"] = torch.zeros_like(x["mask"])
    loss, metrics, grads = run_policy(x, backend, ref_logps=x["ref"], kl_coef=0.1, dual_clip=2.0, entropy_coef=0.1)
    assert loss == 0 and all(v == 0 for v in metrics.values())
    assert set(metrics) == {"pg_loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "entropy", "dual_clipfrac"}
    assert all((g == 0).all() for g in grads)
    empty = {k: (v[:0] if k not in ("weight", "bias") else v) for k, v in x.items()}
    loss, metrics, grads = run_policy(empty, backend)
    assert loss == 0 and all(v == 0 for v in metrics.values())
    assert grads[0].shape == (0, 4, H) and (grads[1] == 0).all() and (grads[2] == 0).all()
    # SFT: nothing to learn from; DPO: no pairs
    all_ignored = torch.full((3, 4), IGNORE, device=device)
    loss, _, grads = run(fastrlhf.sft_loss_from_hidden, x["hidden"], x["weight"], x["bias"], all_ignored,
                         backend=backend)
    assert loss == 0 and all((g == 0).all() for g in grads)
    no_pairs = torch.zeros(0, 4, dtype=torch.long, device=device)
    for loss_type, refs in (("sigmoid", (torch.zeros(0, device=device),) * 2), ("orpo", (None, None))):
        loss, metrics, grads = run(fastrlhf.dpo_loss_from_hidden, x["hidden"][:0], x["weight"], x["bias"], no_pairs,
                                   *refs, loss_type=loss_type, backend=backend)
        assert loss == 0 and all(v == 0 for v in metrics.values()) and (grads[1] == 0).all()


def _bad_calls(device):
    h, w = torch.randn(2, 3, 8, device=device), torch.randn(10, 8, device=device)
    t = torch.randint(0, 10, (2, 3), device=device)
    z, m = torch.zeros(2, 3, device=device), torch.ones(2, 3, device=device)
    policy = fastrlhf.policy_loss_from_hidden
    dpo = fastrlhf.dpo_loss_from_hidden
    sft = fastrlhf.sft_loss_from_hidden
    r = torch.zeros(1, device=device)
    return {
        "policy hidden 2-D": (lambda: policy(h[0], w, t[0], z[0], z[0], m[0]), "hidden"),
        "policy weight H": (lambda: policy(h, w[:, :7], t, z, z, m), "weight"),
        "policy weight dtype": (lambda: policy(h, w.double(), t, z, z, m), "weight"),
        "policy targets float": (lambda: policy(h, w, t.float(), z, z, m), "targets"),
        "policy old shape": (lambda: policy(h, w, t, z[:, :2], z, m), "old_logps"),
        "policy old int": (lambda: policy(h, w, t, z.long(), z, m), "old_logps"),
        "policy advantages shape": (lambda: policy(h, w, t, z, z[:1], m), "advantages"),
        "policy mask shape": (lambda: policy(h, w, t, z, z, m[:1]), "mask"),
        "policy ref shape": (lambda: policy(h, w, t, z, z, m, ref_logps=z[:1], kl_coef=0.1), "ref_logps"),
        "policy kl without ref": (lambda: policy(h, w, t, z, z, m, kl_coef=0.1), "ref_logps"),
        "policy clip_eps": (lambda: policy(h, w, t, z, z, m, clip_eps=0.0), "clip_eps"),
        "policy dual_clip": (lambda: policy(h, w, t, z, z, m, dual_clip=1.0), "dual_clip"),
        "policy estimator": (lambda: policy(h, w, t, z, z, m, kl_estimator="k4"), "kl_estimator"),
        "policy loss_agg": (lambda: policy(h, w, t, z, z, m, loss_agg="sum"), "loss_agg"),
        "policy loss_type": (lambda: policy(h, w, t, z, z, m, loss_type="gpg"), "loss_type"),
        "policy IS without rollout": (lambda: policy(h, w, t, z, z, m, is_correction="tis"), "needs rollout_logps"),
        "policy rollout shape": (lambda: policy(h, w, t, z, z, m, is_correction="tis", rollout_logps=z[:1]),
                                 "rollout_logps"),
        "policy [B] advantages": (lambda: policy(h, w, t, z, z[:, 0][:1], m), "advantages"),
        "policy temperature": (lambda: policy(h, w, t, z, z, m, temperature=0.0), "temperature"),
        "policy softcap": (lambda: policy(h, w, t, z, z, m, softcap=-1.0), "softcap"),
        "policy chunk_size": (lambda: policy(h, w, t, z, z, m, chunk_size=0), "chunk_size"),
        "policy bias": (lambda: policy(h, w, t, z, z, m, bias=torch.zeros(9, device=device)), "bias"),
        "dpo odd rows": (lambda: dpo(h[:1], w, t[:1], r, r), "hidden"),
        "dpo ref shape": (lambda: dpo(h, w, t, torch.zeros(2, device=device), r), "ref_chosen_logps"),
        "dpo ref missing": (lambda: dpo(h, w, t, None, None), "ref_chosen_logps"),
        "dpo ref for simpo": (lambda: dpo(h, w, t, r, r, loss_type="simpo"), "ref_chosen_logps"),
        "dpo loss_type": (lambda: dpo(h, w, t, r, r, loss_type="kto"), "loss_type"),
        "dpo beta": (lambda: dpo(h, w, t, r, r, beta=0.0), "beta"),
        "dpo label_smoothing": (lambda: dpo(h, w, t, r, r, loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        "sft targets shape": (lambda: sft(h, w, t[:, :2]), "targets"),
        "sft loss_agg": (lambda: sft(h, w, t, loss_agg="sum"), "loss_agg"),
        "sft seq-mean on rows": (lambda: sft(h[0], w, t[0], loss_agg="seq-mean-token-mean"), "targets"),
        "unknown backend": (lambda: sft(h, w, t, backend="cuda"), "backend"),
    } | ({  # the value range of targets is checked on CPU only (on CUDA it would cost a host sync)
        "policy targets >= V": (lambda: policy(h, w, t + 10, z, z, m), "targets"),
        "sft negative target": (lambda: sft(h, w, t - 20), "targets"),
    } if h.device.type == "cpu" else {})


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", sorted(_bad_calls("cpu")))
def test_bad_input_is_rejected_by_name(case, backend, device, monkeypatch):
    from fastrlhf import _dispatch

    calls = _bad_calls(device)
    if case not in calls:
        pytest.skip("the value range of targets is checked on CPU tensors only")
    monkeypatch.setattr(_dispatch, "_default_backend", backend)
    call, name = calls[case]
    with pytest.raises(ValueError, match=name):
        call()
