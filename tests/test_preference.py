"""DPO family, Bradley-Terry reward loss, sequence_logps: Triton kernel vs PyTorch reference vs an
independent float64 closed form (plain `math`, gradients by central finite differences).

Tolerances: fp32 Triton vs reference 1e-6 relative / 1e-6 absolute (loss, metrics, grads);
vs the float64 closed form 1e-5; bf16 inputs: loss and metrics vs the reference on the same
(upcast) values 1e-5, gradients (returned in bf16) rtol 1e-2.
"""
import math

import pytest
import torch

from fastrlhf.losses.preference import dpo_loss, reward_loss, sequence_logps
from fastrlhf.twins import preference as ref

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "apo_zero")
REFERENCE_FREE = ("simpo", "orpo")
DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected"}
ORPO_METRICS = DPO_METRICS | {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
REWARD_METRICS = {"accuracy", "margin", "rewards/chosen", "rewards/rejected"}


# ---- independent float64 closed forms ---------------------------------------------------------

def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def orpo_log_odds(logp):
    logp = min(logp, -1e-6)
    return logp - math.log(-math.expm1(logp))


def dpo_row_loss(c, r, rc, rr, beta, loss_type, eps, gamma):
    h = (c - r) if loss_type in REFERENCE_FREE else (c - rc) - (r - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "simpo":
        x = beta * h - gamma
        return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)
    if loss_type == "apo_zero":  # APO-zero, D'Oosterlinck et al. 2024, eq. 7 (TRL's loss_type="apo_zero")
        return 1 - sigmoid(beta * (c - rc)) + sigmoid(beta * (r - rr))
    return -c - beta * log_sigmoid(orpo_log_odds(c) - orpo_log_odds(r))


def closed_form_dpo(inputs, beta, loss_type, eps, gamma):
    """Returns (loss, metrics, grads): float64 from Python floats; grads by central differences."""
    rows = [[float(v) for v in t.detach()] if t is not None else None for t in inputs]
    B = len(rows[0])

    def loss_of(rows):
        c, r, rc, rr = (row if row is not None else [0.0] * B for row in rows)
        return sum(dpo_row_loss(c[i], r[i], rc[i], rr[i], beta, loss_type, eps, gamma) for i in range(B)) / B

    grads = []
    for k, row in enumerate(rows):
        if row is None:
            grads.append(None)
            continue
        g = []
        for i in range(B):
            step = 1e-6 * max(1.0, abs(row[i]))
            plus = [list(x) if x is not None else None for x in rows]
            minus = [list(x) if x is not None else None for x in rows]
            plus[k][i] += step
            minus[k][i] -= step
            g.append((loss_of(plus) - loss_of(minus)) / (2 * step))
        grads.append(g)

    c, r = rows[0], rows[1]
    rc, rr = (rows[2], rows[3]) if rows[2] is not None else ([0.0] * B, [0.0] * B)
    cr = [beta * (c[i] - rc[i]) for i in range(B)]
    rj = [beta * (r[i] - rr[i]) for i in range(B)]
    mean = lambda xs: sum(xs) / B  # noqa: E731
    metrics = {
        "rewards/chosen": mean(cr), "rewards/rejected": mean(rj),
        "rewards/accuracies": mean([float(a > b) for a, b in zip(cr, rj)]),
        "rewards/margins": mean([a - b for a, b in zip(cr, rj)]),
        "logps/chosen": mean(c), "logps/rejected": mean(r),
    }
    if loss_type == "orpo":
        lo = [orpo_log_odds(c[i]) - orpo_log_odds(r[i]) for i in range(B)]
        metrics.update({"nll_loss": -mean(c), "log_odds_ratio": mean([log_sigmoid(x) for x in lo]),
                        "log_odds_chosen": mean(lo)})
    return loss_of(rows), metrics, grads


def make_logps(B, loss_type, dtype=torch.float32, device="cpu", scale=3.0):
    def logps():
        # strictly negative (ORPO's odds need p < 1) and away from the clamp
        return (-(torch.rand(B) * scale + 0.05)).to(device, dtype).requires_grad_()

    refs = (None, None) if loss_type in REFERENCE_FREE else (logps(), logps())
    return (logps(), logps(), *refs)


def loss_kwargs(loss_type):
    return dict(
        beta=0.3 if loss_type != "ipo" else 0.5,
        loss_type=loss_type,
        label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0,
        gamma=0.4 if loss_type == "simpo" else 0.0,
    )


def run(fn, inputs, **kwargs):
    loss, metrics = fn(*inputs, **kwargs)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, present) if present[0].shape[0] else [torch.zeros(0)] * len(present)
    return loss, metrics, grads


def assert_close(actual, expected, tol):
    """Compared in float64 on the CPU: the closed forms are host numbers, the kernels' outputs may be CUDA."""
    torch.testing.assert_close(torch.as_tensor(actual).detach().to("cpu", torch.float64),
                               torch.as_tensor(expected).detach().to("cpu", torch.float64), rtol=tol, atol=tol)


# ---- DPO family ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("B", [1, 37])
def test_dpo_fp32_matches_reference_and_closed_form(loss_type, B, device):
    inputs = make_logps(B, loss_type, device=device)
    kwargs = loss_kwargs(loss_type)
    loss_t, metrics_t, grads_t = run(dpo_loss, inputs, backend="triton", **kwargs)
    loss_r, metrics_r, grads_r = run(ref.dpo_loss, inputs, **kwargs)
    loss_c, metrics_c, grads_c = closed_form_dpo(inputs, kwargs["beta"], loss_type,
                                                 kwargs["label_smoothing"], kwargs["gamma"])
    assert set(metrics_t) == set(metrics_r) == (ORPO_METRICS if loss_type == "orpo" else DPO_METRICS)
    assert loss_t.dtype == torch.float32 and loss_t.shape == ()
    assert_close(loss_t, loss_r, 1e-6)
    assert_close(loss_t, loss_c, 1e-5)
    for name in metrics_t:
        assert not metrics_t[name].requires_grad and metrics_t[name].shape == ()
        assert_close(metrics_t[name], metrics_r[name], 1e-6)
        assert_close(metrics_t[name], metrics_c[name], 1e-5)
    for g_t, g_r, g_c in zip(grads_t, grads_r, [g for g in grads_c if g is not None]):
        assert_close(g_t, g_r, 1e-6)
        assert_close(g_t, g_c, 1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_bf16(loss_type, device):
    inputs = make_logps(37, loss_type, dtype=torch.bfloat16, device=device)
    kwargs = loss_kwargs(loss_type)
    loss_t, metrics_t, grads_t = run(dpo_loss, inputs, backend="triton", **kwargs)
    upcast = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
    loss_r, metrics_r, grads_r = run(ref.dpo_loss, upcast, **kwargs)
    assert loss_t.dtype == torch.float32
    assert_close(loss_t, loss_r, 1e-5)
    for name in metrics_t:
        assert_close(metrics_t[name], metrics_r[name], 1e-5)
    for g_t, g_r in zip(grads_t, grads_r):
        assert g_t.dtype == torch.bfloat16
        torch.testing.assert_close(g_t.float(), g_r, rtol=1e-2, atol=1e-4)


def test_dpo_multi_block_batch(device):
    """B > MAX_BLOCK_B: several programs, their partial means summed."""
    inputs = make_logps(1100, "sigmoid", device=device)
    loss_t, metrics_t, grads_t = run(dpo_loss, inputs, backend="triton", beta=0.1)
    loss_r, metrics_r, grads_r = run(ref.dpo_loss, inputs, beta=0.1)
    assert_close(loss_t, loss_r, 1e-6)
    for name in metrics_t:
        assert_close(metrics_t[name], metrics_r[name], 1e-6)
    for g_t, g_r in zip(grads_t, grads_r):
        assert_close(g_t, g_r, 1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_extreme_logps_are_finite(loss_type, device):
    B = 8
    big = torch.tensor([1e3, -1e3, 1e3, -1e3, 0.0, -1e3, 1e3, -1e-9], device=device)
    inputs = [big, big.flip(0), big.roll(1), -big]
    if loss_type in REFERENCE_FREE:
        inputs[2:] = [None, None]
    inputs = [None if t is None else t.clone().requires_grad_() for t in inputs]
    kwargs = loss_kwargs(loss_type)
    for fn, extra in ((dpo_loss, {"backend": "triton"}), (ref.dpo_loss, {})):
        loss, metrics, grads = run(fn, inputs, **kwargs, **extra)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(m) for m in metrics.values())
        assert all(torch.isfinite(g).all() and g.shape == (B,) for g in grads)
    loss_t, _, grads_t = run(dpo_loss, inputs, backend="triton", **kwargs)
    loss_r, _, grads_r = run(ref.dpo_loss, inputs, **kwargs)
    assert_close(loss_t, loss_r, 1e-5)
    for g_t, g_r in zip(grads_t, grads_r):
        assert_close(g_t, g_r, 1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_nan_input_gives_nan_loss_like_the_reference(loss_type, device):
    """hinge's relu and orpo's clamp used Triton's NaN-dropping max/min: a NaN rejected log-prob
    gave a finite loss on the Triton path only."""
    inputs = list(make_logps(4, loss_type, device=device))
    inputs[1] = inputs[1].detach().clone()
    inputs[1][2] = float("nan")
    for fn, extra in ((dpo_loss, {"backend": "triton"}), (ref.dpo_loss, {})):
        loss, _ = fn(*inputs, **loss_kwargs(loss_type), **extra)
        assert loss.isnan(), fn


def test_dpo_confident_pairs_keep_relative_precision(device):
    """-log sigmoid(x) ~ exp(-x) for large x: a naive log(1 + exp(-x)) would round it to 0."""
    h = torch.tensor([100.0, 200.0, 300.0], device=device)  # beta h = 10, 20, 30
    zeros = torch.zeros(3, device=device)
    loss, _ = dpo_loss(h, zeros, zeros, zeros, beta=0.1, backend="triton")
    expected = sum(-log_sigmoid(0.1 * float(v)) for v in h) / 3
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    loss, _ = reward_loss(h / 10, zeros, backend="triton")
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_empty_batch(loss_type, device):
    inputs = make_logps(0, loss_type, device=device)
    for fn, extra in ((dpo_loss, {"backend": "triton"}), (ref.dpo_loss, {})):
        loss, metrics = fn(*inputs, **loss_kwargs(loss_type), **extra)
        assert loss.item() == 0.0 and all(m.item() == 0.0 for m in metrics.values())
        loss.backward()
        assert all(t.grad is not None and t.grad.shape == (0,) for t in inputs if t is not None)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_reference_gradcheck(loss_type):
    inputs = [None if t is None else t.detach().double().requires_grad_()
              for t in make_logps(5, loss_type)]
    kwargs = loss_kwargs(loss_type)
    if loss_type == "hinge":
        kwargs["beta"] = 0.05  # keep every row away from the kink at beta * h = 1
    present = [t for t in inputs if t is not None]

    def loss_of(*present):
        it = iter(present)
        full = [None if t is None else next(it) for t in inputs]
        return ref.dpo_loss(*full, **kwargs)[0]

    assert torch.autograd.gradcheck(loss_of, present)


def test_dpo_defaults_ties_and_backend_dispatch(device):
    c, r, rc, rr = (torch.tensor(v, device=device) for v in
                    ([-1.0, -2.0, -2.0, -4.0], [-3.0, -1.0, -2.0, -5.0], [-2.0] * 4, [-2.0] * 4))
    loss, metrics = dpo_loss(c, r, rc, rr)  # sigmoid, beta=0.1
    h = torch.tensor([2.0, -1.0, 0.0, 1.0])
    assert_close(loss, -torch.nn.functional.logsigmoid(0.1 * h).mean(), 1e-6)
    assert_close(metrics["rewards/accuracies"], 0.5, 0)  # a tie (row 2) is not a win, as in TRL
    loss_torch, _ = dpo_loss(c, r, rc, rr, backend="torch")
    assert_close(loss, loss_torch, 1e-6)


def test_dpo_bad_input():
    c, r = torch.randn(4) - 2, torch.randn(4) - 2
    cases = [
        (dict(loss_type="kto"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(gamma=0.5), "gamma"),
    ]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            dpo_loss(c, r, c, r, **kwargs)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(c, r, None, None)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(c, r, c, r, loss_type="simpo")
    with pytest.raises(ValueError, match="rejected_logps"):
        dpo_loss(c, torch.randn(5), c, r)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(c, r, c, torch.randn(3))
    with pytest.raises(ValueError, match="chosen_logps"):
        dpo_loss(torch.ones(4, dtype=torch.long), r, c, r)
    with pytest.raises(ValueError, match="chosen_logps"):
        dpo_loss(c.reshape(2, 2), r.reshape(2, 2), c.reshape(2, 2), r.reshape(2, 2))


# ---- Bradley-Terry reward loss ------------------------------------------------------------------

def closed_form_reward(chosen, rejected, margin, center_coef):
    c, r = [float(v) for v in chosen.detach()], [float(v) for v in rejected.detach()]
    B = len(c)
    m = [float(v) for v in margin] if isinstance(margin, torch.Tensor) else [margin or 0.0] * B
    loss = sum(-log_sigmoid(c[i] - r[i] - m[i]) + center_coef * (c[i] + r[i]) ** 2 for i in range(B)) / B
    sig = [1 / (1 + math.exp(c[i] - r[i] - m[i])) for i in range(B)]  # sigmoid(-x)
    grad_c = [(-sig[i] + 2 * center_coef * (c[i] + r[i])) / B for i in range(B)]
    grad_r = [(sig[i] + 2 * center_coef * (c[i] + r[i])) / B for i in range(B)]
    metrics = {"accuracy": sum(float(a > b) for a, b in zip(c, r)) / B,
               "margin": sum(a - b for a, b in zip(c, r)) / B,
               "rewards/chosen": sum(c) / B, "rewards/rejected": sum(r) / B}
    return loss, metrics, (grad_c, grad_r)


@pytest.mark.parametrize("margin_kind", [None, "float", "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("B", [1, 37])
def test_reward_loss_matches_reference_and_closed_form(margin_kind, center_coef, B, device):
    chosen = (torch.randn(B, device=device) * 2).requires_grad_()
    rejected = (torch.randn(B, device=device) * 2).requires_grad_()
    margin = {None: None, "float": 0.5, "tensor": torch.rand(B, device=device)}[margin_kind]
    kwargs = dict(margin=margin, center_coef=center_coef)
    loss_t, metrics_t, grads_t = run(reward_loss, (chosen, rejected), backend="triton", **kwargs)
    loss_r, metrics_r, grads_r = run(ref.reward_loss, (chosen, rejected), **kwargs)
    loss_c, metrics_c, grads_c = closed_form_reward(chosen, rejected, margin, center_coef)
    assert set(metrics_t) == set(metrics_r) == REWARD_METRICS
    assert_close(loss_t, loss_r, 1e-6)
    assert_close(loss_t, loss_c, 1e-5)
    for name in metrics_t:
        assert not metrics_t[name].requires_grad
        assert_close(metrics_t[name], metrics_r[name], 1e-6)
        assert_close(metrics_t[name], metrics_c[name], 1e-5)
    for g_t, g_r, g_c in zip(grads_t, grads_r, grads_c):
        assert_close(g_t, g_r, 1e-6)
        assert_close(g_t, g_c, 1e-5)


def test_reward_loss_bf16_extreme_empty(device):
    chosen = (torch.randn(37, device=device) * 3).bfloat16().requires_grad_()
    rejected = (torch.randn(37, device=device) * 3).bfloat16().requires_grad_()
    loss_t, metrics_t, grads_t = run(reward_loss, (chosen, rejected), backend="triton", center_coef=0.01)
    upcast = [t.detach().float().requires_grad_() for t in (chosen, rejected)]
    loss_r, _, grads_r = run(ref.reward_loss, upcast, center_coef=0.01)
    assert_close(loss_t, loss_r, 1e-5)
    for g_t, g_r in zip(grads_t, grads_r):
        assert g_t.dtype == torch.bfloat16
        torch.testing.assert_close(g_t.float(), g_r, rtol=1e-2, atol=1e-4)

    big = torch.tensor([1e3, -1e3, 0.0], device=device)
    for fn, extra in ((reward_loss, {"backend": "triton"}), (ref.reward_loss, {})):
        loss, metrics, grads = run(fn, (big.clone().requires_grad_(), big.flip(0).requires_grad_()), **extra)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        empty = torch.zeros(0, device=device, requires_grad=True)
        loss, metrics = fn(empty, empty, center_coef=0.1, **extra)
        assert loss.item() == 0.0 and all(m.item() == 0.0 for m in metrics.values())


def test_reward_loss_gradcheck_and_bad_input():
    chosen = torch.randn(5, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c, r: ref.reward_loss(c, r, margin=margin, center_coef=0.1)[0], (chosen, rejected)
    )
    c = torch.randn(4)
    with pytest.raises(ValueError, match="chosen_rewards"):
        reward_loss(torch.ones(4, dtype=torch.long), c)
    with pytest.raises(ValueError, match="rejected_rewards"):
        reward_loss(c, torch.randn(3))
    with pytest.raises(ValueError, match="margin"):
        reward_loss(c, c, margin=torch.randn(3))
    with pytest.raises(ValueError, match="center_coef"):
        reward_loss(c, c, center_coef=-0.1)


# ---- sequence_logps -----------------------------------------------------------------------------

def test_sequence_logps(device):
    logps = -torch.rand(4, 7, device=device) * 5
    mask = torch.rand(4, 7, device=device) > 0.3
    mask[2] = False  # empty row
    padded = logps.masked_fill(~mask, float("-inf"))  # padding junk must be ignored
    padded.requires_grad_()
    total = sequence_logps(padded, mask)
    mean = sequence_logps(padded, mask.long(), average=True)
    for b in range(4):
        picked = [float(v) for v, keep in zip(logps[b], mask[b]) if keep]
        assert_close(total[b], sum(picked), 1e-6)
        assert_close(mean[b], sum(picked) / len(picked) if picked else 0.0, 1e-6)
    (total.sum() + mean.sum()).backward()
    counts = mask.sum(-1, keepdim=True).clamp(min=1)
    assert_close(padded.grad, mask * (1 + 1 / counts), 1e-6)

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 5) > 0.4
    assert torch.autograd.gradcheck(lambda t: sequence_logps(t, m, average=True), (x,))
    with pytest.raises(ValueError, match="mask"):
        sequence_logps(x, torch.ones(3, 4))
    with pytest.raises(ValueError, match="logps"):
        sequence_logps(x[0], m[0])
    # backend= is accepted everywhere (issue 11): the same masked reduction on both
    for backend in ("torch", "triton"):
        torch.testing.assert_close(sequence_logps(padded, mask, backend=backend), total)
    with pytest.raises(ValueError, match="backend"):
        sequence_logps(x, m, backend="cuda")


# ---- the contract's loss types are the ones this file tests, and each has its own kernel variant ----

def test_contract_loss_types_are_tested_and_compiled_each():
    from fastrlhf import contracts
    from fastrlhf.kernels import preference as kernels

    assert contracts.DPO_LOSS_TYPES == LOSS_TYPES  # a type added to the contract must be added here too
    assert set(REFERENCE_FREE) == set(contracts.REFERENCE_FREE_LOSS_TYPES)
    assert set(contracts.ORPO_STATS) <= set(contracts.DPO_STATS)
    kernel_ids = [kernels._SIGMOID, kernels._ROBUST, kernels._HINGE, kernels._IPO, kernels._SIMPO, kernels._ORPO,
                  kernels._APO_ZERO]
    assert sorted(int(getattr(i, "value", i)) for i in kernel_ids) == list(range(len(contracts.DPO_LOSS_TYPES)))
