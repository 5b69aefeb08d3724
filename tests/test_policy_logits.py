"""policy_loss_from_logits (GRPO from logits, issue 14 item 3): Triton path vs the PyTorch twin (the
composition logprobs_from_logits + ppo_loss) vs an independent float64 closed form, loss, metrics and
d loss / d logits; the rows it must never read; the one logits-sized gradient (or none, in place)
and what in-place refuses.

Closed form: `test_logprobs.closed_form` (float64 log-softmax, entropy and d / d logits for given
per-token upstream gradients) chained with `test_ppo.ppo_closed_form` (per-token PPO loop with
hand-derived d loss / d logp and d loss / d entropy). Tolerances as test_fused_head: relative to
max(1, |expected|), fp32 2e-5, bf16 values 1e-4 and gradients 2e-2.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from gpu_compile import recorded_launches
from test_logprobs import Allocations, assert_close, closed_form
from test_ppo import ppo_closed_form

import fastrlhf

IGNORE = -100
VALUE_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-4}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_inputs(B, T, V, *, dtype=torch.float32, next_token=True, seed=0, scale=2.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(B, T + next_token, V, generator=g, device=DEVICE) * scale).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g, device=DEVICE)
    if B * T > 1:
        targets.view(-1)[1] = IGNORE
    mask = torch.rand(B, T, generator=g, device=DEVICE) > 0.3
    if B > 1:
        mask[1] = False  # a fully masked row
    old = -torch.rand(B, T, generator=g, device=DEVICE) * 2 - 4
    ref = -torch.rand(B, T, generator=g, device=DEVICE) * 2 - 4
    rollout = old + 0.2 * torch.randn(B, T, generator=g, device=DEVICE)
    adv = torch.randn(B, generator=g, device=DEVICE)
    return dict(logits=logits, targets=targets, mask=mask, old=old, ref=ref, rollout=rollout, adv=adv)


def run(x, *, backend, grad_scale=1.0, inplace=False, old=True, **kwargs):
    logits = x["logits"].detach().clone().requires_grad_()
    source = logits * 1.0 if inplace else logits  # in place needs a non-leaf (the model's output)
    loss, metrics = fastrlhf.policy_loss_from_logits(
        source, x["targets"], x["old"] if old else None, x["adv"], x["mask"], backend=backend, inplace=inplace,
        **kwargs)
    (loss * grad_scale).backward()
    return loss.detach(), metrics, logits.grad


def closed(x, *, old=True, temperature=1.0, softcap=None, **kwargs):
    """(loss, metrics, d loss / d logits) in float64 from the formulas."""
    logits, targets = x["logits"], x["targets"]
    B, T = targets.shape
    rows = logits[:, :T]
    zero = torch.zeros(B, T, dtype=torch.float64, device=logits.device)
    logps, entropy, _ = closed_form(rows, targets, temperature, zero, zero, softcap)
    kw = {k: v for k, v in kwargs.items()}
    loss, metrics, grads = ppo_closed_form(logps, x["old"] if old else logps, x["adv"], x["mask"], entropy=entropy,
                                           **kw)
    _, _, dz = closed_form(rows, targets, temperature, torch.as_tensor(grads["logps"]),
                           torch.as_tensor(grads["entropy"]), softcap)
    dlogits = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    dlogits[:, :T] = dz
    return loss, metrics, dlogits


def check(result, expected, dtype, what):
    loss, metrics, grad = result
    exp_loss, exp_metrics, exp_grad = expected
    assert set(metrics) == set(exp_metrics), what
    assert_close(loss, torch.as_tensor(exp_loss), VALUE_TOL[dtype], f"{what} loss")
    for name, value in metrics.items():
        assert_close(value, torch.as_tensor(exp_metrics[name]), VALUE_TOL[dtype], f"{what} {name}")
    assert grad.dtype == dtype
    assert_close(grad.float(), exp_grad, GRAD_TOL[dtype], f"{what} d logits")


OBJECTIVES = {
    "grpo (bnpo, k3 KL)": dict(clip_eps_high=0.28, ref_logps="ref", kl_coef=0.04),
    "on-policy, entropy bonus": dict(old=False, entropy_coef=0.01, loss_agg="seq-mean-token-mean"),
    "gspo": dict(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
    "dual clip, k2, split aggregations": dict(dual_clip=3.0, ref_logps="ref", kl_coef=0.1, kl_estimator="k2",
                                              kl_agg="token-mean", loss_agg="seq-mean-token-sum-norm"),
    "cispo, token IS": dict(loss_type="cispo", rollout_logps="rollout", is_correction="token_truncate"),
    "sapo, sequence IS on-policy": dict(old=False, loss_type="sapo", rollout_logps="rollout",
                                        is_correction="sequence_mask", is_clip_min=0.5),
    "top entropy, softcap, temperature": dict(top_entropy_quantile=0.5, softcap=4.0, temperature=0.7,
                                              entropy_coef=0.02, total_tokens=50.0),
}


def _resolve(x, objective):
    kwargs = dict(objective)
    for name in ("ref_logps", "rollout_logps"):
        if name in kwargs:
            kwargs[name] = x[kwargs[name]]
    return kwargs


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("shape", [(3, 7, 131), (2, 1, 1000), (4, 5, 4099)], ids=str)
def test_matches_twin_and_closed_form(objective, shape):
    x = make_inputs(*shape, seed=hash(objective) % 1000)
    kwargs = _resolve(x, OBJECTIVES[objective])
    got = run(x, backend="triton", grad_scale=2.5, **kwargs)
    want = run(x, backend="torch", grad_scale=2.5, **kwargs)
    assert list(got[1]) == list(want[1])
    check(got, (want[0], {k: v.item() for k, v in want[1].items()}, want[2]), torch.float32, f"{objective} twin")
    old = kwargs.pop("old", True)
    closed_kwargs = {("ref" if k == "ref_logps" else "rollout" if k == "rollout_logps" else k): v
                     for k, v in kwargs.items()}
    exp_loss, exp_metrics, exp_grad = closed(x, old=old, **closed_kwargs)
    check(got, (exp_loss, exp_metrics, 2.5 * exp_grad), torch.float32, f"{objective} closed form")


def test_aligned_layout_strided_view_and_bf16():
    """[B, T, V] logits aligned with targets; a strided view of a bigger tensor (rows not adjacent);
    bf16 logits give a bf16 gradient."""
    x = make_inputs(3, 6, 257, next_token=False, seed=2)
    got = run(x, backend="triton", ref_logps=x["ref"], kl_coef=0.05)
    check(got, closed(x, ref=x["ref"], kl_coef=0.05), torch.float32, "aligned")
    big = torch.randn(3, 9, 300, device=DEVICE)
    view_inputs = dict(x, logits=big[:, 1:8, :257])  # [3, 7, 257] next-token rows of row stride 300
    leaf = big.clone().requires_grad_()
    loss, metrics = fastrlhf.policy_loss_from_logits(leaf[:, 1:8, :257], x["targets"], x["old"], x["adv"], x["mask"],
                                                     backend="triton")
    loss.backward()
    exp_loss, _, exp_grad = closed(view_inputs)
    assert_close(loss, torch.as_tensor(exp_loss), 2e-5, "view loss")
    assert_close(leaf.grad[:, 1:8, :257], exp_grad, 2e-5, "view d logits")
    assert (leaf.grad[:, 0] == 0).all() and (leaf.grad[:, 8] == 0).all() and (leaf.grad[..., 257:] == 0).all()
    bf16 = make_inputs(3, 7, 1000, dtype=torch.bfloat16, seed=3)
    got = run(bf16, backend="triton", ref_logps=bf16["ref"], kl_coef=0.04)
    want = run(bf16, backend="torch", ref_logps=bf16["ref"], kl_coef=0.04)
    check(got, (want[0], {k: v.item() for k, v in want[1].items()}, want[2].float()), torch.bfloat16, "bf16 twin")
    check(got, closed(bf16, ref=bf16["ref"], kl_coef=0.04), torch.bfloat16, "bf16 closed form")


def test_rows_outside_the_loss_are_never_read():
    """NaN in the logits of masked tokens, of -100 targets and of the last position changes nothing:
    those rows are not read (their gradient rows are written as zeros)."""
    x = make_inputs(3, 7, 131, seed=4)
    clean = run(x, backend="triton", ref_logps=x["ref"], kl_coef=0.05, entropy_coef=0.01)
    dirty = dict(x, logits=x["logits"].clone())
    skipped = ~x["mask"] | (x["targets"] == IGNORE)
    dirty["logits"][:, :-1][skipped] = float("nan")
    dirty["logits"][:, -1] = float("nan")
    got = run(dirty, backend="triton", ref_logps=x["ref"], kl_coef=0.05, entropy_coef=0.01)
    assert torch.equal(got[0], clean[0])
    for name in clean[1]:
        assert torch.equal(got[1][name], clean[1][name]), name
    assert torch.equal(got[2], clean[2])
    assert (got[2][:, :-1][skipped] == 0).all() and (got[2][:, -1] == 0).all()
    # NaN inside the mask: the loss and that row's gradient are NaN, as the twin's loss.
    counted = (~skipped).nonzero()[0]
    dirty["logits"][counted[0], counted[1], 5] = float("nan")
    loss, _, grad = run(dirty, backend="triton")
    assert torch.isnan(loss) and torch.isnan(run(dirty, backend="torch")[0])
    assert torch.isnan(grad[counted[0], counted[1]]).all()


def test_empty_batch_and_fully_masked():
    for x in (make_inputs(0, 5, 131), make_inputs(2, 0, 131)):
        loss, metrics, grad = run(x, backend="triton")
        assert loss.item() == 0 and all(v.item() == 0 for v in metrics.values())
        assert grad.shape == x["logits"].shape and (grad == 0).all()
    x = make_inputs(3, 4, 131)
    x["mask"] = torch.zeros_like(x["mask"])
    loss, metrics, grad = run(x, backend="triton", ref_logps=x["ref"], kl_coef=0.1)
    assert loss.item() == 0 and (grad == 0).all() and all(torch.isfinite(v) for v in metrics.values())


def test_one_kernel_forward_one_launch_backward_and_one_gradient_buffer():
    """Forward: the row kernel, nothing logits-sized but the gradient buffer (inplace: none at all).
    Backward: one launch (`scale_unless_one`), which moves no byte when grad_output is 1."""
    x = make_inputs(2, 5, 4096, seed=5)
    for inplace in (False, True):
        logits = x["logits"].clone().requires_grad_()
        source = logits * 1.0
        mode = Allocations()
        with recorded_launches() as launches, mode:
            loss, _ = fastrlhf.policy_loss_from_logits(source, x["targets"], x["old"], x["adv"], x["mask"],
                                                       inplace=inplace, backend="triton")
        assert sorted(launch.kernel for launch in launches) == ["_fused_head_rows_kernel"]
        logits_sized = [made for made in mode.made if made[0] == tuple(x["logits"].shape)]
        assert logits_sized == ([] if inplace else [(tuple(x["logits"].shape), torch.float32)])
        with recorded_launches() as launches:
            loss.backward()
        assert [launch.kernel for launch in launches] == ["_scale_unless_one_kernel"]
    # the scale kernel itself: a no-op at 1, a multiply otherwise
    from fastrlhf.kernels.fused_head import scale_unless_one

    t = torch.randn(3, 5000, device=DEVICE)
    before = t.clone()
    scale_unless_one(t, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(t, before)
    scale_unless_one(t, torch.tensor(-0.5, device=DEVICE))
    torch.testing.assert_close(t, before * -0.5)


def test_inplace_equals_a_new_buffer_and_refuses_what_it_must():
    g = torch.Generator(device=DEVICE).manual_seed(6)
    B, T, V, H = 2, 5, 131, 8
    hidden = torch.randn(B, T + 1, H, generator=g, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, H, generator=g, device=DEVICE, requires_grad=True)
    x = make_inputs(B, T, V, seed=7)
    grads = []
    for inplace in (False, True):
        hidden.grad = weight.grad = None
        logits = hidden @ weight.t()
        loss, _ = fastrlhf.policy_loss_from_logits(logits, x["targets"], None, x["adv"], x["mask"],
                                                   ref_logps=x["ref"], kl_coef=0.1, inplace=inplace, backend="triton")
        if inplace:  # the logits now hold their own gradient
            assert logits._version > 0
        loss.backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a leaf and a view are refused; forward-only calls never write
    leaf = x["logits"].clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace=True .* leaf tensor"):
        fastrlhf.policy_loss_from_logits(leaf, x["targets"], None, x["adv"], x["mask"], inplace=True,
                                         backend="triton")
    with pytest.raises(ValueError, match="inplace=True .* view"):
        fastrlhf.policy_loss_from_logits((leaf * 1.0)[:, :], x["targets"], None, x["adv"], x["mask"], inplace=True,
                                         backend="triton")
    with torch.no_grad():
        kept = x["logits"].clone()
        fastrlhf.policy_loss_from_logits(kept, x["targets"], None, x["adv"], x["mask"], inplace=True, backend="triton")
        assert torch.equal(kept, x["logits"])
    # used again after being overwritten: autograd refuses, whichever side of the call the use is on
    logits = hidden @ weight.t()
    loss, _ = fastrlhf.policy_loss_from_logits(logits, x["targets"], None, x["adv"], x["mask"], inplace=True,
                                               backend="triton")
    with pytest.raises(RuntimeError, match="overwrote the logits"):
        (loss + logits.float().square().sum()).backward()
    logits = hidden @ weight.t()
    earlier = (logits * logits).sum()  # saves the logits for its backward
    loss, _ = fastrlhf.policy_loss_from_logits(logits, x["targets"], None, x["adv"], x["mask"], inplace=True,
                                               backend="triton")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + earlier).backward()
    # a second backward through the same call
    logits = hidden @ weight.t()
    loss, _ = fastrlhf.policy_loss_from_logits(logits, x["targets"], None, x["adv"], x["mask"], backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_bad_input():
    x = make_inputs(2, 5, 131)
    call = (lambda **kw: fastrlhf.policy_loss_from_logits(
        kw.pop("logits", x["logits"]), kw.pop("targets", x["targets"]), kw.pop("old", x["old"]), x["adv"],
        kw.pop("mask", x["mask"]), **kw))
    with pytest.raises(ValueError, match="logits"):
        call(logits=x["logits"][0])
    with pytest.raises(ValueError, match="targets"):
        call(targets=x["targets"][:, :3])
    with pytest.raises(ValueError, match="targets must be in"):
        call(targets=x["targets"] + 1000)
    with pytest.raises(ValueError, match="mask"):
        call(mask=x["mask"][:, :2])
    with pytest.raises(ValueError, match="old_logps"):
        call(old=x["old"][:, :2])
    with pytest.raises(ValueError, match="inplace"):
        call(inplace=1)
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logps"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        call(loss_type="grpo")
