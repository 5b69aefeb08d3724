"""The objectives of `ppo_loss` beyond clipped PPO (GSPO, CISPO, SAPO, rollout IS corrections,
high-entropy token selection, [B] advantages, per-term aggregation, whole-batch totals):
Triton kernel and PyTorch twin vs the independent float64 closed form of test_ppo (a per-token loop
with hand-derived gradients), forward and backward; and, where a peer's convention differs from
ours, the peer's own formula (transcribed from its source, cited per test) next to the option
mapping that reproduces it.

Tolerances as test_ppo: fp32 vs float64 closed form rtol 2e-5, atol 1e-6; peer formulas in float64
on the torch backend to 1e-10.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICE
from test_ppo import (
    assert_close_to_closed,
    make_ppo_inputs,
    ppo_closed_form,
    run_ppo,
)

import fastrlhf
import fastrlhf.twins.ppo as ref_ppo


@pytest.fixture(autouse=True)
def _on_test_device():
    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(previous)


def ppo_triton(*args, **kwargs):
    return fastrlhf.ppo_loss(*args, backend="triton", **kwargs)


def objective_inputs(B=4, T=29, *, seed=0, spread=0.5, rollout_spread=0.4, dtype=torch.float32):
    inputs = make_ppo_inputs(B, T, spread=spread, seed=seed, dtype=dtype)
    g = torch.Generator(device=DEVICE).manual_seed(seed + 100)
    inputs["rollout"] = (inputs["old_logps"].float() + torch.randn(B, T, generator=g) * rollout_spread).to(dtype)
    inputs["seq_advantages"] = torch.randn(B, generator=g).to(dtype)
    return inputs


# name -> (ppo_loss kwargs without tensors, which optional tensors it uses, what must be exercised)
CASES = {
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    "gspo-token-mean-kl": dict(ratio_level="sequence", clip_eps=0.05, kl_coef=0.1, kl_estimator="k1"),
    "gspo-seq-adv": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean", seq_adv=True, clip_eps=0.03),
    "cispo": dict(loss_type="cispo", clip_eps=0.2, clip_eps_high=0.28),
    "cispo-trl-one-sided": dict(loss_type="cispo", clip_eps=1.0, clip_eps_high=0.5, entropy_coef=0.01),
    "sapo": dict(loss_type="sapo", loss_agg="seq-mean-token-mean"),
    "sapo-temps-kl": dict(loss_type="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5, kl_coef=0.2, kl_estimator="k2"),
    "tis": dict(is_correction="token_truncate", is_clip_max=1.3),
    "tis-alias-two-sided": dict(is_correction="tis", is_clip_min=0.8, is_clip_max=1.2, dual_clip=2.0),
    "icepop": dict(is_correction="icepop", is_clip_min=0.7, is_clip_max=1.4),
    "seq-truncate": dict(is_correction="sequence_truncate", is_clip_min=0.5, is_clip_max=1.5,
                         loss_agg="seq-mean-token-mean"),
    "seq-mask": dict(is_correction="sequence_mask", is_clip_min=0.1, is_clip_max=10.0),
    "entropy-top-20": dict(top_entropy_quantile=0.2, entropy_coef=0.01),
    "entropy-top-0": dict(top_entropy_quantile=0.0),
    "seq-adv": dict(seq_adv=True, dual_clip=3.0),
    "kl-entropy-own-agg": dict(loss_agg="seq-mean-token-mean", kl_agg="token-mean", entropy_agg="seq-mean-token-sum-norm",
                               kl_coef=0.1, entropy_coef=0.02),
    "kl-own-agg-only": dict(loss_agg="seq-mean-token-sum-norm", kl_agg="token-mean", kl_coef=0.1),
    "totals": dict(loss_agg="seq-mean-token-sum-norm", total_sequences=7.0, norm_length=50.0, kl_coef=0.1,
                   kl_agg="token-mean", total_tokens=123.0),
    "everything": dict(loss_type="ppo", ratio_level="sequence", seq_adv=True, is_correction="sequence_truncate",
                       is_clip_min=0.5, is_clip_max=1.5, top_entropy_quantile=0.5, kl_coef=0.05, entropy_coef=0.01,
                       loss_agg="seq-mean-token-mean", kl_agg="token-mean", clip_eps_high=0.28),
}


def case_arguments(name, inputs):
    """(kwargs for ppo_loss / run_ppo, kwargs for ppo_closed_form, the inputs to use)."""
    kwargs = dict(CASES[name])
    inputs = dict(inputs)
    if kwargs.pop("seq_adv", False):
        inputs["advantages"] = inputs["seq_advantages"]
    if kwargs.get("is_correction"):
        kwargs["rollout_logps"] = inputs["rollout"]
    if kwargs.get("kl_coef"):
        kwargs["ref_logps"] = inputs["ref_logps"]
    if kwargs.get("entropy_coef") or kwargs.get("top_entropy_quantile", 1.0) < 1:
        kwargs["entropy"] = inputs["entropy"]
    closed = {k: v for k, v in kwargs.items() if k not in ("ref_logps", "rollout_logps")}
    closed.update(ref=kwargs.get("ref_logps"), rollout=kwargs.get("rollout_logps"))
    return kwargs, closed, inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_matches_closed_form_on_both_backends(name):
    kwargs, closed_kwargs, inputs = case_arguments(name, objective_inputs())
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             **closed_kwargs)
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, grad_scale=1.7, **kwargs)
        assert_close_to_closed(loss, metrics, grads, closed, grad_scale=1.7)
    # the inputs must exercise the option's branch
    metrics = closed[1]
    if "is_correction" in kwargs and not name.startswith("seq-mask"):
        assert 0 < metrics["is_clipfrac"] < 1, metrics
    if name.startswith("cispo"):
        assert 0 < metrics["clipfrac"] < 1, metrics
    if name == "entropy-top-20":
        assert 0.1 < metrics["entropy_kept_frac"] < 0.3, metrics
    if name == "entropy-top-0":  # only the highest-entropy token trains
        assert round(metrics["entropy_kept_frac"] * inputs["mask"].sum().item()) == 1
    else:
        assert np.abs(closed[2]["logps"]).max() > 0


@pytest.mark.parametrize("name", ["gspo", "cispo", "sapo", "tis", "seq-mask", "entropy-top-20", "everything"])
def test_objective_bf16_inputs(name):
    kwargs, closed_kwargs, inputs = case_arguments(name, objective_inputs(dtype=torch.bfloat16))
    closed = ppo_closed_form(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                             **closed_kwargs)
    for fn in (ppo_triton, ref_ppo.ppo_loss):
        loss, metrics, grads = run_ppo(fn, inputs, **kwargs)
        assert all(g.dtype == torch.bfloat16 for g in grads.values())
        assert_close_to_closed(loss, metrics, grads, closed, tol=dict(rtol=1e-4, atol=1e-6), grad_rtol=1e-2)


def test_objectives_float64_gradcheck_of_the_twin():
    inputs = objective_inputs(2, 6, seed=3, dtype=torch.float64)
    # Only objectives whose gradient IS the derivative of their value: CISPO's stop-gradient weight
    # is not differentiated by design, and GSPO's (GSPO-token, sg form) equals the derivative only
    # when a row has one advantage, hence gspo-seq-adv. Their gradients are checked against the
    # closed form above instead.
    for name in ("gspo-seq-adv", "sapo-temps-kl", "tis", "seq-adv", "kl-entropy-own-agg", "totals"):
        kwargs, _, case_inputs = case_arguments(name, inputs)
        kwargs.pop("ref_logps", None)
        kwargs.pop("entropy", None)
        wrt = ["logps"] + (["ref_logps"] if kwargs.get("kl_coef") else []) + (
            ["entropy"] if kwargs.get("entropy_coef") else [])

        def f(*leaves, kwargs=kwargs, case_inputs=case_inputs, wrt=wrt):
            named = dict(zip(wrt, leaves))
            extra = {k: v for k, v in named.items() if k != "logps"}
            return ref_ppo.ppo_loss(named["logps"], case_inputs["old_logps"], case_inputs["advantages"],
                                    case_inputs["mask"], **kwargs, **extra)[0]

        leaves = [case_inputs[k].clone().requires_grad_() for k in wrt]
        assert torch.autograd.gradcheck(f, leaves), name


# ============================================================================ aggregation conventions
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_a_fully_masked_row_changes_nothing(loss_agg, backend):
    """Issue 11, case 3: seq-mean-token-sum-norm used to divide by B·T counting fully masked rows while
    seq-mean-token-mean did not; both now count only sequences with a counted token (verl's
    agg_loss, OpenRLHF's aggregate_loss). Appending an empty row leaves loss and gradients alone."""
    inputs = objective_inputs(3, 11, seed=4)
    inputs["mask"][1] = True
    kwargs = dict(loss_agg=loss_agg, ref_logps=inputs["ref_logps"], kl_coef=0.1)
    loss, _, grads = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend=backend, **k), inputs, **kwargs)
    padded = {k: torch.cat([v, v[:1]]) for k, v in inputs.items() if k not in ("seq_advantages",)}
    padded["mask"][-1] = False
    kwargs["ref_logps"] = padded["ref_logps"]
    p_loss, _, p_grads = run_ppo(lambda *a, **k: fastrlhf.ppo_loss(*a, backend=backend, **k), padded, **kwargs)
    torch.testing.assert_close(p_loss, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p_grads["logps"][:3], grads["logps"], rtol=1e-6, atol=1e-8)
    v_loss, _ = fastrlhf.value_loss(inputs["logps"], inputs["old_logps"], inputs["ref_logps"], inputs["mask"],
                                    loss_agg=loss_agg, backend=backend)
    p_v_loss, _ = fastrlhf.value_loss(padded["logps"], padded["old_logps"], padded["ref_logps"], padded["mask"],
                                      loss_agg=loss_agg, backend=backend)
    torch.testing.assert_close(p_v_loss, v_loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_whole_batch_totals_add_up_to_the_full_batch(loss_agg, backend):
    """Gradient accumulation: two micro-batches, cut to their own (different) padded lengths as a
    trainer does, each given the totals of the whole batch (tokens N, sequences S, length L), sum to
    the full-batch loss and gradients, for the policy loss (with KL and entropy terms) and the value
    loss. Without the totals they do not (checked too, so the test can fail)."""
    inputs = objective_inputs(6, 17, seed=5)
    inputs["mask"][:, 9:] = False
    inputs["mask"][3:, 9:] = True  # rows 0-2 end by t = 9: their micro-batch is cut to 9 columns
    mask = inputs["mask"]
    totals = dict(total_tokens=mask.sum().float(), total_sequences=float((mask.sum(1) > 0).sum()),
                  norm_length=17.0)
    extra = lambda d: dict(ref_logps=d["ref_logps"], kl_coef=0.1, entropy=d["entropy"], entropy_coef=0.01,  # noqa: E731
                           loss_agg=loss_agg, kl_agg="token-mean")
    call = lambda *a, **k: fastrlhf.ppo_loss(*a, backend=backend, **k)  # noqa: E731
    full_loss, _, full_grads = run_ppo(call, inputs, **extra(inputs), **totals)
    parts = [{k: v[:3, :9] if v.dim() == 2 else v[:3] for k, v in inputs.items()},
             {k: v[3:] for k, v in inputs.items()}]
    summed, plain = 0.0, 0.0
    grads = []
    for part in parts:
        loss, _, g = run_ppo(call, part, **extra(part), **totals)
        summed, grads = summed + loss, grads + [g["logps"]]
        plain = plain + run_ppo(call, part, **extra(part))[0]
    torch.testing.assert_close(summed, full_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[0], full_grads["logps"][:3, :9], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[1], full_grads["logps"][3:], rtol=1e-6, atol=1e-8)
    assert not torch.allclose(plain / 2, full_loss, rtol=1e-3)  # the local denominators differ
    # value_loss takes the same totals
    v_args = lambda d: (d["logps"], d["old_logps"], d["ref_logps"], d["mask"])  # noqa: E731
    v_full, _ = fastrlhf.value_loss(*v_args(inputs), loss_agg=loss_agg, backend=backend, **totals)
    v_sum = sum(fastrlhf.value_loss(*v_args(p), loss_agg=loss_agg, backend=backend, **totals)[0] for p in parts)
    torch.testing.assert_close(v_sum, v_full, rtol=1e-6, atol=1e-7)


# ============================================================================ peers' own formulas
def _f64(inputs):
    return {k: v.detach().double() for k, v in inputs.items()}


def _twin(logps, inputs, **kwargs):
    return fastrlhf.ppo_loss(logps, inputs["old_logps"], inputs["advantages"], inputs["mask"], backend="torch",
                             **kwargs)


def _value_and_grad(fn, logps):
    leaf = logps.clone().requires_grad_()
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _assert_same(ours, peer):
    torch.testing.assert_close(ours[0], peer[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], peer[1], rtol=1e-10, atol=1e-12)


def _peer_inputs(seed=6, B=8, T=13):
    inputs = _f64(objective_inputs(B, T, seed=seed, spread=0.3))
    inputs["mask"] = inputs["mask"] != 0
    inputs["mask"][1, :3] = True  # no fully masked row: TRL counts every row, verl / we count non-empty ones
    inputs["advantages"] = inputs["seq_advantages"][:, None].expand(B, T)  # TRL's [B, 1] broadcast
    return inputs


def test_gspo_equals_trl_sequence_level_and_verl_gspo():
    """TRL GRPOTrainer._compute_loss (importance_sampling_level="sequence", loss_type="grpo"):
    coef = exp(mean_t log_ratio) with gradient through the mean, loss = mean_b of the per-row token
    mean; verl compute_policy_loss_gspo: s_t = sg[s]·pi/sg[pi], clamp(log s, max=10), agg
    seq-mean-token-mean. With per-sequence advantages both equal ratio_level="sequence",
    loss_agg="seq-mean-token-mean"."""
    x = _peer_inputs()
    m, adv, eps_low, eps_high = x["mask"].double(), x["advantages"], 0.2, 0.28

    def trl(logps):
        log_ratio = logps - x["old_logps"]
        coef_1 = torch.exp((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()

    def verl(logps):
        neg_kl = logps - x["old_logps"]
        seq = torch.sum(neg_kl * m, dim=-1) / torch.sum(m, dim=-1).clamp(min=1)
        log_s = torch.clamp(logps - logps.detach() + seq.detach().unsqueeze(-1), max=10.0)
        s = torch.exp(log_s)
        losses = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - eps_low, 1 + eps_high))
        seq_losses = (losses * m).sum(-1) / (m.sum(-1) + 1e-8)
        return seq_losses.sum() / (m.sum(-1) > 0).sum()

    ours = _value_and_grad(lambda lp: _twin(lp, x, ratio_level="sequence", loss_agg="seq-mean-token-mean",
                                            clip_eps=eps_low, clip_eps_high=eps_high)[0], x["logps"])
    _assert_same(ours, _value_and_grad(trl, x["logps"]))
    verl_value, verl_grad = _value_and_grad(verl, x["logps"])
    torch.testing.assert_close(ours[0], verl_value, rtol=1e-7, atol=1e-9)  # verl's +1e-8 in the token mean
    torch.testing.assert_close(ours[1], verl_grad, rtol=1e-7, atol=1e-9)


def test_cispo_maps_to_verl_two_sided_and_trl_one_sided():
    """verl compute_policy_loss_cispo: -sg[clip(r, 1 - eps_low, 1 + eps_high)]·A·logp (our default).
    TRL (loss_type="cispo"): -sg[clamp(r, max=epsilon_high)]·A·logp: clip_eps=1.0 (lower bound 0,
    r > 0 anyway), clip_eps_high = epsilon_high - 1."""
    x = _peer_inputs(seed=7)
    m, adv = x["mask"].double(), x["advantages"]

    def verl(logps):
        ratio = torch.exp(torch.clamp(logps - x["old_logps"], -20, 20))
        losses = -torch.clamp(ratio, 0.8, 1.28).detach() * adv * logps
        return (losses * m).sum() / m.sum()

    def trl(logps, epsilon_high=1.1):
        coef_1 = torch.exp(logps - x["old_logps"])
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps
        return (per_token * m).sum() / m.sum()  # "cispo" divides by num_items_in_batch (all tokens)

    ours = _value_and_grad(lambda lp: _twin(lp, x, loss_type="cispo", clip_eps_high=0.28)[0], x["logps"])
    _assert_same(ours, _value_and_grad(verl, x["logps"]))
    ours = _value_and_grad(lambda lp: _twin(lp, x, loss_type="cispo", clip_eps=1.0, clip_eps_high=0.1,
                                            total_tokens=m.sum())[0], x["logps"])
    _assert_same(ours, _value_and_grad(trl, x["logps"]))


def test_sapo_equals_trl_and_verl():
    """TRL (loss_type="sapo"): -sigmoid(tau (r - 1))·4/tau·A, tau = pos if A > 0 else neg, agg like
    "grpo" (mean over all rows of token means); verl compute_policy_loss_sapo: the same gate on
    clamp(log r, ±20), agg seq-mean-token-mean."""
    x = _peer_inputs(seed=8)
    m, adv = x["mask"].double(), x["advantages"]

    def trl(logps, tau_pos=1.0, tau_neg=1.05):
        coef_1 = torch.exp(logps - x["old_logps"])
        temperatures = torch.where(adv > 0, tau_pos, tau_neg)
        per_token = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * adv
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()

    ours = _value_and_grad(lambda lp: _twin(lp, x, loss_type="sapo", loss_agg="seq-mean-token-mean")[0], x["logps"])
    _assert_same(ours, _value_and_grad(trl, x["logps"]))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_is_corrections_equal_trl_vllm_importance_sampling(mode):
    """TRL GRPOTrainer._generate_and_score_completions: diff = (old - sampling) * mask, summed over the
    row for sequence_* modes, ratio = exp(diff); *_truncate clamps into [clip_min, clip_max], *_mask
    zeroes outside; the per-token loss is multiplied by it (after the clip, before the KL term)."""
    x = _peer_inputs(seed=9, T=5)
    x["rollout"] = x["old_logps"] + (x["rollout"] - x["old_logps"]) * 0.3
    m, adv, clip_min, clip_max = x["mask"].double(), x["advantages"], 0.9, 1.15

    def trl(logps):
        diff = (x["old_logps"] - x["rollout"]) * m
        if mode.startswith("sequence"):
            diff = diff.sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        if mode.endswith("truncate"):
            ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
        else:
            ratio = ratio.masked_fill((ratio < clip_min) | (ratio > clip_max), 0.0)
        coef_1 = torch.exp(logps - x["old_logps"])
        per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv) * ratio
        return (per_token * m).sum() / m.sum()

    ours = _value_and_grad(lambda lp: _twin(lp, x, rollout_logps=x["rollout"], is_correction=mode,
                                            is_clip_min=clip_min, is_clip_max=clip_max)[0], x["logps"])
    _assert_same(ours, _value_and_grad(trl, x["logps"]))
    _, metrics = _twin(x["logps"], x, rollout_logps=x["rollout"], is_correction=mode, is_clip_min=clip_min,
                       is_clip_max=clip_max)
    assert 0 < metrics["is_clipfrac"] < 1  # some weights truncated / masked, some not


def test_dr_grpo_and_grpo_aggregations_map_to_trl():
    """TRL "dr_grpo": Σ mask·l / (B · max_completion_length) = seq-mean-token-sum-norm with
    total_sequences = B (TRL counts every row) and norm_length = max_completion_length. TRL "grpo":
    mean over ALL B rows of token means = seq-mean-token-mean with total_sequences = B. With a fully
    masked row the defaults (which do not count it) differ from TRL by exactly B / (B - 1)."""
    x = _peer_inputs(seed=10)
    x["mask"][2] = False
    m, adv, B, L = x["mask"].double(), x["advantages"], x["mask"].shape[0], 20

    def trl_per_token(logps):
        coef_1 = torch.exp(logps - x["old_logps"])
        return -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv)

    def trl_dr_grpo(logps):
        return (trl_per_token(logps) * m).sum() / (B * L)

    def trl_grpo(logps):
        return ((trl_per_token(logps) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()

    ours = _value_and_grad(lambda lp: _twin(lp, x, loss_agg="seq-mean-token-sum-norm", total_sequences=B,
                                            norm_length=L)[0], x["logps"])
    _assert_same(ours, _value_and_grad(trl_dr_grpo, x["logps"]))
    ours = _value_and_grad(lambda lp: _twin(lp, x, loss_agg="seq-mean-token-mean", total_sequences=B)[0],
                           x["logps"])
    _assert_same(ours, _value_and_grad(trl_grpo, x["logps"]))
    default = _twin(x["logps"], x, loss_agg="seq-mean-token-mean")[0]
    torch.testing.assert_close(default, ours[0] * B / (B - 1), rtol=1e-12, atol=0)


def test_verl_agg_loss_defaults_are_ours():
    """verl 0.9 agg_loss (no global batch info): token-mean = masked mean; seq-mean-token-mean and
    seq-mean-token-sum(-norm) divide by the number of rows with a counted token; -norm also by
    loss_mask.shape[-1]. Equal to our defaults, fully masked row included."""
    x = _peer_inputs(seed=12)
    x["mask"][4] = False
    m = x["mask"].double()
    per_token = torch.randn(m.shape, dtype=torch.float64)

    def verl_agg(mode):
        if mode == "token-mean":
            return (per_token * m).sum() / m.sum()
        seq_mask = (m.sum(-1) > 0).double()
        if mode == "seq-mean-token-mean":
            return ((per_token * m).sum(-1) / (m.sum(-1) + 1e-8) * seq_mask).sum() / seq_mask.sum()
        return ((per_token * m).sum(-1) * seq_mask).sum() / seq_mask.sum() / m.shape[-1]

    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        torch.testing.assert_close(ref_ppo.aggregate(per_token, m, mode), verl_agg(mode), rtol=1e-7, atol=0)


def test_high_entropy_selection_equals_trl_mask():
    """TRL GRPOTrainer.get_high_entropy_mask (one process): threshold = torch.quantile(entropies of
    counted tokens, 1 - rho); tokens with entropy >= it keep their policy term (the KL is added
    after the mask)."""
    x = _peer_inputs(seed=13)
    m, adv = x["mask"], x["advantages"]
    for rho in (0.0, 0.2, 0.5, 0.9):
        threshold = torch.quantile(x["entropy"][m], 1 - rho)
        trl_mask = (x["entropy"] * m >= threshold) & m

        def trl(logps):
            coef_1 = torch.exp(logps - x["old_logps"])
            per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv) * trl_mask
            per_token = per_token + 0.1 * (torch.exp(x["ref_logps"] - logps) - (x["ref_logps"] - logps) - 1)
            return (per_token * m).sum() / m.sum()

        ours = _value_and_grad(lambda lp: _twin(lp, x, top_entropy_quantile=rho, entropy=x["entropy"],
                                                ref_logps=x["ref_logps"], kl_coef=0.1)[0], x["logps"])
        _assert_same(ours, _value_and_grad(trl, x["logps"]))
        torch.testing.assert_close(ref_ppo.entropy_threshold(x["entropy"], m, rho), threshold, rtol=1e-12, atol=0)


def test_per_term_aggregation_maps_to_openrlhf():
    """OpenRLHF PPOActor: the policy loss may be per-sequence (GSPO forces token_level_loss=False)
    while the KL and entropy terms always go through aggregate_loss with token_level_loss=True
    (masked mean): kl_agg = entropy_agg = "token-mean"."""
    x = _peer_inputs(seed=14)
    m, adv = x["mask"].double(), x["advantages"]

    def openrlhf(logps, entropy):
        log_ratio = logps - x["old_logps"]
        ratio = torch.exp((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1)).unsqueeze(-1) * m
        loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
        token_counts = m.sum(-1)
        seq_loss = (loss * m).sum(-1) / (token_counts + 1e-8)
        seq_mask = (token_counts > 0).double()
        actor = (seq_loss * seq_mask).sum() / seq_mask.sum()
        kl = (x["ref_logps"] - logps).exp() - 1 + (logps - x["ref_logps"])  # compute_approx_kl k3 (|kl| < 10)
        kl_loss = (kl * m).sum() / m.sum()
        entropy_loss = (entropy * m).sum() / m.sum()
        return actor + 0.05 * kl_loss - 0.01 * entropy_loss

    leaf, ent = x["logps"].clone().requires_grad_(), x["entropy"].clone().requires_grad_()
    peer = openrlhf(leaf, ent)
    peer_grads = torch.autograd.grad(peer, [leaf, ent])
    leaf, ent = x["logps"].clone().requires_grad_(), x["entropy"].clone().requires_grad_()
    ours, _ = _twin(leaf, x, ratio_level="sequence", loss_agg="seq-mean-token-mean", ref_logps=x["ref_logps"],
                    kl_coef=0.05, entropy=ent, entropy_coef=0.01, kl_agg="token-mean", entropy_agg="token-mean")
    ours_grads = torch.autograd.grad(ours, [leaf, ent])
    torch.testing.assert_close(ours, peer, rtol=1e-7, atol=1e-9)  # OpenRLHF's +1e-8 in the token mean
    for a, b in zip(ours_grads, peer_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# ============================================================================ bad input
def _bad_objective_cases():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    base = lambda **kw: dict(dict(logps=x, old_logps=x, advantages=x, mask=m), **kw)  # noqa: E731
    return [
        (base(loss_type="grpo"), r"loss_type must be one of \('ppo', 'cispo', 'sapo'\)"),
        (base(ratio_level="seq"), "ratio_level"),
        (base(is_correction="token_truncate"), "needs rollout_logps"),
        (base(is_correction="bogus", rollout_logps=x), "is_correction must be one of"),
        (base(rollout_logps=x), "rollout_logps"),
        (base(rollout_logps=torch.zeros(2, 4), is_correction="tis"), "rollout_logps"),
        (base(is_correction="tis", rollout_logps=x, is_clip_min=2.0, is_clip_max=1.0), "is_clip_min"),
        (base(is_correction="tis", rollout_logps=x, is_clip_max=0.0), "is_clip_max"),
        (base(top_entropy_quantile=0.5), "needs entropy"),
        (base(top_entropy_quantile=1.5, entropy=x), "top_entropy_quantile"),
        (base(loss_type="cispo", dual_clip=3.0), "dual_clip"),
        (base(loss_type="sapo", sapo_tau_pos=0.0), "sapo_tau_pos"),
        (base(advantages=torch.zeros(3)), "advantages"),
        (base(kl_agg="sum"), "kl_agg"),
        (base(entropy_agg="mean"), "entropy_agg"),
        (base(total_tokens=0), "total_tokens"),
        (base(total_sequences=torch.ones(2)), "total_sequences"),
        (base(norm_length=-1.0), "norm_length"),
        (dict(logps=torch.zeros(6), old_logps=torch.zeros(6), advantages=torch.zeros(6), mask=torch.ones(6),
              ratio_level="sequence"), "one sequence per row"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_objective_bad_input(backend):
    for kwargs, message in _bad_objective_cases():
        with pytest.raises(ValueError, match=message):
            fastrlhf.ppo_loss(**kwargs, backend=backend)


def test_plain_ppo_launches_one_kernel_and_no_extra_work(monkeypatch):
    """The options are constexpr branches: a plain call launches the PPO kernel once with every option
    off (then the finalize, `tests/test_launches.py`), and computes no sequence ratios, IS weights or
    entropy thresholds."""
    from gpu_compile import recorded_launches

    from fastrlhf.twins import ppo as twin

    called = []
    for name in ("sequence_log_ratio", "rollout_log_weight", "entropy_threshold"):
        monkeypatch.setattr(twin, name, lambda *a, _n=name, **k: called.append(_n))
    inputs = objective_inputs()
    with recorded_launches(("fastrlhf.kernels.ppo",)) as launches:
        fastrlhf.ppo_loss(inputs["logps"], inputs["old_logps"], inputs["advantages"], inputs["mask"],
                          backend="triton")
    assert called == []
    ((launch, count),) = launches.items()
    assert launch.kernel == "_ppo_forward_kernel" and count == 1
    constexprs = dict(launch.constexprs)
    assert {k: constexprs[k] for k in ("LOSS_TYPE", "SEQ_RATIO", "ADV_PER_ROW", "IS_MODE", "IS_PER_ROW", "SELECT_ENT",
                                       "HAS_REF", "HAS_ENT", "DUAL")} == dict(
        LOSS_TYPE=0, SEQ_RATIO=False, ADV_PER_ROW=False, IS_MODE=0, IS_PER_ROW=False, SELECT_ENT=False,
        HAS_REF=False, HAS_ENT=False, DUAL=False)


def test_every_twin_export_exists():
    """fastrlhf.twins re-exports every fastrlhf.losses name: each must exist in its twin module."""
    from fastrlhf import twins

    for name in twins.__all__:
        assert callable(getattr(twins, name)), name
