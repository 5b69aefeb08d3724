"""Double backward (create_graph=True: gradient penalties, Hessian-vector products) on every public
differentiable function: exact on the torch backend (checked against float64 finite differences of
the gradient by gradgradcheck), a clear RuntimeError on the Triton backend, never a silently wrong
second-order term.
"""
import re

import pytest
import torch

import fastrlhf

IGNORE = -100


def _cases(dtype, device):
    """name -> (function of the differentiable inputs giving a scalar, those inputs)."""
    g = torch.Generator().manual_seed(3)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    B, T, V, H = 2, 3, 7, 4
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    targets[0, 1] = IGNORE
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], device=device, dtype=torch.float32)
    old, adv, ref = rand(B, T, scale=0.3) - 1, rand(B, T), rand(B, T, scale=0.3) - 1
    c, r, rc, rr = (rand(4, scale=0.5) - 2 for _ in range(4))
    cases = {
        "token_logprobs": (lambda h, w, backend: fastrlhf.token_logprobs(
            h, w, targets, return_entropy=True, backend=backend)[1].sum(), (rand(B, T, H), rand(V, H))),
        "logprobs_from_logits": (lambda x, backend: fastrlhf.logprobs_from_logits(
            x, targets, return_entropy=True, backend=backend)[0].sum(), (rand(B, T, V),)),
        "kl_penalty": (lambda lp, backend: fastrlhf.kl_penalty(lp, ref, estimator="k3", backend=backend).sum(),
                       (rand(B, T, scale=0.3) - 1,)),
        "ppo_loss": (lambda lp, ent, backend: fastrlhf.ppo_loss(
            lp, old, adv, mask, ref_logps=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01, backend=backend)[0],
            (rand(B, T, scale=0.3) - 1, rand(B, T).abs())),
        "value_loss": (lambda v, backend: fastrlhf.value_loss(v, old, adv, mask, backend=backend)[0], (rand(B, T),)),
        "dpo_loss": (lambda a, b, backend: fastrlhf.dpo_loss(a, b, rc, rr, beta=0.5, backend=backend)[0], (c, r)),
        "reward_loss": (lambda a, b, backend: fastrlhf.reward_loss(a, b, center_coef=0.1, backend=backend)[0], (c, r)),
        "whiten": (lambda x, backend: (fastrlhf.whiten(x, mask, backend=backend) ** 3).sum(), (rand(B, T),)),
        "policy_loss_from_hidden": (lambda h, w, backend: fastrlhf.policy_loss_from_hidden(
            h, w, targets, old, adv, mask, ref_logps=ref, kl_coef=0.1, entropy_coef=0.01, backend=backend)[0],
            (rand(B, T, H), rand(V, H))),
        "policy_loss_from_logits": (lambda x, backend: fastrlhf.policy_loss_from_logits(
            x, targets, old, adv, mask, ref_logps=ref, kl_coef=0.1, entropy_coef=0.01, backend=backend)[0],
            (rand(B, T + 1, V),)),
        "dpo_loss_from_hidden": (lambda h, w, backend: fastrlhf.dpo_loss_from_hidden(
            h, w, targets, rc[:1], rr[:1], beta=0.5, backend=backend)[0], (rand(B, T, H), rand(V, H))),
        "sft_loss_from_hidden": (lambda h, w, backend: fastrlhf.sft_loss_from_hidden(h, w, targets, backend=backend)[0],
                                 (rand(B, T, H), rand(V, H))),
    }
    return cases


def _leaves(inputs):
    return [x.detach().clone().requires_grad_() for x in inputs]


@pytest.mark.parametrize("name", sorted(_cases(torch.float64, "cpu")))
def test_torch_backend_double_backward_is_exact(name):
    fn, inputs = _cases(torch.float64, "cpu")[name]
    assert torch.autograd.gradgradcheck(lambda *xs: fn(*xs, backend="torch"), _leaves(inputs))


@pytest.mark.parametrize("name", sorted(_cases(torch.float32, "cpu")))
def test_triton_backend_refuses_to_differentiate_its_gradient(name, device):
    fn, inputs = _cases(torch.float32, device)[name]
    leaves = _leaves(inputs)
    loss = fn(*leaves, backend="triton")
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    penalty = sum((grad ** 2).sum() for grad in grads if grad is not None)
    shown = "<policy|dpo|sft>_loss_from_hidden" if name.endswith("_from_hidden") else name
    with pytest.raises(RuntimeError, match=f"fastrlhf.{re.escape(shown)} on the Triton backend has no second derivative"):
        penalty.backward()


def test_first_order_backward_is_unchanged_under_create_graph(device):
    """create_graph=True for other reasons (e.g. an HVP of another term) still gives the exact first
    derivative of the Triton path; only differentiating through it raises."""
    fn, inputs = _cases(torch.float32, device)["ppo_loss"]
    plain, graph = _leaves(inputs), _leaves(inputs)
    expected = torch.autograd.grad(fn(*plain, backend="triton"), plain)
    got = torch.autograd.grad(fn(*graph, backend="triton"), graph, create_graph=True)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
