"""GAE (Triton scan vs PyTorch loop vs float64 closed form), whiten, group_advantages.

Tolerances: fp32 inputs 1e-5 absolute (the scan re-associates a length-T recurrence, so its
rounding differs from the sequential loop by a few ulps times T-dependent growth); bf16 inputs
are compared against the closed form on the SAME bf16-rounded values with 1e-4, which only holds
if accumulation is fp32.
"""
import math
import statistics

import numpy as np
import pytest
import torch

from fastrlhf.kernels.gae import gae_forward
from fastrlhf.losses.advantages import gae, group_advantages, whiten
from fastrlhf.twins import advantages as ref


# ---- independent float64 closed forms (plain Python / numpy, no torch ops) --------------------

def gae_closed_form(rewards, values, mask, gamma, lam):
    r, v, m = (np.asarray(t.double().cpu(), dtype=np.float64) for t in (rewards, values, mask))
    B, T = r.shape
    adv = np.zeros((B, T))
    for b in range(B):
        next_adv = next_value = next_mask = 0.0
        for t in range(T - 1, -1, -1):
            delta = r[b, t] + gamma * next_value * next_mask - v[b, t]
            next_adv = delta + gamma * lam * next_mask * next_adv
            adv[b, t] = next_adv * m[b, t]
            next_value, next_mask = v[b, t], m[b, t]
    return adv, (adv + v) * m


def gae_skip_closed_form(rewards, values, mask, gamma, lam):
    """verl's `compute_gae_advantage_return` (core_algos.py) as a float64 loop, without its final
    whitening: a masked token (a tool observation inside a multi-turn response) is skipped, the value
    and the advantage of the next counted token carry across it."""
    r, v, m = (np.asarray(t.double().cpu(), dtype=np.float64) for t in (rewards, values, mask))
    B, T = r.shape
    adv = np.zeros((B, T))
    for b in range(B):
        next_value = last_adv = 0.0
        for t in range(T - 1, -1, -1):
            if m[b, t] != 0:
                delta = r[b, t] + gamma * next_value - v[b, t]
                last_adv = delta + gamma * lam * last_adv
                next_value = v[b, t]
                adv[b, t] = last_adv
    return adv, (adv + v) * (m != 0)


def whiten_closed_form(x, mask, shift_mean, eps):
    xs = np.asarray(x.double().cpu(), dtype=np.float64)
    ms = np.asarray(mask.cpu(), dtype=bool)
    out = np.zeros_like(xs)
    picked = xs[ms]
    if picked.size == 0:
        return out
    mean = picked.mean()
    var = picked.var(ddof=1) if picked.size > 1 else 0.0  # unbiased, as TRL's masked_var
    out[ms] = (picked - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def make_mask(B, T, kind, generator=None):
    if kind == "ones":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "zeros":
        return torch.zeros(B, T, dtype=torch.bool)
    mask = torch.rand(B, T, generator=generator) > 0.25  # holes
    if kind == "right_pad":  # typical response mask: a prefix of each row, one row empty
        lengths = torch.randint(T // 2, T + 1, (B,), generator=generator)
        if B > 1:
            lengths[0] = 0
        mask = torch.arange(T)[None, :] < lengths[:, None]
    elif B > 1:
        mask[1] = False  # a fully masked row
    return mask


def assert_close_np(actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual.double().cpu()), expected, atol=atol, rtol=0)


# ---- GAE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "B,T,mask_kind",
    [(3, 1, "holes"), (3, 1, "ones"), (4, 37, "holes"), (4, 37, "right_pad"), (4, 37, "ones"),
     (1, 4100, "right_pad"), (1, 4100, "ones")],  # T=4100: 5 blocks of 1024, 4 carries
)
@pytest.mark.parametrize("skip_masked", [True, False])
def test_gae_matches_reference_and_closed_form(B, T, mask_kind, skip_masked, device):
    rewards = torch.randn(B, T)
    values = torch.randn(B, T)
    mask = make_mask(B, T, mask_kind)
    closed = gae_skip_closed_form if skip_masked else gae_closed_form
    expected_adv, expected_ret = closed(rewards, values, mask, 0.99, 0.95)
    args = (rewards.to(device), values.to(device), mask.to(device))
    adv_t, ret_t = gae(*args, gamma=0.99, lam=0.95, skip_masked=skip_masked, backend="triton")
    adv_r, ret_r = ref.gae(*args, gamma=0.99, lam=0.95, skip_masked=skip_masked)
    atol = 1e-5 if T < 1000 else 5e-5  # |A| grows like sum of (gamma lam)^k ~ 16 here
    for actual in (adv_t, adv_r):
        assert actual.dtype == torch.float32 and actual.shape == (B, T)
        assert_close_np(actual, expected_adv, atol)
    assert_close_np(ret_t, expected_ret, atol)
    assert_close_np(ret_r, expected_ret, atol)


@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.9, 0.5)])
def test_gae_gamma_lambda_edges(gamma, lam, device):
    rewards, values = torch.randn(3, 37), torch.randn(3, 37)
    mask = make_mask(3, 37, "holes")
    expected_adv, expected_ret = gae_closed_form(rewards, values, mask, gamma, lam)
    for backend in ("triton", "torch"):
        adv, ret = gae(rewards.to(device), values.to(device), mask.to(device), gamma=gamma, lam=lam,
                       skip_masked=False, backend=backend)
        assert_close_np(adv, expected_adv, 1e-5)
        assert_close_np(ret, expected_ret, 1e-5)
        if gamma == 0.0:  # A_t = r_t - V_t exactly
            assert_close_np(adv, ((rewards - values) * mask).double().numpy(), 1e-6)


@pytest.mark.parametrize("block_t", [1, 4, 8, 64])
def test_gae_block_carry(block_t, device):
    """Small blocks force many carries between blocks, including a partial first block."""
    rewards, values = torch.randn(2, 37), torch.randn(2, 37)
    mask = make_mask(2, 37, "holes")
    for skip_masked, closed in ((False, gae_closed_form), (True, gae_skip_closed_form)):
        expected_adv, expected_ret = closed(rewards, values, mask, 1.0, 0.95)
        adv, ret = gae_forward(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=0.95,
                               skip_masked=skip_masked, block_t=block_t)
        assert_close_np(adv, expected_adv, 1e-5)
        assert_close_np(ret, expected_ret, 1e-5)


def test_gae_all_zero_mask_and_empty(device):
    rewards, values = torch.randn(2, 37, device=device), torch.randn(2, 37, device=device)
    mask = torch.zeros(2, 37, device=device)
    for backend in ("triton", "torch"):
        adv, ret = gae(rewards, values, mask, backend=backend)
        assert torch.equal(adv, torch.zeros_like(adv)) and torch.equal(ret, torch.zeros_like(ret))
        for shape in [(0, 5), (3, 0)]:
            empty = torch.zeros(shape, device=device)
            adv, ret = gae(empty, empty, empty, backend=backend)
            assert adv.shape == shape and ret.shape == shape


def test_gae_bf16_accumulates_in_fp32(device):
    rewards = torch.randn(3, 300).bfloat16()
    values = torch.randn(3, 300).bfloat16()
    mask = make_mask(3, 300, "right_pad")
    expected_adv, expected_ret = gae_closed_form(rewards, values, mask, 1.0, 0.95)
    for backend in ("triton", "torch"):
        adv, ret = gae(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=0.95, backend=backend)
        assert adv.dtype == torch.float32
        assert_close_np(adv, expected_adv, 1e-4)
        assert_close_np(ret, expected_ret, 1e-4)


@pytest.mark.parametrize("skip_masked", [True, False])
@pytest.mark.parametrize("mask_kind", ["ones", "right_pad", "holes"])
def test_gae_torch_scan_float64_and_long_undiscounted(mask_kind, skip_masked):
    """The torch path is a log-depth scan (re-associated sums): float64 inputs must stay float64
    and agree with the sequential closed form to ~1e-12; fp32 at T=4096 with gamma = lam = 1
    (nothing decays, |A| ~ sqrt(T)) must stay within 1e-5 of max|A|."""
    rewards, values = torch.randn(2, 4096), torch.randn(2, 4096)
    mask = make_mask(2, 4096, mask_kind)
    closed = gae_skip_closed_form if skip_masked else gae_closed_form
    expected_adv, expected_ret = closed(rewards, values, mask, 1.0, 1.0)
    adv64, ret64 = ref.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=1.0, skip_masked=skip_masked)
    assert adv64.dtype == ret64.dtype == torch.float64
    assert_close_np(adv64, expected_adv, 1e-12)
    assert_close_np(ret64, expected_ret, 1e-12)
    adv, ret = ref.gae(rewards, values, mask, gamma=1.0, lam=1.0, skip_masked=skip_masked)
    scale = np.abs(expected_adv).max()
    assert_close_np(adv, expected_adv, 1e-5 * scale)
    assert_close_np(ret, expected_ret, 1e-5 * scale)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16])
def test_gae_mask_dtypes_and_padding_independence(mask_dtype, device):
    rewards, values = torch.randn(3, 20), torch.randn(3, 20)
    mask = make_mask(3, 20, "right_pad")
    base_adv, base_ret = gae(rewards.to(device), values.to(device), mask.to(device, mask_dtype), backend="triton")
    # More right padding (with junk rewards/values under a zero mask) must not change anything.
    pad = 13
    rewards_p = torch.cat([rewards, torch.randn(3, pad)], 1)
    values_p = torch.cat([values, torch.randn(3, pad)], 1)
    mask_p = torch.cat([mask, torch.zeros(3, pad, dtype=torch.bool)], 1)
    adv, ret = gae(rewards_p.to(device), values_p.to(device), mask_p.to(device, mask_dtype), backend="triton")
    # Not bitwise: on a GPU the longer row may get a larger scan block (another summation order).
    torch.testing.assert_close(adv[:, :20], base_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret[:, :20], base_ret, rtol=1e-5, atol=1e-5)
    assert not adv[:, 20:].any()


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("mask_kind", ["right_pad", "holes"])
def test_gae_non_finite_padding_never_reaches_results(junk, mask_kind, device):
    """NaN/inf rewards and values where mask == 0 (padding, tool-output holes) change nothing:
    both backends give the advantages and returns of the same batch with zeros there."""
    g = torch.Generator().manual_seed(5)
    rewards, values = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    mask = make_mask(4, 24, mask_kind, generator=g)
    junk_rewards = rewards.masked_fill(~mask, junk)
    junk_values = values.masked_fill(~mask, junk)
    for skip_masked, closed in ((False, gae_closed_form), (True, gae_skip_closed_form)):
        clean_adv, clean_ret = closed(rewards * mask, values * mask, mask, 0.99, 0.95)
        for backend in ("triton", "torch"):
            adv, ret = gae(junk_rewards.to(device), junk_values.to(device), mask.to(device), gamma=0.99, lam=0.95,
                           skip_masked=skip_masked, backend=backend)
            assert torch.isfinite(adv).all() and torch.isfinite(ret).all(), backend
            np.testing.assert_allclose(adv.double().cpu().numpy(), clean_adv, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(ret.double().cpu().numpy(), clean_ret, rtol=1e-5, atol=1e-5)


def test_gae_tool_holes_follow_verl_and_whiten_equals_verls_output(device):
    """Issue 11, case 2: a multi-turn response [turn 1][tool observation][turn 2] with the reward at
    the end. verl carries value and advantage across the hole (skip_masked=True, the default); the
    hole-as-terminal recurrence (skip_masked=False, the old behaviour) cuts turn 1 off from the
    reward. whiten=True equals verl's output (advantages masked_whiten-ed, returns from the raw ones)."""
    g = torch.Generator().manual_seed(11)
    B, T = 3, 40
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 12:20] = False  # tool observation
    mask[1, 33:] = False  # right padding
    mask[2, 5:7] = False  # a second, short hole
    rewards = torch.randn(B, T, generator=g) * 0.1
    rewards[:, -1] += 1.0
    values = torch.randn(B, T, generator=g)
    exp_adv, exp_ret = gae_skip_closed_form(rewards, values, mask, 1.0, 0.95)
    terminal_adv, _ = gae_closed_form(rewards, values, mask, 1.0, 0.95)
    assert np.abs(exp_adv - terminal_adv)[:, :12].max() > 0.1  # the two conventions really differ
    exp_white = whiten_closed_form(torch.from_numpy(exp_adv), mask, True, 1e-8)
    for backend in ("triton", "torch"):
        args = (rewards.to(device), values.to(device), mask.to(device))
        adv, ret = gae(*args, gamma=1.0, lam=0.95, backend=backend)  # default: skip_masked=True
        assert_close_np(adv, exp_adv, 1e-5)
        assert_close_np(ret, exp_ret, 1e-5)
        adv_w, ret_w = gae(*args, gamma=1.0, lam=0.95, whiten=True, backend=backend)
        assert_close_np(adv_w, exp_white, 1e-5)
        assert_close_np(ret_w, exp_ret, 1e-5)
        adv_t, _ = gae(*args, gamma=1.0, lam=0.95, skip_masked=False, backend=backend)
        assert_close_np(adv_t, terminal_adv, 1e-5)


def test_gae_outputs_are_detached(device):
    rewards = torch.randn(2, 9, device=device, requires_grad=True)
    values = torch.randn(2, 9, device=device, requires_grad=True)
    mask = torch.ones(2, 9, device=device)
    for backend in ("triton", "torch"):
        adv, ret = gae(rewards, values, mask, backend=backend)
        assert not adv.requires_grad and not ret.requires_grad


def test_gae_bad_input():
    r, v, m = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    with pytest.raises(ValueError, match="rewards"):
        gae(r.long(), v, m)
    with pytest.raises(ValueError, match="values"):
        gae(r, torch.randn(2, 6), m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, torch.ones(2, 4))
    with pytest.raises(ValueError, match="rewards"):
        gae(r[0], v[0], m[0])
    with pytest.raises(ValueError, match="gamma"):
        gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, v, m, lam=-0.1)
    with pytest.raises(ValueError, match="backend"):
        gae(r, v, m, backend="cuda")
    with pytest.raises(ValueError, match="skip_masked"):
        gae(r, v, m, skip_masked="yes")
    with pytest.raises(ValueError, match="whiten"):
        gae(r, v, m, whiten=1)



# ---- whiten -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape,mask_kind", [((4, 37), "holes"), ((3, 1), "ones"), ((2, 3, 5), "holes")])
def test_whiten_matches_closed_form(shape, mask_kind, shift_mean, device):
    x = torch.randn(shape) * 3 + 1
    mask = make_mask(shape[0], math.prod(shape[1:]), mask_kind).reshape(shape)
    expected = whiten_closed_form(x, mask, shift_mean, 1e-8)
    for backend in ("triton", "torch"):
        out = whiten(x.to(device), mask.to(device), shift_mean=shift_mean, backend=backend)
        assert out.dtype == torch.float32 and out.shape == shape
        assert_close_np(out, expected, 1e-5)


def test_whiten_degenerate_masks(device):
    x = torch.randn(3, 7, device=device)
    zeros = whiten(x, torch.zeros(3, 7, device=device))
    assert torch.equal(zeros, torch.zeros_like(zeros))
    one = torch.zeros(3, 7, dtype=torch.bool, device=device)
    one[1, 4] = True
    assert torch.equal(whiten(x, one), torch.zeros_like(x))  # var = 0, x - mean = 0: no NaN
    kept_mean = whiten(x, one, shift_mean=False)
    assert kept_mean[1, 4] == x[1, 4] and kept_mean.count_nonzero() == 1
    # NaN / inf outside the mask do not leak in
    dirty = x.clone()
    dirty[0, 0], dirty[2, 6] = float("nan"), float("inf")
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[0, 0] = mask[2, 6] = False
    out = whiten(dirty, mask)
    assert torch.isfinite(out).all()
    assert_close_np(out, whiten_closed_form(x, mask, True, 1e-8), 1e-5)


def test_whiten_gradcheck_and_bad_input():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = make_mask(3, 5, "holes")
    assert torch.autograd.gradcheck(lambda t: ref.whiten(t, mask, shift_mean=False), (x,))
    with pytest.raises(ValueError, match="mask"):
        whiten(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match="x"):
        whiten(torch.ones(3, 5, dtype=torch.long), mask)
    with pytest.raises(ValueError, match="eps"):
        whiten(x, mask, eps=-1.0)


# ---- group advantages ---------------------------------------------------------------------------

def group_closed_form(scores, group_size, scale, std, eps=1e-6):
    """(s - group mean) / (group std + eps) per group of consecutive scores, in Python floats.
    std "sample": statistics.stdev (n - 1, TRL / verl / OpenRLHF); "population": pstdev (n).
    A one-sample group gives 0 (the sample is its own mean) under either std."""
    expected = []
    for g in range(len(scores) // group_size):
        group = [float(s) for s in scores[g * group_size:(g + 1) * group_size]]
        mean = statistics.fmean(group)
        if len(group) == 1:
            spread = 0.0
        else:
            spread = statistics.stdev(group) if std == "sample" else statistics.pstdev(group)
        expected += [(s - mean) / (spread + eps) if scale else s - mean for s in group]
    return np.array(expected)


@pytest.mark.parametrize("std", ["sample", "population"])
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("B,group_size", [(12, 4), (7, 7), (5, 1), (32, 2), (32, 16)])
def test_group_advantages_closed_form(B, group_size, scale, std, device):
    scores = torch.randn(B) * 2
    expected = group_closed_form(scores, group_size, scale, std)
    for backend in ("triton", "torch"):
        out = group_advantages(scores.to(device), group_size, scale=scale, std=std, backend=backend)
        assert out.shape == (B,) and out.dtype == torch.float32
        assert_close_np(out, expected, 1e-5)


@pytest.mark.parametrize("group_size", [2, 4, 16])
def test_group_advantages_default_is_the_peers_sample_std(group_size, device):
    """Issue 11, case 4: TRL (`std_rewards = rewards.view(-1, G).std(dim=1)`), verl
    (`torch.std(scores_tensor)`) and OpenRLHF (`rewards.std(-1)`) all divide by the SAMPLE (n - 1)
    std; the population std (the old default) made advantages sqrt(G / (G - 1)) larger (1.41x at G = 2)."""
    scores = torch.randn(8 * group_size)
    default = group_advantages(scores.to(device), group_size)
    peers = (scores.view(-1, group_size) - scores.view(-1, group_size).mean(1, keepdim=True)) / (
        scores.view(-1, group_size).std(1, keepdim=True) + 1e-6)
    assert_close_np(default, peers.reshape(-1).double().numpy(), 1e-5)
    population = group_advantages(scores.to(device), group_size, std="population")
    ratio = (default / population)[population.abs() > 1e-3]
    np.testing.assert_allclose(ratio.cpu().numpy(), math.sqrt((group_size - 1) / group_size), rtol=1e-4)


def test_group_advantages_constant_group_and_empty(device):
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 4.0], device=device)
    out = group_advantages(scores, 3)
    assert torch.equal(out[:3], torch.zeros(3, device=device))
    assert torch.isfinite(out).all()
    assert group_advantages(torch.zeros(0, device=device), 4).shape == (0,)


def test_group_advantages_bad_input():
    scores = torch.randn(10)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(scores, 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(scores, 0)
    with pytest.raises(ValueError, match="scores"):
        group_advantages(scores.reshape(2, 5), 5)
    with pytest.raises(ValueError, match="scores"):
        group_advantages(torch.arange(10), 5)
    with pytest.raises(ValueError, match="std"):
        group_advantages(scores, 5, std="unbiased")


# ---- the advantage-estimator registry ----------------------------------------------------------

def _verl_outcome_inputs(B=12, T=9, seed=21):
    """Token rewards (an outcome score at each row's last response token, small process rewards
    elsewhere), 0 outside the mask; ragged right-padded masks, one hole."""
    g = torch.Generator().manual_seed(seed)
    mask = make_mask(B, T, "right_pad", generator=g)
    mask[0, :3] = True
    mask[5, 2] = False  # a hole
    rewards = torch.randn(B, T, generator=g) * 0.1 * mask
    lengths = mask.sum(1)
    for b in range(B):
        if lengths[b] > 0:
            last = int(mask[b].nonzero().max())
            rewards[b, last] += float(torch.randn((), generator=g))
    values = torch.randn(B, T, generator=g)
    return rewards, mask, values


def _groups(scores, size):
    return [list(range(start, start + size)) for start in range(0, len(scores), size)]


def verl_outcome_closed_form(name, rewards, mask, group_size, gamma=1.0, eps=1e-6):
    """verl core_algos.py outcome estimators as Python loops (float64): grpo (torch.std = n - 1),
    dr_grpo (norm_adv_by_std_in_grpo=False), rloo, reinforce_plus_plus (running return reset after
    a masked token, masked_whiten), reinforce_plus_plus_baseline; groups of >= 2 samples."""
    r = rewards.double().numpy()
    m = mask.double().numpy()
    B, T = r.shape
    scores = r.sum(-1)  # verl: token_level_rewards.sum(dim=-1)
    if name == "reinforce_plus_plus":
        returns = np.zeros((B, T))
        for b in range(B):
            running = 0.0
            for t in range(T - 1, -1, -1):
                running = r[b, t] + gamma * running
                returns[b, t] = running
                running = running * m[b, t]
        return whiten_closed_form(torch.from_numpy(returns), mask, True, 1e-8) * m, returns * m
    per_row = np.zeros(B)
    for group in _groups(scores, group_size):
        s = [scores[i] for i in group]
        mean, n = statistics.fmean(s), len(s)
        for i in group:
            if name == "grpo":
                per_row[i] = (scores[i] - mean) / (statistics.stdev(s) + eps)
            elif name in ("dr_grpo", "reinforce_plus_plus_baseline"):
                per_row[i] = scores[i] - mean
            elif name == "rloo":
                per_row[i] = scores[i] * n / (n - 1) - mean * n / (n - 1)
    advantages = per_row[:, None] * m
    if name == "reinforce_plus_plus_baseline":
        advantages = whiten_closed_form(torch.from_numpy(advantages), mask, True, 1e-8) * m
    return advantages, advantages


@pytest.mark.parametrize("group_size", [2, 4, 6])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_outcome_estimators_equal_verl(name, group_size, device):
    import fastrlhf

    rewards, mask, _ = _verl_outcome_inputs()
    expected_adv, expected_ret = verl_outcome_closed_form(name, rewards, mask, group_size, gamma=0.99)
    for backend in ("triton", "torch"):
        adv, ret = fastrlhf.compute_advantages(name, rewards.to(device), mask.to(device), group_size=group_size,
                                               gamma=0.99, backend=backend)
        assert adv.shape == ret.shape == rewards.shape and not adv.requires_grad
        assert_close_np(adv, expected_adv, 1e-5)
        assert_close_np(ret, expected_ret, 1e-5)


def test_gae_estimator_equals_verl_and_aliases(device):
    import fastrlhf

    rewards, mask, values = _verl_outcome_inputs(seed=22)
    raw, expected_ret = gae_skip_closed_form(rewards, values, mask, 0.99, 0.9)
    expected_adv = whiten_closed_form(torch.from_numpy(raw), mask, True, 1e-8)
    for backend in ("triton", "torch"):
        adv, ret = fastrlhf.compute_advantages("gae", rewards.to(device), values=values.to(device),
                                               mask=mask.to(device), gamma=0.99, lam=0.9, backend=backend)
        assert_close_np(adv, expected_adv, 1e-5)
        assert_close_np(ret, expected_ret, 1e-5)
    for alias, name in (("group_norm", "grpo"), ("dr-grpo", "dr_grpo"), ("reinforce++", "reinforce_plus_plus"),
                        ("reinforce_baseline", "reinforce_plus_plus_baseline")):
        a = fastrlhf.compute_advantages(alias, rewards, mask, group_size=4)[0]
        b = fastrlhf.compute_advantages(name, rewards, mask, group_size=4)[0]
        assert torch.equal(a, b)


def test_estimator_registry_is_the_contract_and_one_sample_groups_give_zero():
    import fastrlhf
    from fastrlhf.contracts import ADVANTAGE_ESTIMATORS
    from fastrlhf.estimators import ADVANTAGE_ESTIMATOR_FNS

    assert tuple(ADVANTAGE_ESTIMATOR_FNS) == ADVANTAGE_ESTIMATORS
    rewards, mask, _ = _verl_outcome_inputs()
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"):
        adv, _ = fastrlhf.compute_advantages(name, rewards, mask, group_size=1)
        assert torch.equal(adv, torch.zeros_like(adv)), name


def test_estimator_bad_input():
    import fastrlhf

    rewards, mask, values = _verl_outcome_inputs()
    with pytest.raises(ValueError, match=r"advantage estimator must be one of \(.*'rloo'.*\), got 'ppo'"):
        fastrlhf.compute_advantages("ppo", rewards, mask)
    with pytest.raises(ValueError, match="needs values"):
        fastrlhf.compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="group_size"):
        fastrlhf.compute_advantages("grpo", rewards, mask, group_size=5)
    with pytest.raises(ValueError, match="values"):
        fastrlhf.compute_advantages("gae", rewards, mask, values=values[:, :3])
    with pytest.raises(ValueError, match="rewards"):
        fastrlhf.compute_advantages("grpo", rewards[0], mask[0])
