"""kl_penalty, ppo_loss and value_loss: Triton path vs PyTorch reference vs an independent float64
closed form (per-token numpy loop with hand-derived gradients), forward and backward.

Tolerances: fp32 inputs, Triton vs float64 closed form: rtol 2e-5, atol 1e-6 (loss, metrics, grads).
bf16 inputs: compared with the closed form evaluated on the same bf16-rounded inputs; the loss and
metrics (fp32 outputs) to rtol 1e-4, the bf16 gradients to rtol 1e-2 (≈ 1 bf16 ulp), atol 1e-2 · max|g|.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastrlhf
import fastrlhf.twins.ppo as ref_ppo
from conftest import DEVICE

@pytest.fixture(autouse=True)
def _on_test_device():
    """Every tensor these tests make lands on the GPU when there is one, so backend="triton" runs the
    compiled kernels there (and the interpreter on CPU)."""
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
FP32_TOL = dict(rtol=2e-5, atol=1e-6)
LIMIT = 20.0


# ============================================================================ closed forms (float64)
def _np(x):
    return None if x is None else x.detach().double().cpu().numpy()


def _clamp(x):
    """(clamped value, derivative of the clamp): torch.clamp semantics, bounds inclusive."""
    return min(max(x, -LIMIT), LIMIT), 1.0 if -LIMIT <= x <= LIMIT else 0.0


def _kl_closed(x, estimator):
    """KL estimate and its derivative w.r.t. the raw log-ratio x. k1 = x and k2 = x²/2 hold no exp
    and are never clamped (TRL, verl); k3 = e^(-d) + d - 1 takes d = clamp(x, ±20) so that e^(-d)
    stays finite (verl's low_var_kl clamps the same way), with zero derivative outside."""
    if estimator == "k1":
        return x, 1.0
    if estimator == "k2":
        return x * x / 2, x
    d, dclamp = _clamp(x)
    return math.exp(-d) + d - 1, (1 - math.exp(-d)) * dclamp


def _agg_weights(mask, loss_agg, total_tokens=None, total_sequences=None, norm_length=None):
    """w[b, t] with loss = Σ w·l, straight from the loss_agg definitions: N tokens, S sequences
    with a counted token (fully masked rows are not sequences, verl / OpenRLHF), L = T, unless the
    whole batch's totals are given."""
    B, T = mask.shape
    w = np.zeros((B, T))
    counts = mask.sum(1)
    tokens = mask.sum() if total_tokens is None else float(total_tokens)
    sequences = (counts > 0).sum() if total_sequences is None else float(total_sequences)
    length = T if norm_length is None else norm_length
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            if loss_agg == "token-mean":
                w[b, t] = mask[b, t] / tokens
            elif loss_agg == "seq-mean-token-mean":
                w[b, t] = mask[b, t] / counts[b] / sequences
            else:
                w[b, t] = mask[b, t] / (sequences * length)
    return w


def _masked_mean(x, mask):
    return float((x * mask).sum() / mask.sum()) if mask.sum() > 0 else 0.0


def _is_weight_closed(log_w, mode, clip_min, clip_max):
    """(weight, touched) of a rollout IS log-weight: clamp to ±20 (verl's safety bound), then
    truncate into [clip_min, clip_max] or zero outside it; compared in log space."""
    lw, _ = _clamp(log_w)
    lo = -math.inf if not clip_min else math.log(clip_min)
    hi = math.inf if clip_max is None else math.log(clip_max)
    outside = lw < lo or lw > hi
    if mode.endswith("truncate"):
        return math.exp(min(max(lw, lo), hi)), outside
    return (0.0 if outside else math.exp(lw)), outside


IS_NAMES = {"tis": "token_truncate", "icepop": "token_mask"}


def ppo_closed_form(logps, old, adv, mask, *, loss_type="ppo", ratio_level="token", clip_eps=0.2,
                    clip_eps_high=None, dual_clip=None, sapo_tau_pos=1.0, sapo_tau_neg=1.05, rollout=None,
                    is_correction=None, is_clip_min=None, is_clip_max=2.0, top_entropy_quantile=1.0, ref=None,
                    kl_coef=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0, loss_agg="token-mean",
                    kl_agg=None, entropy_agg=None, total_tokens=None, total_sequences=None, norm_length=None):
    """Returns (loss, metrics, {"logps": grad, "entropy": grad, "ref_logps": grad}) as float64 numpy,
    token by token from the formulas in ppo_loss's docstring (gradients derived by hand)."""
    lp, old, adv, m, ref, ent, roll = (_np(t) for t in (logps, old, adv, mask.float(), ref, entropy, rollout))
    B, T = lp.shape
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], T, axis=1)
    lo, hi = 1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    is_mode = IS_NAMES.get(is_correction, is_correction)
    threshold = None
    if top_entropy_quantile < 1:
        counted = ent[m != 0]
        threshold = np.quantile(counted, 1 - top_entropy_quantile) if counted.size else 0.0
    pg_t, g_pg, kl_t, g_kl = (np.zeros((B, T)) for _ in range(4))
    clipped, dual_on, half_sq, ratio_t, is_w, is_touched, kept = (np.zeros((B, T)) for _ in range(7))
    for b in range(B):
        n_b = m[b].sum()
        seq_lr = sum(lp[b, t] - old[b, t] for t in range(T) if m[b, t]) / max(n_b, 1)
        seq_is = sum(old[b, t] - roll[b, t] for t in range(T) if m[b, t]) if roll is not None else 0.0
        for t in range(T):
            if m[b, t] == 0:
                continue
            d_tok, _ = _clamp(lp[b, t] - old[b, t])
            d, dclamp = _clamp(seq_lr if ratio_level == "sequence" else lp[b, t] - old[b, t])
            a, r = adv[b, t], math.exp(d)
            if loss_type == "ppo":
                surr, surr_clip = -a * r, -a * min(max(r, lo), hi)
                pg, dpg = (surr_clip, 0.0) if surr_clip > surr else (surr, -a * r * dclamp)
                clipped[b, t] = surr_clip > surr
                if dual_clip is not None and a < 0 and pg > -a * dual_clip:
                    pg, dpg, dual_on[b, t] = -a * dual_clip, 0.0, 1.0
            elif loss_type == "cispo":
                weight = min(max(r, lo), hi)
                pg, dpg = -weight * a * lp[b, t], -weight * a
                clipped[b, t] = r < lo or r > hi
            else:  # sapo
                tau = sapo_tau_pos if a > 0 else sapo_tau_neg
                gate = 1 / (1 + math.exp(-tau * (r - 1)))
                pg, dpg = -(4 / tau) * gate * a, -4 * a * gate * (1 - gate) * r * dclamp
            mult = 1.0
            if is_mode is not None:
                log_w = seq_is if is_mode.startswith("sequence") else old[b, t] - roll[b, t]
                is_w[b, t], is_touched[b, t] = _is_weight_closed(log_w, is_mode, is_clip_min, is_clip_max)
                mult *= is_w[b, t]
            if threshold is not None:
                kept[b, t] = ent[b, t] >= threshold
                mult *= kept[b, t]
            pg_t[b, t], g_pg[b, t] = mult * pg, mult * dpg
            half_sq[b, t], ratio_t[b, t] = 0.5 * d_tok * d_tok, r
            if ref is not None:
                kl_t[b, t], g_kl[b, t] = _kl_closed(lp[b, t] - ref[b, t], kl_estimator)
    totals = dict(total_tokens=total_tokens, total_sequences=total_sequences, norm_length=norm_length)
    w = _agg_weights(m, loss_agg, **totals)
    w_kl = _agg_weights(m, kl_agg or loss_agg, **totals)
    w_ent = _agg_weights(m, entropy_agg or loss_agg, **totals)
    loss = float((w * pg_t).sum())
    g_lp = w * g_pg
    metrics = {
        "pg_loss": loss,
        "clipfrac": _masked_mean(clipped, m),
        "approx_kl": _masked_mean(half_sq, m),
        "ratio_mean": _masked_mean(ratio_t, m),
    }
    if dual_clip is not None:
        metrics["dual_clipfrac"] = _masked_mean(dual_on, m)
    if is_mode is not None:
        metrics["is_weight_mean"] = _masked_mean(is_w, m)
        metrics["is_clipfrac"] = _masked_mean(is_touched, m)
    if threshold is not None:
        metrics["entropy_kept_frac"] = _masked_mean(kept, m)
    g_ref, g_ent = np.zeros((B, T)), np.zeros((B, T))
    if ref is not None:
        loss += kl_coef * float((w_kl * kl_t).sum())
        g_lp = g_lp + kl_coef * w_kl * g_kl
        g_ref = -kl_coef * w_kl * g_kl
        metrics["kl"] = _masked_mean(kl_t, m)
    if ent is not None:
        loss -= entropy_coef * float((w_ent * ent * (m != 0)).sum())
        g_ent = -entropy_coef * w_ent
        metrics["entropy"] = _masked_mean(ent, m)
    return loss, metrics, {"logps": g_lp, "entropy": g_ent, "ref_logps": g_ref}


def value_closed_form(values, old, returns, mask, *, clip_eps=0.2, loss_agg="token-mean"):
    v, old, ret, m = (_np(t) for t in (values, old, returns, mask.float()))
    B, T = v.shape
    per, grad, clipped = (np.zeros((B, T)) for _ in range(3))
    for b in range(B):
        for t in range(T):
            if m[b, t] == 0:
                continue
            delta = v[b, t] - old[b, t]
            e1 = v[b, t] - ret[b, t]
            e2 = old[b, t] + min(max(delta, -clip_eps), clip_eps) - ret[b, t]
            if e2 * e2 > e1 * e1:
                per[b, t], grad[b, t], clipped[b, t] = 0.5 * e2 * e2, e2 * (abs(delta) <= clip_eps), 1.0
            else:
                per[b, t], grad[b, t] = 0.5 * e1 * e1, e1
    w = _agg_weights(m, loss_agg)
    loss = float((w * per).sum())
    metrics = {"vf_loss": loss, "vf_clipfrac": _masked_mean(clipped, m), "vpred": _masked_mean(v, m)}
    return loss, metrics, w * grad


# ============================================================================ inputs and runners
def make_ppo_inputs(B, T, *, dtype=torch.float32, spread=0.3, fully_masked_row=True, seed=0):
    g = _generator(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    inputs = {
        "logps": logps,
        "old_logps": logps + torch.randn(B, T, generator=g) * spread,
        "advantages": torch.randn(B, T, generator=g),
        "mask": torch.rand(B, T, generator=g) > 0.25,
        "ref_logps": logps + torch.randn(B, T, generator=g) * spread,
        "entropy": torch.rand(B, T, generator=g) * 2,
    }
    if fully_masked_row and B > 1:
        inputs["mask"][1] = False
    inputs["mask"][0, 0] = True  # at least one counted token
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def run_ppo(fn, inputs, *, grad_scale=1.0, **kwargs):
    """Call `fn` (public or reference ppo_loss); return loss, metrics and grads of grad_scale·loss."""
    leaf = {k: inputs[k].detach().clone().requires_grad_() for k in ("logps", "ref_logps", "entropy")}
    uses = {"logps": True, "ref_logps": "ref_logps" in kwargs, "entropy": "entropy" in kwargs}
    kwargs = {k: (leaf[k] if k in leaf else v) for k, v in kwargs.items()}
    loss, metrics = fn(leaf["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"], **kwargs)
    wrt = [k for k, used in uses.items() if used]
    grads = torch.autograd.grad(loss * grad_scale, [leaf[k] for k in wrt], allow_unused=True)
    grads = {k: (torch.zeros_like(leaf[k]) if g is None else g) for k, g in zip(wrt, grads)}
    return loss, metrics, grads


def ppo_triton(*args, **kwargs):
    return fastrlhf.ppo_loss(*args, backend="triton", **kwargs)


def assert_close_to_closed(loss, metrics, grads, closed, *, grad_scale=1.0, tol=FP32_TOL, grad_rtol=None):
    c_loss, c_metrics, c_grads = closed
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert set(metrics) == set(c_metrics)
    np.testing.assert_allclose(loss.item(), c_loss, **tol)
    for name, value in metrics.items():
        np.testing.assert_allclose(value.item(), c_metrics[name], **tol, err_msg=name)
    for name, grad in grads.items():
        expected = grad_scale * c_grads[name]
        rtol = grad_rtol or tol["rtol"]
        atol = tol["atol"] + rtol * np.abs(expected).max()  # scale-relative: bf16 rounds each element
        np.testing.assert_allclose(_np(grad), expected, rtol=rtol, atol=atol, err_msg=f"grad {name}")


def extras_kwargs(inputs, with_kl_entropy, estimator="k3"):
    if not with_kl_entropy:
        return {}
    return dict(ref_logps=inputs["ref_logps"], kl_coef=0.1, kl_estimator=estimator,
                entropy=inputs["entropy"], entropy_coef=0.01)


# ============================================================================ ppo_loss
@pytest.mark.parametrize("shape", [(3, 37), (4, 1)])
@pytest.mark.parametrize("with_kl_entropy", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("loss_agg", AGGS)
def test_ppo_triton_reference_closed_form(shape, with_kl_entropy, dual_clip, loss_agg):
    inputs = make_ppo_inputs(*shape, spread=0.6)
    kwargs = dict(clip_eps=0.2, dual_clip=dual_clip, loss_agg=loss_agg, **extras_kwargs(inputs, with_kl_entropy))
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             ref=kwargs.get("ref_logps"), **{k: v for k, v in kwargs.items() if k != "ref_logps"})
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, grad_scale=2.5, **kwargs)
        assert_close_to_closed(loss, metrics, grads, closed, grad_scale=2.5)
    if shape == (3, 37) and dual_clip is not None:  # the test data must exercise every branch
        assert 0 < closed[1]["clipfrac"] < 1 and closed[1]["dual_clipfrac"] > 0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "kl", "mse", "low_var_kl"])
def test_ppo_kl_estimators(estimator):
    inputs = make_ppo_inputs(3, 37, spread=1.0)
    kwargs = dict(ref_logps=inputs["ref_logps"], kl_coef=0.5, kl_estimator=estimator)
    canonical = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(estimator, estimator)
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             ref=inputs["ref_logps"], kl_coef=0.5, kl_estimator=canonical)
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        assert_close_to_closed(*run_ppo(fn, inputs, **kwargs), closed)


def test_ppo_extreme_log_ratios_are_clamped():
    inputs = make_ppo_inputs(3, 37)
    sign = torch.where(torch.arange(37) % 2 == 0, 1.0, -1.0)
    inputs["old_logps"] = inputs["logps"] - 50 * sign  # log-ratio ±50, clamped to ±20
    inputs["ref_logps"] = inputs["logps"] + 50 * sign.roll(1)
    kwargs = dict(ref_logps=inputs["ref_logps"], kl_coef=0.1, kl_estimator="k3", dual_clip=3.0)
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             ref=inputs["ref_logps"], kl_coef=0.1, kl_estimator="k3", dual_clip=3.0)
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, **kwargs)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert_close_to_closed(loss, metrics, grads, closed)
        # outside the clamp range nothing depends on logps any more
        assert torch.count_nonzero(grads["logps"]) == 0
    np.testing.assert_allclose(metrics["approx_kl"].item(), 0.5 * 20.0**2, rtol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_k1_k2_are_not_clamped_k3_keeps_its_exp_guard(backend):
    """Issue 11, case 1: at d = logps - ref = ±30 k1 is ±30 (not ±20) and k2 is 450 (not 200), with
    gradients 1 and d, as in TRL and verl; only k3 = e^(-d) + d - 1 keeps d clamped to ±20 (its exp),
    so its gradient is 0 out there. Checked in kl_penalty and in ppo_loss's KL term (same kernel code
    as the fused head)."""
    logps = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-30.0, 30.0, -25.0, 5.0]])
    d = (logps - ref)[0].tolist()
    for estimator, value, grad in (
        ("k1", d, [1.0] * 4),
        ("k2", [x * x / 2 for x in d], d),
        ("k3", [_kl_closed(x, "k3")[0] for x in d], [0.0, 0.0, 0.0, 1 - math.exp(5.0)]),
    ):
        lp = logps.clone().requires_grad_()
        kl = fastrlhf.kl_penalty(lp, ref, estimator=estimator, backend=backend)
        (g,) = torch.autograd.grad(kl.sum(), lp)
        np.testing.assert_allclose(_np(kl)[0], value, rtol=1e-6, err_msg=estimator)
        np.testing.assert_allclose(_np(g)[0], grad, rtol=1e-6, atol=1e-7, err_msg=estimator)
        lp = logps.clone().requires_grad_()
        loss, metrics = fastrlhf.ppo_loss(lp, logps, torch.zeros_like(logps), torch.ones_like(logps),
                                          ref_logps=ref, kl_coef=1.0, kl_estimator=estimator, backend=backend)
        (g,) = torch.autograd.grad(loss, lp)
        np.testing.assert_allclose(metrics["kl"].item(), sum(value) / 4, rtol=1e-6, err_msg=estimator)
        np.testing.assert_allclose(_np(g)[0], [x / 4 for x in grad], rtol=1e-6, atol=1e-7, err_msg=estimator)


def test_ppo_asymmetric_clip():
    # ratio 1.25, A > 0: clipped with eps_high 0.2, not with 0.28; ratio 0.75, A < 0: clipped at 1 - 0.2.
    logps = torch.zeros(1, 2)
    old = torch.tensor([[-math.log(1.25), -math.log(0.75)]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for backend in ("triton", "torch"):
        _, sym = fastrlhf.ppo_loss(logps, old, adv, mask, clip_eps=0.2, backend=backend)
        _, asym = fastrlhf.ppo_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28, backend=backend)
        assert sym["clipfrac"].item() == 1.0 and asym["clipfrac"].item() == 0.5
        np.testing.assert_allclose(asym["pg_loss"].item(), (-1.25 + 0.8) / 2, rtol=1e-6)
    inputs = make_ppo_inputs(3, 37, spread=0.6)
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             clip_eps=0.1, clip_eps_high=0.3)
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        assert_close_to_closed(*run_ppo(fn, inputs, clip_eps=0.1, clip_eps_high=0.3), closed)


@pytest.mark.parametrize("loss_agg", AGGS)
@pytest.mark.parametrize("fn", [ppo_triton, ref_ppo.ppo_loss], ids=["triton", "reference"])
def test_ppo_all_zero_mask_and_empty_batch(fn, loss_agg):
    for B, T in ((3, 5), (0, 5)):
        inputs = make_ppo_inputs(B, T, fully_masked_row=False) if B else {
            k: torch.zeros(0, T) for k in ("logps", "old_logps", "advantages", "ref_logps", "entropy")}
        inputs["mask"] = torch.zeros(B, T, dtype=torch.bool)
        kwargs = dict(dual_clip=2.0, loss_agg=loss_agg, **extras_kwargs(inputs, True))
        loss, metrics, grads = run_ppo(fn, inputs, **kwargs)
        assert loss.item() == 0.0 and all(v.item() == 0.0 for v in metrics.values())
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_padding_amount_does_not_matter(loss_agg):
    inputs = make_ppo_inputs(3, 37, spread=0.6)
    padded = {}
    for name, x in inputs.items():
        # 5 extra columns and 2 extra rows, masked out and filled with garbage (NaN for floats)
        fill = False if name == "mask" else float("nan")
        padded[name] = torch.nn.functional.pad(x.to(torch.float32), (0, 5, 0, 2), value=fill).to(x.dtype)
    kwargs = lambda d: dict(dual_clip=2.0, loss_agg=loss_agg, **extras_kwargs(d, True))  # noqa: E731
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, **kwargs(inputs))
        p_loss, p_metrics, p_grads = run_ppo(fn, padded, **kwargs(padded))
        torch.testing.assert_close(p_loss, loss)
        for name in metrics:
            torch.testing.assert_close(p_metrics[name], metrics[name])
        for name in grads:
            torch.testing.assert_close(p_grads[name][:3, :37], grads[name])
            assert torch.count_nonzero(p_grads[name][3:]) == 0 and torch.count_nonzero(p_grads[name][:, 37:]) == 0


def test_ppo_int_mask():
    inputs = make_ppo_inputs(3, 37)
    int_mask = dict(inputs, mask=inputs["mask"].to(torch.int64))
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"])
    assert_close_to_closed(*run_ppo(ppo_triton, int_mask), closed)


def test_ppo_bf16():
    inputs = make_ppo_inputs(3, 37, spread=0.6, dtype=torch.bfloat16)
    kwargs = dict(dual_clip=2.0, clip_eps_high=0.28, **extras_kwargs(inputs, True))
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             ref=inputs["ref_logps"], **{k: v for k, v in kwargs.items() if k != "ref_logps"})
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, **kwargs)
        assert all(g.dtype == torch.bfloat16 for g in grads.values())
        assert_close_to_closed(loss, metrics, grads, closed, tol=dict(rtol=1e-4, atol=1e-6), grad_rtol=1e-2)


def test_ppo_without_grad_and_metric_contract():
    inputs = make_ppo_inputs(3, 37)
    kwargs = dict(dual_clip=2.0, **extras_kwargs(inputs, True))
    loss, metrics, _ = run_ppo(ppo_triton, inputs, **kwargs)
    assert set(metrics) == {"pg_loss", "clipfrac", "approx_kl", "ratio_mean", "kl", "entropy", "dual_clipfrac"}
    for value in metrics.values():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad
    _, plain = fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                                 backend="triton")
    assert set(plain) == {"pg_loss", "clipfrac", "approx_kl", "ratio_mean"}
    with torch.no_grad():
        loss_ng, _ = fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"],
                                       inputs["mask"], backend="triton", **kwargs)
    torch.testing.assert_close(loss_ng, loss.detach())
    # backend="torch" is the reference
    loss_t, _ = fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                                  backend="torch", **kwargs)
    loss_r, _ = ref_ppo.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                                 **kwargs)
    assert torch.equal(loss_t, loss_r)


def test_ppo_reference_gradcheck_float64():
    inputs = make_ppo_inputs(2, 7, dtype=torch.float64, spread=0.6, seed=3)
    old, adv, mask = inputs["old_logps"], inputs["advantages"], inputs["mask"]
    for loss_agg in AGGS:
        def f(logps, ref_logps, entropy):
            return ref_ppo.ppo_loss(logps, old, adv, mask, dual_clip=2.0, clip_eps_high=0.3, ref_logps=ref_logps,
                                    kl_coef=0.2, entropy=entropy, entropy_coef=0.05, loss_agg=loss_agg)[0]
        args = [inputs[k].clone().requires_grad_() for k in ("logps", "ref_logps", "entropy")]
        assert torch.autograd.gradcheck(f, args)


# ============================================================================ value_loss
def make_value_inputs(B, T, *, dtype=torch.float32, seed=0):
    g = _generator(seed)
    values = torch.randn(B, T, generator=g)
    inputs = {
        "values": values,
        "old_values": values + torch.randn(B, T, generator=g) * 0.4,  # |v - old| > eps for many tokens
        "returns": torch.randn(B, T, generator=g),
        "mask": torch.rand(B, T, generator=g) > 0.25,
    }
    if B > 1:
        inputs["mask"][1] = False
    inputs["mask"][0, 0] = True
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def run_value(fn, inputs, **kwargs):
    values = inputs["values"].detach().clone().requires_grad_()
    loss, metrics = fn(values, inputs["old_values"], inputs["returns"], inputs["mask"], **kwargs)
    (grad,) = torch.autograd.grad(loss * 1.5, values)
    return loss, metrics, grad


def value_triton(*args, **kwargs):
    return fastrlhf.value_loss(*args, backend="triton", **kwargs)


@pytest.mark.parametrize("shape", [(3, 37), (4, 1)])
@pytest.mark.parametrize("loss_agg", AGGS)
def test_value_loss_triton_reference_closed_form(shape, loss_agg):
    inputs = make_value_inputs(*shape)
    c_loss, c_metrics, c_grad = value_closed_form(*inputs.values(), clip_eps=0.2, loss_agg=loss_agg)
    for fn in (value_triton, ref_ppo.value_loss):
        loss, metrics, grad = run_value(fn, inputs, clip_eps=0.2, loss_agg=loss_agg)
        assert loss.dtype == torch.float32 and set(metrics) == {"vf_loss", "vf_clipfrac", "vpred"}
        np.testing.assert_allclose(loss.item(), c_loss, **FP32_TOL)
        for name, value in metrics.items():
            assert not value.requires_grad
            np.testing.assert_allclose(value.item(), c_metrics[name], **FP32_TOL, err_msg=name)
        np.testing.assert_allclose(_np(grad), 1.5 * c_grad, rtol=2e-5, atol=1e-6)
    if shape == (3, 37):
        assert 0 < c_metrics["vf_clipfrac"] < 1


@pytest.mark.parametrize("fn", [value_triton, ref_ppo.value_loss], ids=["triton", "reference"])
def test_value_loss_empty_mask_padding_and_bf16(fn):
    inputs = make_value_inputs(3, 37)
    empty = dict(inputs, mask=torch.zeros(3, 37, dtype=torch.bool))
    loss, metrics, grad = run_value(fn, empty)
    assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values()) and torch.count_nonzero(grad) == 0

    padded = {k: torch.nn.functional.pad(v.float(), (0, 4, 0, 1), value=0 if k == "mask" else float("inf"))
              .to(v.dtype) for k, v in inputs.items()}
    loss, _, grad = run_value(fn, inputs, loss_agg="seq-mean-token-mean")
    p_loss, _, p_grad = run_value(fn, padded, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(p_loss, loss)
    torch.testing.assert_close(p_grad[:3, :37], grad)

    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    c_loss, _, c_grad = value_closed_form(*bf16.values())
    loss, _, grad = run_value(fn, bf16)
    assert grad.dtype == torch.bfloat16
    np.testing.assert_allclose(loss.item(), c_loss, rtol=1e-4)
    np.testing.assert_allclose(_np(grad), 1.5 * c_grad, rtol=1e-2, atol=1e-2 * np.abs(c_grad).max())


def test_value_loss_reference_gradcheck_float64():
    inputs = make_value_inputs(2, 7, dtype=torch.float64, seed=2)
    for loss_agg in AGGS:
        def f(values):
            return ref_ppo.value_loss(values, inputs["old_values"], inputs["returns"], inputs["mask"],
                                      clip_eps=0.2, loss_agg=loss_agg)[0]
        assert torch.autograd.gradcheck(f, [inputs["values"].clone().requires_grad_()])


# ============================================================================ kl_penalty
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty(estimator, dtype):
    g = _generator(1)
    logps = -torch.rand(5, 13, generator=g) * 4
    ref = logps + torch.randn(5, 13, generator=g)
    ref[0, :4] = logps[0, :4] + torch.tensor([50.0, -50.0, 20.5, -19.5])  # clamped, clamped, clamped, not
    logps, ref = logps.to(dtype), ref.to(dtype)
    canonical = {"low_var_kl": "k3"}.get(estimator, estimator)
    closed = [[_kl_closed(a - b, canonical) for a, b in zip(ra, rb)] for ra, rb in zip(_np(logps), _np(ref))]
    c_kl = np.array([[c[0] for c in row] for row in closed])
    c_dkl = np.array([[c[1] for c in row] for row in closed])
    upstream = torch.linspace(-1, 2, 65).reshape(5, 13)
    tol = FP32_TOL if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for backend in ("triton", "torch"):
        lp, rf = logps.clone().requires_grad_(), ref.clone().requires_grad_()
        kl = fastrlhf.kl_penalty(lp, rf, estimator=estimator, backend=backend)
        assert kl.dtype == dtype and kl.shape == logps.shape
        g_lp, g_ref = torch.autograd.grad(kl, [lp, rf], grad_outputs=upstream.to(dtype))
        assert g_lp.dtype == dtype and g_ref.dtype == dtype
        np.testing.assert_allclose(_np(kl), c_kl, **{**tol, "atol": tol["atol"] + tol["rtol"] * np.abs(c_kl).max()})
        np.testing.assert_allclose(_np(g_lp), _np(upstream) * c_dkl, **tol)
        np.testing.assert_allclose(_np(g_ref), -_np(upstream) * c_dkl, **tol)
    assert torch.isfinite(kl).all()


def test_kl_penalty_mixed_dtypes_empty_and_gradcheck():
    logps, ref = -torch.rand(4, 3), (-torch.rand(4, 3)).to(torch.bfloat16)
    kl = fastrlhf.kl_penalty(logps, ref, estimator="k3", backend="triton")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, ref_ppo.kl_penalty(logps, ref, estimator="k3"))
    assert fastrlhf.kl_penalty(torch.zeros(0, 3), torch.zeros(0, 3), backend="triton").shape == (0, 3)
    for estimator in ("k1", "k2", "k3"):
        args = [(-torch.rand(3, 4, dtype=torch.float64) * 2).requires_grad_() for _ in range(2)]
        assert torch.autograd.gradcheck(lambda a, b: ref_ppo.kl_penalty(a, b, estimator=estimator), args)


# ============================================================================ bad input
def _bad_ppo_cases():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    base = lambda **kw: dict(dict(logps=x, old_logps=x, advantages=x, mask=m), **kw)  # noqa: E731
    return [
        (base(old_logps=torch.zeros(2, 4)), "old_logps"),
        (base(advantages=torch.zeros(2, 3, dtype=torch.int64)), "advantages"),
        (base(logps=torch.zeros(6), old_logps=torch.zeros(6), advantages=torch.zeros(6),
              mask=torch.ones(6)), "logps"),
        (base(mask=torch.ones(3, 2)), "mask"),
        (base(clip_eps=0.0), "clip_eps"),
        (base(clip_eps=-0.1), "clip_eps"),
        (base(clip_eps_high=0.0), "clip_eps_high"),
        (base(dual_clip=1.0), "dual_clip"),
        (base(dual_clip=0.5), "dual_clip"),
        (base(loss_agg="mean"), "loss_agg"),
        (base(ref_logps=x, kl_estimator="k4"), "kl_estimator"),
        (base(kl_coef=0.1), "ref_logps"),
        (base(entropy_coef=0.1), "entropy"),
        (base(kl_coef=-0.1, ref_logps=x), "kl_coef"),
        (base(entropy=torch.zeros(2, 2)), "entropy"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ppo_bad_input(backend):
    for kwargs, name in _bad_ppo_cases():
        with pytest.raises(ValueError, match=name):
            fastrlhf.ppo_loss(**kwargs, backend=backend)


def test_value_and_kl_bad_input():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    cases = [
        (lambda: fastrlhf.value_loss(x, x, torch.zeros(3, 2), m), "returns"),
        (lambda: fastrlhf.value_loss(x, x, x, m, clip_eps=0), "clip_eps"),
        (lambda: fastrlhf.value_loss(x, x, x, m, loss_agg="sum"), "loss_agg"),
        (lambda: fastrlhf.value_loss(x.long(), x, x, m), "values"),
        (lambda: fastrlhf.kl_penalty(x, x, estimator="k5"), "estimator"),
        (lambda: fastrlhf.kl_penalty(x, torch.zeros(3)), "ref_logps"),
        (lambda: fastrlhf.kl_penalty(x.int(), x), "logps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()



# ============================================================================ GPU launch sizes
def test_gpu_block_sizes_fill_an_h100_and_give_the_same_results(monkeypatch):
    """64k tokens used to be 64 programs of 1024 (half of an H100's 132 SMs idle): small batches now
    get blocks down to 256. The interpreter runs with those GPU sizes here (several programs, their
    partial sums added) and must match the reference."""
    from fastrlhf.kernels import _launch

    cuda = torch.device("cuda")
    assert 64 * 1024 // _launch.elementwise_block(64 * 1024, cuda) >= 132
    assert _launch.elementwise_block(2**21, cuda) == 1024 and _launch.elementwise_block(10, cuda) == 256
    with pytest.raises(ValueError, match="2\\*\\*31"):
        _launch.check_int32_indexable("logps", 2**31)

    monkeypatch.setattr(_launch, "GPU_SIZES_EVERYWHERE", True)
    g = _generator(3)
    B, T = 5, 300  # 1500 tokens -> 6 programs of 256
    logps, old, adv, ref = (torch.randn(B, T, generator=g) for _ in range(4))
    mask = torch.rand(B, T, generator=g) > 0.3
    kwargs = dict(ref_logps=ref, kl_coef=0.1, dual_clip=3.0, loss_agg="seq-mean-token-mean")
    results = {}
    for backend in ("triton", "torch"):
        lp = logps.clone().requires_grad_()
        loss, metrics = fastrlhf.ppo_loss(lp, old, adv, mask, **kwargs, backend=backend)
        loss.backward()
        v_loss, _ = fastrlhf.value_loss(logps, old, adv, mask, backend=backend)
        kl = fastrlhf.kl_penalty(logps, ref, estimator="k3", backend=backend)
        results[backend] = [loss, lp.grad, metrics["clipfrac"], metrics["kl"], v_loss, kl]
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_nan_in_a_counted_token_makes_the_loss_nan_like_the_reference():
    """Triton's default min/max drop NaN (PTX max.f32): the clamps used to turn a NaN log-prob or
    value into a finite loss (and KL e^20), hiding a diverged model from the trainer's NaN guard."""
    g = _generator(4)
    logps, old, adv, ref = (torch.randn(2, 6, generator=g) for _ in range(4))
    logps[0, 2] = float("nan")
    mask = torch.ones(2, 6)
    for backend in ("triton", "torch"):
        loss, _ = fastrlhf.ppo_loss(logps, old, adv, mask, ref_logps=ref, kl_coef=0.1, dual_clip=3.0, backend=backend)
        assert loss.isnan(), backend
        assert fastrlhf.value_loss(logps, old, adv, mask, backend=backend)[0].isnan(), backend
        kl = fastrlhf.kl_penalty(logps, ref, estimator="k3", backend=backend)
        assert kl[0, 2].isnan() and kl.isnan().sum() == 1, backend
        # Under a zero mask the NaN is padding and must not leak.
        mask[0, 2] = 0
        assert fastrlhf.ppo_loss(logps, old, adv, mask, ref_logps=ref, kl_coef=0.1, backend=backend)[0].isfinite()
        mask[0, 2] = 1
