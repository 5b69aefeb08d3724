"""The small losses on the Triton path (issue 14, item 2): launches and nothing else, every tile
layout, and the kernels of this layout against the PyTorch twin and independent float64 closed
forms, forward and backward.

* launch contract: each public function runs exactly its kernels (ppo_loss / value_loss: the loss
  kernel and the finalize; backward one kernel; ...) and no ATen op that launches work, forward
  or backward (`benchmarks.host_overhead.LaunchingOps`, the op counter the host-overhead
  benchmark reports);
* tiles: the GPU launch sizes (several chunks per row, several rows per tile, several row blocks)
  give the twin's and the closed form's numbers, with GSPO / sequence IS row sums, split
  aggregations, tensor totals, empty batches;
* whiten forward and backward (several partials, float masks, bf16, broadcast upstream gradients)
  vs the twin and finite differences of the float64 closed form; group advantages with groups
  longer than a block; kl_penalty / dpo_loss / reward_loss backward kernels in each input's dtype;
* `once_per_signature`: what it caches and what it never keeps.

Tolerances: fp32 vs the twin 1e-6 (same fp32 arithmetic, other summation order), vs float64 closed
forms 2e-5 relative (test_ppo's FP32_TOL); bf16 inputs vs the twin on the same inputs: fp32
outputs 1e-4, bf16 gradients one bf16 ulp (rtol 1e-2).
"""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from conftest import DEVICE
from gpu_compile import recorded_launches
from test_advantages import group_closed_form, whiten_closed_form
from test_ppo import FP32_TOL, _kl_closed, assert_close_to_closed, make_ppo_inputs, ppo_closed_form, run_ppo, \
    value_closed_form

import fastrlhf
import fastrlhf.twins as twins
from benchmarks.host_overhead import LaunchingOps, graph_leaves
from fastrlhf._checks import once_per_signature
from fastrlhf.kernels import _launch


@pytest.fixture
def gpu_sizes(monkeypatch):
    """CPU launches with the block sizes a GPU gets (small tiles: several per row and per batch)."""
    monkeypatch.setattr(_launch, "GPU_SIZES_EVERYWHERE", True)


def _close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(torch.as_tensor(actual).detach().double().cpu()),
                               np.asarray(expected, dtype=np.float64), rtol=tol, atol=tol)


# ============================================================================ launch contract

def _calls():
    """name -> (forward() -> output, kernels forward, kernels backward); inputs made once."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    B, T = 3, 37

    def rand(*shape, grad=False):
        return (-torch.rand(*shape, generator=g, device=DEVICE)).requires_grad_(grad)

    mask = torch.rand(B, T, generator=g, device=DEVICE) > 0.3
    lp, ent, old, adv, ref, roll = rand(B, T, grad=True), rand(B, T, grad=True), rand(B, T), rand(B, T), rand(B, T), \
        rand(B, T)
    ppo = (lambda **kw: lambda: fastrlhf.ppo_loss(lp, old, adv, mask, backend="triton", **kw))
    policy = (["_ppo_forward_kernel", "_aggregate_finalize_kernel"], ["_ppo_backward_kernel"])
    c, r, rc, rr = (rand(70, grad=True) for _ in range(4))
    big = [rand(1500, grad=True) for _ in range(2)]
    return {
        "kl_penalty": (lambda: fastrlhf.kl_penalty(lp, ref, backend="triton"), ["_kl_penalty_forward_kernel"],
                       ["_kl_penalty_backward_kernel"]),
        "ppo_loss": (ppo(), *policy),
        "ppo_loss(kl, entropy, dual clip, split aggregations)": (
            ppo(ref_logps=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01, dual_clip=3.0, kl_agg="token-mean",
                loss_agg="seq-mean-token-mean"), *policy),
        "ppo_loss(gspo, sequence IS, tensor totals)": (
            ppo(ratio_level="sequence", rollout_logps=roll, is_correction="sequence_mask",
                total_tokens=torch.tensor(200.0, device=DEVICE), total_sequences=torch.tensor(4, device=DEVICE)),
            *policy),
        "value_loss": (lambda: fastrlhf.value_loss(lp, old, adv, mask, backend="triton"),
                       ["_value_forward_kernel", "_aggregate_finalize_kernel"], ["_value_backward_kernel"]),
        "whiten": (lambda: fastrlhf.whiten(lp, mask, backend="triton"), ["_whiten_stats_kernel", "_whiten_apply_kernel"],
                   ["_whiten_grad_stats_kernel", "_whiten_grad_kernel"]),
        "group_advantages": (lambda: fastrlhf.group_advantages(old.reshape(-1)[:108], 4, backend="triton"),
                             ["_group_advantages_kernel"], []),
        "dpo_loss": (lambda: fastrlhf.dpo_loss(c, r, rc, rr, backend="triton"), ["_dpo_loss_forward_kernel"],
                     ["_pairwise_backward_kernel"]),
        "dpo_loss(two blocks)": (lambda: fastrlhf.dpo_loss(*big, None, None, loss_type="simpo", backend="triton"),
                                 ["_dpo_loss_forward_kernel", "_sum_blocks_kernel"], ["_pairwise_backward_kernel"]),
        "reward_loss": (lambda: fastrlhf.reward_loss(c, r, margin=0.5, backend="triton"),
                        ["_reward_loss_forward_kernel"], ["_pairwise_backward_kernel"]),
    }


def _kernel_names(launches: dict) -> list[str]:
    return sorted(launch.kernel for launch, count in launches.items() for _ in range(count))


@pytest.mark.parametrize("name", list(_calls()))
def test_each_call_is_its_kernels_and_no_torch_op(name):
    forward, fwd_kernels, bwd_kernels = _calls()[name]
    forward()  # the first call of a signature checks and plans; later calls only launch
    out = forward()
    loss = out[0] if isinstance(out, tuple) else out
    upstream = torch.ones_like(loss)
    leaves = graph_leaves(loss)
    with recorded_launches() as launches, LaunchingOps() as ops:
        out = forward()
    assert _kernel_names(launches) == sorted(fwd_kernels), name
    assert ops.ops == [], f"{name} forward ran torch ops {ops.ops}"
    loss = out[0] if isinstance(out, tuple) else out
    if not bwd_kernels:
        assert not loss.requires_grad
        return
    with recorded_launches() as launches, LaunchingOps() as ops:
        torch.autograd.grad(loss, leaves, grad_outputs=upstream)
    assert _kernel_names(launches) == sorted(bwd_kernels), name
    assert ops.ops == [], f"{name} backward ran torch ops {ops.ops}"



# ============================================================================ ppo_loss / value_loss tiles

PPO_OPTIONS = {
    "plain": {},
    "kl+entropy+dual, split aggregations": dict(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.02, loss_agg="token-mean",
                                                 kl_agg="seq-mean-token-mean", entropy_agg="seq-mean-token-sum-norm"),
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    "sequence IS, per-row advantages": dict(is_correction="sequence_truncate", is_clip_min=0.5, per_row=True),
    "cispo, token IS, totals": dict(loss_type="cispo", is_correction="icepop", total_tokens=500.0,
                                    total_sequences=7, norm_length=64, loss_agg="seq-mean-token-sum-norm"),
    "sapo, entropy selection": dict(loss_type="sapo", top_entropy_quantile=0.4, entropy_coef=0.01),
}


@pytest.mark.parametrize("shape", [(3, 700), (300, 5), (1, 1), (5, 0), (0, 4)], ids=str)
@pytest.mark.parametrize("option", list(PPO_OPTIONS))
def test_ppo_tiles_match_twin_and_closed_form(shape, option, gpu_sizes):
    """GPU tiles: (3, 700) = three chunks per row (GSPO / IS rows summed across chunks), (300, 5) =
    32 rows per tile in 10 row blocks; (1, 1); and empty batches (0 tokens: loss 0, no NaN)."""
    B, T = shape
    options = dict(PPO_OPTIONS[option])
    per_row = options.pop("per_row", False)
    inputs = make_ppo_inputs(B, T, seed=3) if B and T else make_ppo_inputs(max(B, 1), max(T, 1))
    if not (B and T):
        inputs = {k: v[:B, :T] for k, v in inputs.items()}
    g = torch.Generator(device=DEVICE).manual_seed(4)
    rollout = inputs["old_logps"] + 0.3 * torch.randn(B, T, generator=g, device=DEVICE)
    kwargs = dict(options)
    if "kl_coef" in kwargs:
        kwargs["ref_logps"] = inputs["ref_logps"]
    if "entropy_coef" in kwargs or "top_entropy_quantile" in kwargs:
        kwargs["entropy"] = inputs["entropy"]
    if "is_correction" in kwargs:
        kwargs["rollout_logps"] = rollout
    if per_row:
        inputs["advantages"] = torch.randn(B, generator=g, device=DEVICE)
    got = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="triton", **k), inputs, **kwargs)
    want = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="torch", **k), inputs, **kwargs)
    assert set(got[1]) == set(want[1]) and list(got[1]) == list(want[1])  # same names, same order
    _close(got[0], want[0].detach(), 1e-6)
    for name in want[1]:
        _close(got[1][name], want[1][name], 1e-6)
    for name in want[2]:
        assert got[2][name].dtype == want[2][name].dtype
        _close(got[2][name], want[2][name], 1e-6)
    if B * T == 0:  # nothing counts: 0 everywhere, never NaN
        assert got[0].item() == 0 and all(v.item() == 0 for v in got[1].values())
        return
    closed_kwargs = {("ref" if k == "ref_logps" else "rollout" if k == "rollout_logps" else k): v
                     for k, v in kwargs.items()}
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             **closed_kwargs)
    assert_close_to_closed(*got, closed)


@pytest.mark.parametrize("shape", [(3, 700), (300, 5), (0, 3)], ids=str)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_value_tiles_match_twin_and_closed_form(shape, loss_agg, gpu_sizes):
    B, T = shape
    g = torch.Generator(device=DEVICE).manual_seed(5)
    values = torch.randn(B, T, generator=g, device=DEVICE).requires_grad_()
    # |v - old| > clip_eps everywhere: inside the clip range the clipped and plain errors are equal in
    # exact arithmetic and vf_clipfrac would count rounding noise.
    step = 0.3 + 0.5 * torch.rand(B, T, generator=g, device=DEVICE)
    old = values.detach() + torch.where(torch.rand(B, T, generator=g, device=DEVICE) > 0.5, step, -step)
    returns = torch.randn(B, T, generator=g, device=DEVICE)
    mask = torch.rand(B, T, generator=g, device=DEVICE) > 0.3
    if B > 1:
        mask[1] = False
    results = []
    for backend in ("triton", "torch"):
        loss, metrics = fastrlhf.value_loss(values, old, returns, mask, loss_agg=loss_agg, backend=backend)
        (grad,) = torch.autograd.grad(loss, values) if B * T else (torch.zeros_like(values),)
        results.append((loss, metrics, grad))
    (loss, metrics, grad), (r_loss, r_metrics, r_grad) = results
    _close(loss, r_loss.detach(), 1e-6)
    assert list(metrics) == list(r_metrics)
    for name in metrics:
        _close(metrics[name], r_metrics[name], 1e-6)
    _close(grad, r_grad, 1e-6)
    if B * T == 0:
        assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())
        return
    c_loss, c_metrics, c_grad = value_closed_form(values, old, returns, mask, loss_agg=loss_agg)
    _close(loss, c_loss, FP32_TOL["rtol"])
    for name in metrics:
        _close(metrics[name], c_metrics[name], FP32_TOL["rtol"])
    np.testing.assert_allclose(grad.double().cpu().numpy(), c_grad, **FP32_TOL)


def test_ppo_nan_inside_the_mask_reaches_loss_and_gradient_padding_never_does(gpu_sizes):
    inputs = make_ppo_inputs(3, 700, seed=6)
    clean = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="triton", **k), inputs,
                    ratio_level="sequence", entropy=inputs["entropy"], entropy_coef=0.01)
    dirty = {k: v.clone() for k, v in inputs.items()}
    pad = ~dirty["mask"]
    for name in ("logps", "old_logps", "advantages", "entropy"):
        dirty[name][pad] = float("nan")
    dirty["old_logps"][2, ~dirty["mask"][2]] = float("inf")
    padded = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="triton", **k), dirty,
                     ratio_level="sequence", entropy=dirty["entropy"], entropy_coef=0.01)
    assert torch.equal(padded[0], clean[0])
    for name in clean[1]:
        assert torch.equal(padded[1][name], clean[1][name]), name
    for name in clean[2]:
        assert torch.equal(padded[2][name], clean[2][name]), name
    counted = dirty["mask"].nonzero()[5]
    dirty["logps"][tuple(counted)] = float("nan")
    loss, metrics, grads = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="triton", **k), dirty)
    twin_loss, _, _ = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend="torch", **k), dirty)
    assert torch.isnan(loss) and torch.isnan(twin_loss)
    # The NaN token's own gradient is NaN (the twin's torch.maximum backward gives it 0); it stays there.
    nan_grad = torch.isnan(grads["logps"])
    assert nan_grad[tuple(counted)] and nan_grad.sum() == 1


# ============================================================================ whiten

def _whiten_fd_grad(x, mask, upstream, shift_mean, eps=1e-8, h=1e-6):
    """d sum(upstream * whiten(x)) / d x by central differences of the float64 closed form."""
    xs = x.detach().double().cpu()
    up = np.asarray(upstream.double().cpu())
    grad = np.zeros(xs.numel())
    flat = xs.reshape(-1)
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += h
        minus[i] -= h
        f_plus = (up * whiten_closed_form(plus.reshape(xs.shape), mask.cpu(), shift_mean, eps)).sum()
        f_minus = (up * whiten_closed_form(minus.reshape(xs.shape), mask.cpu(), shift_mean, eps)).sum()
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad.reshape(xs.shape)


@pytest.mark.parametrize("block", [None, 16, 4], ids=["one block", "block 16", "block 4"])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_kernels_forward_backward(block, shift_mean):
    """Several Chan partials (block 16 / 4 over 4 x 37: 10 / 37 of them) merge to the twin's and
    the closed form's statistics; the closed-form gradient against finite differences."""
    from fastrlhf.kernels.advantages import whiten_backward, whiten_forward

    g = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(4, 37, generator=g, device=DEVICE) * 3 + 5
    mask = torch.rand(4, 37, generator=g, device=DEVICE) > 0.3
    mask[1] = False
    upstream = torch.randn(4, 37, generator=g, device=DEVICE)
    out, partials = whiten_forward(x, mask, shift_mean=shift_mean, eps=1e-8, block=block)
    grad = whiten_backward(x, mask, partials, upstream, shift_mean=shift_mean, eps=1e-8, block=block)
    leaf = x.clone().requires_grad_()
    twin_out = twins.whiten(leaf, mask, shift_mean=shift_mean)
    (twin_grad,) = torch.autograd.grad(twin_out, leaf, upstream)
    _close(out, twin_out.detach(), 1e-5)
    _close(grad, twin_grad, 1e-5)
    _close(out, whiten_closed_form(x, mask, shift_mean, 1e-8), 2e-5)
    np.testing.assert_allclose(grad.double().cpu().numpy(), _whiten_fd_grad(x, mask, upstream, shift_mean),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["gpu sizes", "float mask", "bf16", "scalar upstream", "3-D", "empty"])
def test_whiten_public_function_matches_twin(case, monkeypatch):
    g = torch.Generator(device=DEVICE).manual_seed(8)
    shape, dtype = (3, 2000), torch.float32
    if case == "gpu sizes":
        monkeypatch.setattr(_launch, "GPU_SIZES_EVERYWHERE", True)  # 24 blocks of 256: 24 partials
    if case == "3-D":
        shape = (2, 3, 5)
    if case == "empty":
        shape = (0, 5)
    if case == "bf16":
        dtype = torch.bfloat16
    x = (torch.randn(shape, generator=g, device=DEVICE) * 2 + 1).to(dtype)
    mask = torch.rand(shape, generator=g, device=DEVICE) > 0.4
    if case == "float mask":
        mask = torch.rand(shape, generator=g, device=DEVICE) * mask * 0.01  # weights summing to ~0.3: W < 1
    upstream = torch.randn(shape, generator=g, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        leaf = x.clone().requires_grad_()
        out = fastrlhf.whiten(leaf, mask, shift_mean=case != "float mask", backend=backend)
        objective = out.sum() if case == "scalar upstream" else (out * upstream).sum()
        (grad,) = torch.autograd.grad(objective, leaf) if x.numel() else (torch.zeros_like(leaf),)
        results.append((out, grad))
    (out, grad), (t_out, t_grad) = results
    assert out.dtype == torch.float32 and grad.dtype == dtype and out.shape == shape
    _close(out, t_out.detach(), 1e-4 if dtype == torch.bfloat16 else 1e-5)
    if dtype == torch.bfloat16:
        torch.testing.assert_close(grad.float(), t_grad.float(), rtol=1e-2, atol=1e-2 * t_grad.float().abs().max())
    else:
        _close(grad, t_grad, 1e-5)


def test_whiten_nan_inside_the_mask_like_the_twin_and_padding_never():
    x = torch.randn(4, 9, device=DEVICE)
    mask = torch.rand(4, 9, device=DEVICE) > 0.3
    mask[0, 0] = True
    dirty = x.clone()
    dirty[~mask] = float("nan")
    assert torch.equal(fastrlhf.whiten(dirty, mask, backend="triton"), fastrlhf.whiten(x, mask, backend="triton"))
    dirty[0, 0] = float("nan")
    out, twin_out = fastrlhf.whiten(dirty, mask, backend="triton"), twins.whiten(dirty, mask)
    assert torch.equal(torch.isnan(out), torch.isnan(twin_out)) and torch.isnan(out).all()


# ============================================================================ group advantages

@pytest.mark.parametrize("B,group_size", [(3000, 1500), (8192, 4), (7, 1), (2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_advantages_kernel_layouts(B, group_size, dtype):
    """Groups longer than a block (1500: walked in chunks), many groups per program and many
    programs (8192 / 4), one-sample groups, bf16 scores (fp32 statistics)."""
    scores = (torch.randn(B, device=DEVICE) * 3 + 1).to(dtype)
    for scale in (True, False):
        out = fastrlhf.group_advantages(scores, group_size, scale=scale, backend="triton")
        twin_out = twins.group_advantages(scores, group_size, scale=scale)
        assert out.dtype == torch.float32 and out.shape == (B,)
        _close(out, twin_out, 2e-5)
        _close(out, group_closed_form(scores.float().cpu(), group_size, scale, "sample"), 2e-5)


def test_group_advantages_nan_stays_in_its_group():
    scores = torch.randn(12, device=DEVICE)
    scores[5] = float("nan")
    out = fastrlhf.group_advantages(scores, 4, backend="triton")
    assert torch.isnan(out[4:8]).all() and torch.isfinite(out[:4]).all() and torch.isfinite(out[8:]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(twins.group_advantages(scores, 4)))


# ============================================================================ backward kernels' dtypes

@pytest.mark.parametrize("upstream", ["full", "scalar", "transposed"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_backward_kernel(upstream, estimator):
    g = torch.Generator(device=DEVICE).manual_seed(9)
    logps = (-torch.rand(5, 7, generator=g, device=DEVICE) * 3).to(torch.bfloat16).requires_grad_()
    ref = (-torch.rand(5, 7, generator=g, device=DEVICE) * 3).requires_grad_()  # fp32: mixed dtypes
    weights = torch.randn(7, 5, generator=g, device=DEVICE)
    grads = []
    for backend in ("triton", "torch"):
        kl = fastrlhf.kl_penalty(logps, ref, estimator=estimator, backend=backend)
        assert kl.dtype == torch.float32
        objective = {"full": (kl * weights.t()).sum(), "scalar": kl.sum(),
                     "transposed": (kl.t() * weights).sum()}[upstream]
        grads.append(torch.autograd.grad(objective, (logps, ref)))
    (g_lp, g_ref), (t_lp, t_ref) = grads
    assert g_lp.dtype == torch.bfloat16 and g_ref.dtype == torch.float32
    torch.testing.assert_close(g_lp.float(), t_lp.float(), rtol=1e-2, atol=1e-3)
    _close(g_ref, t_ref, 1e-6)
    w = np.ones((5, 7)) if upstream == "scalar" else weights.t().double().cpu().numpy()
    x = (logps.detach().double() - ref.detach().double()).cpu().numpy()
    closed = np.array([[_kl_closed(v, estimator)[1] for v in row] for row in x]) * w
    np.testing.assert_allclose(g_ref.double().cpu().numpy(), -closed, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("B", [37, 1500])
def test_pairwise_backward_kernel_dtypes_and_references(B):
    g = torch.Generator(device=DEVICE).manual_seed(10)
    chosen, rejected = ((-torch.rand(B, generator=g, device=DEVICE) * 50).to(torch.bfloat16).requires_grad_()
                        for _ in range(2))
    ref_c, ref_r = ((-torch.rand(B, generator=g, device=DEVICE) * 50).requires_grad_() for _ in range(2))
    grads = []
    for backend in ("triton", "torch"):
        loss, _ = fastrlhf.dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, backend=backend)
        grads.append(torch.autograd.grad(3.0 * loss, (chosen, rejected, ref_c, ref_r)))
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2 if got.dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-7)
    for got_c, got_r in ((grads[0][0], grads[0][2]), (grads[0][1], grads[0][3])):
        torch.testing.assert_close(got_c.float(), -got_r.float(), rtol=1e-2, atol=1e-7)
    chosen_r, rejected_r = (torch.randn(B, generator=g, device=DEVICE).requires_grad_() for _ in range(2))
    for backend in ("triton", "torch"):
        loss, _ = fastrlhf.reward_loss(chosen_r, rejected_r, center_coef=0.1, backend=backend)
        grads.append(torch.autograd.grad(loss, (chosen_r, rejected_r)))
    for got, want in zip(grads[2], grads[3]):
        _close(got, want, 1e-6)


# ============================================================================ once_per_signature

def test_once_per_signature_caches_by_metadata_and_keeps_no_tensor():
    calls = []

    @once_per_signature
    def plan(x, *, option):
        calls.append(option)
        if option == "bad":
            raise ValueError("bad option")
        return ("plan", x.shape, option)

    a, b = torch.zeros(3, 4), torch.ones(3, 4)
    assert plan(a, option=1.0) == plan(b, option=1.0) and calls == [1.0]  # values of tensors do not matter
    plan(a.double(), option=1.0)
    plan(torch.zeros(3, 5), option=1.0)
    plan(a, option=1)  # 1 == 1.0, but another type: checked again
    plan(a, option=True)
    assert calls == [1.0, 1.0, 1.0, 1, True]
    for _ in range(2):
        with pytest.raises(ValueError, match="bad option"):
            plan(a, option="bad")
    assert calls[-2:] == ["bad", "bad"]  # a failure is never cached
    plan(a, option=[1])  # unhashable: runs every time
    plan(a, option=[1])
    assert calls[-2:] == [[1], [1]]
    # The plans of the public functions keep no tensor of the call that made them.
    inputs = make_ppo_inputs(2, 9, seed=11)
    total = torch.tensor(17.0, device=DEVICE)
    alive = [weakref.ref(t) for t in (*inputs.values(), total)]
    fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                      total_tokens=total, backend="triton")
    del inputs, total
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_interpreter_launch_sizes_do_not_leak_into_gpu_size_plans(gpu_sizes):
    """A signature planned with CPU sizes is planned again with the GPU sizes (the offline compile
    test records GPU variants in the same process as other tests)."""
    inputs = make_ppo_inputs(3, 700, seed=12)
    _launch.GPU_SIZES_EVERYWHERE = False
    fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"], backend="triton")
    _launch.GPU_SIZES_EVERYWHERE = True
    with recorded_launches() as launches:
        fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"], backend="triton")
    block_t = {dict(launch.constexprs)["BLOCK_T"] for launch in launches if launch.kernel == "_ppo_forward_kernel"}
    assert block_t == {256}, block_t
    assert math.prod(inputs["logps"].shape) > 256
