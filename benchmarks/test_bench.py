"""pytest-benchmark entries for the CPU subset:  pytest benchmarks --benchmark-only

Not part of the normal test run (pyproject's testpaths is ["tests"]). Shapes are small enough for a
2-core CI machine; fastrlhf runs its torch path here (backend="torch"), the GPU numbers come from
`python -m benchmarks` on a GPU.
"""
import pytest
import torch

from benchmarks import cases

torch.set_num_threads(1)

CPU = "cpu"


def _inputs(case):
    return case.make_inputs(CPU)


def _provider(case, name):
    [p] = [p for p in case.providers if p.name == name]
    status = p.status(CPU)
    if status:
        pytest.skip(status)
    return p


@pytest.mark.parametrize("provider", ["fastrlhf", "trl-loop", "openrlhf-loop", "verl-loop"])
@pytest.mark.parametrize("T", [256, 2048])
def test_gae(benchmark, provider, T):
    case = cases.gae_case(16, T, "fp32", CPU)
    p, x = _provider(case, provider), _inputs(case)
    benchmark.group = f"gae B=16 T={T}"
    benchmark(p.fn, x)


@pytest.mark.parametrize("provider", ["fastrlhf", "torch-full-logits", "trl-chunked"])
def test_token_logprobs_forward_backward(benchmark, provider):
    case = cases.token_logprobs_case(512, 32000, 64, "fp32", CPU, entropy=False)
    p, x = _provider(case, provider), _inputs(case)
    grad = torch.randn(512)

    def step():
        x["hidden"].grad = x["weight"].grad = None
        torch.autograd.backward(p.fn(x), grad)

    benchmark.group = "token_logprobs N=512 V=32000 H=64 fwd+bwd"
    benchmark(step)


@pytest.mark.parametrize("provider", ["fastrlhf", "torch-naive", "trl-selective", "openrlhf-fp32"])
def test_logprobs_from_logits_forward(benchmark, provider):
    case = cases.logprobs_from_logits_case(512, 32000, "fp32", CPU, entropy=False)
    p, x = _provider(case, provider), _inputs(case)
    benchmark.group = "logprobs_from_logits N=512 V=32000 forward"
    with torch.no_grad():
        benchmark(p.fn, x)


@pytest.mark.parametrize("provider", ["fastrlhf", "verl", "torch-reference"])
def test_ppo_loss_forward_backward(benchmark, provider):
    case = cases.ppo_case(16, 1024, "fp32", CPU)
    p, x = _provider(case, provider), _inputs(case)

    def step():
        x["logps"].grad = x["entropy"].grad = None
        loss, _ = p.fn(x)
        loss.backward()

    benchmark.group = "ppo_loss B=16 T=1024 fwd+bwd"
    benchmark(step)


@pytest.mark.parametrize("provider", ["fastrlhf", "trl"])
def test_dpo_loss_forward_backward(benchmark, provider):
    case = cases.dpo_case(4096, "fp32", CPU)
    p, x = _provider(case, provider), _inputs(case)

    def step():
        x["chosen_logps"].grad = x["rejected_logps"].grad = None
        loss, _ = p.fn(x)
        loss.backward()

    benchmark.group = "dpo_loss B=4096 fwd+bwd"
    benchmark(step)
