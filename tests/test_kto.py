"""KTO loss (`kto_loss`) and its reference point (`kto_kl`): Triton kernel vs the PyTorch twin vs an
independent float64 closed form (plain `math`, gradients by central finite differences), and next
to TRL's formula transcribed from trl/trainer/kto_trainer.py.

Tolerances as tests/test_preference.py: fp32 Triton vs twin 1e-6, vs the float64 closed form 1e-5;
bf16 inputs: loss and metrics vs the twin on the same (upcast) values 1e-5, gradients (returned in
bf16) rtol 1e-2.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastrlhf.losses.preference import kto_kl, kto_loss
from fastrlhf.twins import preference as twin

KTO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
               "count/chosen", "count/rejected"}
LOSS_TYPES = ("kto", "apo_zero_unpaired")


# ---- independent float64 closed form -------------------------------------------------------------

def sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def kto_row_loss(logp, ref, desirable, z0, beta, w_d, w_u):
    """Ethayarajh et al. 2024, eq. 7: lambda_y - v(x, y), with v = lambda_D s(beta (r - z0)) for a
    desirable y and lambda_U s(beta (z0 - r)) for an undesirable one."""
    r = logp - ref
    if desirable:
        return w_d - w_d * sigmoid(beta * (r - z0))
    return w_u - w_u * sigmoid(beta * (z0 - r))


def closed_form_kto(logps, refs, labels, z0, beta, w_d, w_u):
    """(loss, metrics, grad wrt logps, grad wrt refs): Python floats; gradients by central differences."""
    c = [float(v) for v in logps.detach().cpu()]
    rf = [float(v) for v in refs.detach().cpu()]
    lab = [bool(v) for v in labels.cpu()]
    B = len(c)

    def loss_of(c, rf):
        return sum(kto_row_loss(c[i], rf[i], lab[i], z0, beta, w_d, w_u) for i in range(B)) / max(B, 1)

    def grads(values, other, first):
        out = []
        for i in range(B):
            step = 1e-6 * max(1.0, abs(values[i]))
            plus, minus = list(values), list(values)
            plus[i] += step
            minus[i] -= step
            f = (lambda v: loss_of(v, other)) if first else (lambda v: loss_of(other, v))
            out.append((f(plus) - f(minus)) / (2 * step))
        return out

    chosen = [i for i in range(B) if lab[i]]
    rejected = [i for i in range(B) if not lab[i]]

    def mean(xs):
        return sum(xs) / max(len(xs), 1)

    rc = mean([beta * (c[i] - rf[i]) for i in chosen])
    rr = mean([beta * (c[i] - rf[i]) for i in rejected])
    metrics = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/margins": rc - rr,
               "logps/chosen": mean([c[i] for i in chosen]), "logps/rejected": mean([c[i] for i in rejected]),
               "kl": z0, "count/chosen": float(len(chosen)), "count/rejected": float(len(rejected))}
    return loss_of(c, rf), metrics, grads(c, rf, True), grads(rf, c, False)


# ---- helpers -------------------------------------------------------------------------------------

def make_inputs(B, device, dtype=torch.float32, desirable_fraction=0.6, scale=3.0):
    logps = (-(torch.rand(B) * scale + 0.05)).to(device, dtype).requires_grad_()
    refs = (-(torch.rand(B) * scale + 0.05)).to(device, dtype).requires_grad_()
    labels = (torch.rand(B) < desirable_fraction).to(device)
    return logps, refs, labels


def run(fn, logps, refs, labels, **kwargs):
    loss, metrics = fn(logps, refs, labels, **kwargs)
    grads = torch.autograd.grad(loss, (logps, refs)) if logps.shape[0] else (torch.zeros(0), torch.zeros(0))
    return loss, metrics, grads


def as_float64(x):
    """Host numbers become float64 directly (torch.as_tensor would round a Python float to float32)."""
    return x.detach().to("cpu", torch.float64) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(as_float64(actual), as_float64(expected), rtol=tol, atol=tol)


# ---- kernel vs twin vs closed form ---------------------------------------------------------------

@pytest.mark.parametrize("loss_type, kl_kind", [("kto", "float"), ("kto", "tensor"), ("apo_zero_unpaired", None)])
@pytest.mark.parametrize("B", [1, 37, 1100])  # 1100 > MAX_BLOCK_B: two blocks and the finalize kernel
def test_kto_fp32_matches_twin_and_closed_form(loss_type, kl_kind, B, device):
    logps, refs, labels = make_inputs(B, device)
    z0 = 0.37 if loss_type == "kto" else 0.0
    kwargs = dict(beta=0.7, desirable_weight=1.33, undesirable_weight=0.8, loss_type=loss_type)
    if loss_type == "kto":
        kwargs["kl"] = torch.tensor(z0, device=device) if kl_kind == "tensor" else z0
    loss_t, metrics_t, grads_t = run(kto_loss, logps, refs, labels, backend="triton", **kwargs)
    loss_r, metrics_r, grads_r = run(twin.kto_loss, logps, refs, labels, **kwargs)
    loss_c, metrics_c, *grads_c = closed_form_kto(logps, refs, labels, z0, 0.7, 1.33, 0.8)
    assert set(metrics_t) == set(metrics_r) == KTO_METRICS
    assert loss_t.dtype == torch.float32 and loss_t.shape == ()
    assert_close(loss_t, loss_r, 1e-6)
    assert_close(loss_t, loss_c, 1e-5)
    for name in KTO_METRICS:
        assert not metrics_t[name].requires_grad and metrics_t[name].shape == ()
        assert_close(metrics_t[name], metrics_r[name], 1e-6)
        assert_close(metrics_t[name], metrics_c[name], 1e-5)
    for g_t, g_r, g_c in zip(grads_t, grads_r, grads_c):
        assert_close(g_t, g_r, 1e-6)
        assert_close(g_t, g_c, 1e-5)
    torch.testing.assert_close(grads_t[1], -grads_t[0])  # the loss sees the references only through r


@pytest.mark.parametrize("desirable", [True, False])
def test_kto_one_class_only(desirable, device):
    """A batch of desirable rows only (or undesirable only): the other class's metrics are 0, not NaN."""
    B = 9
    logps, refs, _ = make_inputs(B, device)
    labels = torch.full((B,), desirable, device=device)
    for fn, extra in ((kto_loss, {"backend": "triton"}), (twin.kto_loss, {})):
        loss, metrics, grads = run(fn, logps, refs, labels, kl=0.2, beta=0.3, **extra)
        loss_c, metrics_c, grad_c, _ = closed_form_kto(logps, refs, labels, 0.2, 0.3, 1.0, 1.0)
        assert_close(loss, loss_c, 1e-5)
        for name in KTO_METRICS:
            assert_close(metrics[name], metrics_c[name], 1e-5)
        assert metrics["count/chosen"].item() == (B if desirable else 0)
        missing = "rejected" if desirable else "chosen"
        assert metrics[f"rewards/{missing}"].item() == 0.0 and metrics[f"logps/{missing}"].item() == 0.0
        assert_close(grads[0], grad_c, 1e-5)
        # desirable rows are pushed up, undesirable ones down
        assert ((grads[0] < 0) if desirable else (grads[0] > 0)).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kto_empty_batch(loss_type, device):
    logps, refs, labels = make_inputs(0, device)
    kl = {"kl": torch.tensor(0.25, device=device)} if loss_type == "kto" else {}
    for fn, extra in ((kto_loss, {"backend": "triton"}), (twin.kto_loss, {})):
        loss, metrics = fn(logps, refs, labels, loss_type=loss_type, **kl, **extra)
        assert loss.item() == 0.0
        assert all(metrics[name].item() == 0.0 for name in KTO_METRICS - {"kl"})
        assert metrics["kl"].item() == pytest.approx(0.25 if loss_type == "kto" else 0.0)
        loss.backward()
        assert logps.grad.shape == (0,) and refs.grad.shape == (0,)
        logps.grad = refs.grad = None


def test_kto_nan_rules(device):
    """NaN inside the batch reaches the loss (and only its own class's metrics); a NaN kl every row."""
    logps, refs, labels = make_inputs(6, device)
    labels = torch.tensor([True, True, True, False, False, False], device=device)
    bad = logps.detach().clone()
    bad[1] = float("nan")  # a desirable row
    for fn, extra in ((kto_loss, {"backend": "triton"}), (twin.kto_loss, {})):
        loss, metrics = fn(bad, refs.detach(), labels, kl=0.1, **extra)
        assert loss.isnan()
        assert metrics["rewards/chosen"].isnan() and metrics["logps/chosen"].isnan()
        assert metrics["rewards/rejected"].isfinite() and metrics["logps/rejected"].isfinite()
        loss, metrics = fn(logps.detach(), refs.detach(), labels, kl=torch.tensor(float("nan"), device=device), **extra)
        assert loss.isnan() and metrics["kl"].isnan()
        assert metrics["rewards/chosen"].isfinite()  # the rewards do not involve z0


def test_kto_extreme_values_are_finite_and_tails_keep_precision(device):
    big = torch.tensor([1e3, -1e3, 1e3, -1e3, 0.0, 40.0], device=device)
    labels = torch.tensor([True, True, False, False, True, True], device=device)
    zeros = torch.zeros(6, device=device)
    for fn, extra in ((kto_loss, {"backend": "triton"}), (twin.kto_loss, {})):
        logps = big.clone().requires_grad_()
        loss, metrics, grads = run(fn, logps, zeros.clone().requires_grad_(), labels, kl=0.0, beta=1.0, **extra)
        assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values())
        assert all(torch.isfinite(g).all() for g in grads)
    # one desirable row with beta (r - z0) = 30: loss s(-30) = 9.4e-14, which 1 - s(30) rounds to 0 in fp32
    loss, _ = kto_loss(torch.tensor([30.0], device=device), torch.zeros(1, device=device),
                       torch.tensor([True], device=device), kl=0.0, beta=1.0, backend="triton")
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(sigmoid(-30.0), dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_kto_bf16(device):
    logps, refs, labels = make_inputs(37, device, dtype=torch.bfloat16)
    kwargs = dict(kl=torch.tensor(0.2, device=device, dtype=torch.bfloat16), beta=0.5, undesirable_weight=1.5)
    loss_t, metrics_t, grads_t = run(kto_loss, logps, refs, labels, backend="triton", **kwargs)
    upcast = [t.detach().float().requires_grad_() for t in (logps, refs)]
    loss_r, metrics_r, grads_r = run(twin.kto_loss, *upcast, labels, **kwargs)
    assert loss_t.dtype == torch.float32
    assert_close(loss_t, loss_r, 1e-5)
    for name in KTO_METRICS:
        assert_close(metrics_t[name], metrics_r[name], 1e-5)
    for g_t, g_r in zip(grads_t, grads_r):
        assert g_t.dtype == torch.bfloat16
        torch.testing.assert_close(g_t.float(), g_r, rtol=1e-2, atol=1e-4)


def test_kto_grad_output_scale_and_frozen_reference(device):
    """backward is grad_output times the stored row gradients; a constant reference gets none."""
    logps, refs, labels = make_inputs(20, device)
    refs = refs.detach()
    loss, _ = kto_loss(logps, refs, labels, kl=0.1, backend="triton")
    (3.0 * loss).backward()
    expected, = torch.autograd.grad(3.0 * twin.kto_loss(logps, refs, labels, kl=0.1)[0], logps)
    assert_close(logps.grad, expected, 1e-6)
    assert refs.grad is None


def test_kto_twin_gradcheck():
    logps, refs, _ = (t.detach().double().requires_grad_() if t.is_floating_point() else t
                      for t in make_inputs(7, "cpu"))
    labels = torch.tensor([True, False, True, True, False, False, True])
    for kwargs in (dict(kl=0.3, desirable_weight=2.0), dict(loss_type="apo_zero_unpaired", undesirable_weight=0.5)):
        assert torch.autograd.gradcheck(lambda a, b: twin.kto_loss(a, b, labels, beta=0.8, **kwargs)[0], (logps, refs))


def test_kto_has_no_second_derivative_on_triton(device):
    logps, refs, labels = make_inputs(4, device)
    loss, _ = kto_loss(logps, refs, labels, kl=0.0, backend="triton")
    grad, = torch.autograd.grad(loss, logps, create_graph=True)
    with pytest.raises(RuntimeError, match="kto_loss.*backend='torch'"):
        grad.sum().backward()


# ---- TRL's formula (transcribed from trl/trainer/kto_trainer.py, KTOTrainer._compute_loss) ----------

def trl_kto(policy_logps, ref_logps, labels, policy_KL_logps, reference_KL_logps, *, beta, desirable_weight,
            undesirable_weight, loss_type):
    """TRL's KTO loss and logged metrics, op for op (single process: gather_for_metrics is the identity)."""
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logps = policy_logps.index_select(0, chosen_idx)
    rejected_logps = policy_logps.index_select(0, rejected_idx)
    ref_chosen_logps = ref_logps.index_select(0, chosen_idx)
    ref_rejected_logps = ref_logps.index_select(0, rejected_idx)
    if loss_type == "kto":
        kl = (policy_KL_logps - reference_KL_logps).mean().detach()
        kl = kl.mean().clamp(min=0)
    else:
        kl = torch.zeros(1, dtype=policy_logps.dtype)
    chosen_logratios = chosen_logps - ref_chosen_logps
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "kto":
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    else:
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    rejected_rewards = beta * rejected_logratios.detach()
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    num_chosen, num_rejected = len(chosen_idx), len(rejected_idx)
    metrics = {"kl": kl.item(),
               "rewards/chosen": chosen_rewards.nansum().item() / num_chosen,
               "logps/chosen": chosen_logps.nansum().item() / num_chosen,
               "rewards/rejected": rejected_rewards.nansum().item() / num_rejected,
               "logps/rejected": rejected_logps.nansum().item() / num_rejected}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["count/chosen"], metrics["count/rejected"] = num_chosen, num_rejected  # TRL <= 0.24's names
    return losses.nanmean(), metrics


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kl_sign", [1.0, -1.0])  # the KL pairs' mean log-ratio above / below 0 (TRL clamps at 0)
def test_kto_matches_trl(loss_type, kl_sign):
    """Same loss, gradient and metrics as TRL on the same float64 inputs, on both backends."""
    g = torch.Generator().manual_seed(1)
    B = 16
    policy = (-torch.rand(B, generator=g, dtype=torch.float64) * 30).requires_grad_()
    ref = -torch.rand(B, generator=g, dtype=torch.float64) * 30
    labels = torch.rand(B, generator=g) < 0.6
    kl_policy = -torch.rand(B, generator=g, dtype=torch.float64) * 30
    kl_ref = kl_policy - kl_sign * torch.rand(B, generator=g, dtype=torch.float64) * 4
    options = dict(beta=0.1, desirable_weight=1.2, undesirable_weight=0.9)
    trl_loss, trl_metrics = trl_kto(policy, ref, labels, kl_policy, kl_ref, loss_type=loss_type, **options)
    trl_grad, = torch.autograd.grad(trl_loss, policy)
    z0 = kto_kl(kl_policy, kl_ref) if loss_type == "kto" else None
    if z0 is not None:  # below 0 the clamp acts
        assert (z0 == 0) if kl_sign < 0 else (z0 > 0)
    for backend in ("torch", "triton"):
        loss, metrics = kto_loss(policy, ref, labels, kl=z0, loss_type=loss_type, backend=backend, **options)
        grad, = torch.autograd.grad(loss, policy)
        tol = 1e-12 if backend == "torch" else 1e-6  # the kernel computes in fp32
        assert_close(loss, trl_loss, tol)
        assert_close(grad, trl_grad, tol)
        for name, value in trl_metrics.items():
            assert_close(metrics[name], value, tol)


# ---- kto_kl --------------------------------------------------------------------------------------

def test_kto_kl_mean_clamp_empty_nan_and_ranks():
    p = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    r = torch.tensor([-1.5, -2.5, -2.0, -4.5])
    kl = kto_kl(p, r)
    assert kl.shape == () and not kl.requires_grad and kl.dtype == torch.float32
    assert kl.item() == pytest.approx((0.5 + 0.5 - 1.0 + 0.5) / 4)
    assert kto_kl(r, p).item() == 0.0  # mean -0.125: clamped at 0
    assert kto_kl(p.double(), r.double()).dtype == torch.float64
    assert kto_kl(torch.zeros(0), torch.zeros(0)).item() == 0.0
    assert kto_kl(torch.tensor([float("nan"), 1.0]), torch.zeros(2)).isnan()
    assert kto_kl(p.bfloat16(), r.bfloat16()).item() == pytest.approx(0.125)

    # two "ranks" (a fake all-reduce adding the other rank's sum and count): the mean over all 6 rows
    other = torch.tensor([-1.0, -1.0]) - torch.tensor([-3.0, -3.0])  # log-ratio +2 on both rows

    def add_other_rank(total):
        total += torch.tensor([other.sum().item(), 2.0])

    assert kto_kl(p, r, all_reduce=add_other_rank).item() == pytest.approx((0.5 + 4.0) / 6)
    with pytest.raises(ValueError, match="ref_kl_logps"):
        kto_kl(p, torch.zeros(3))
    with pytest.raises(ValueError, match="policy_kl_logps"):
        kto_kl(p.reshape(2, 2), r.reshape(2, 2))
    with pytest.raises(ValueError, match="backend"):
        kto_kl(p, r, backend="cuda")


# ---- bad input -----------------------------------------------------------------------------------

def test_kto_bad_input():
    p, r = torch.randn(4) - 2, torch.randn(4) - 2
    labels = torch.tensor([True, False, True, False])
    cases = [
        (dict(kl=0.1, loss_type="sigmoid"), "loss_type"),
        (dict(kl=0.1, beta=0.0), "beta"),
        (dict(kl=0.1, desirable_weight=-1.0), "desirable_weight"),
        (dict(kl=0.1, undesirable_weight=float("nan")), "undesirable_weight"),
        (dict(), "kl is required"),
        (dict(kl=0.1, loss_type="apo_zero_unpaired"), "kl must be None"),
        (dict(kl=torch.zeros(2)), "kl must be a number or a one-element"),
        (dict(kl=torch.zeros((), dtype=torch.long)), "kl must be a number or a one-element"),
        (dict(kl="0.1"), "kl must be a number"),
        (dict(kl=True), "kl must be a number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            kto_loss(p, r, labels, **kwargs)
    with pytest.raises(ValueError, match="labels must be a bool tensor"):
        kto_loss(p, r, labels.long(), kl=0.0)
    with pytest.raises(ValueError, match="labels must be a bool torch.Tensor"):
        kto_loss(p, r, [True, False, True, False], kl=0.0)
    with pytest.raises(ValueError, match="labels must have the shape of policy_logps"):
        kto_loss(p, r, labels[:3], kl=0.0)
    with pytest.raises(ValueError, match="ref_logps"):
        kto_loss(p, torch.randn(5), labels, kl=0.0)
    with pytest.raises(ValueError, match="policy_logps"):
        kto_loss(torch.ones(4, dtype=torch.long), r, labels, kl=0.0)
    with pytest.raises(ValueError, match=r"policy_logps must be \[B\]"):
        kto_loss(p.reshape(2, 2), r.reshape(2, 2), labels.reshape(2, 2), kl=0.0)


def test_kto_contract():
    from fastrlhf import contracts
    from fastrlhf.kernels import preference as kernels

    assert contracts.KTO_LOSS_TYPES == LOSS_TYPES
    assert set(contracts.KTO_STATS) == KTO_METRICS
    slots = [kernels._KTO_REWARDS_CHOSEN, kernels._KTO_REWARDS_REJECTED, kernels._KTO_MARGINS,
             kernels._KTO_LOGPS_CHOSEN, kernels._KTO_LOGPS_REJECTED, kernels._KTO_KL, kernels._KTO_COUNT_CHOSEN,
             kernels._KTO_COUNT_REJECTED]
    assert sorted(int(getattr(i, "value", i)) for i in slots) == list(range(len(contracts.KTO_STATS)))
