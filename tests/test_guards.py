"""NonFiniteGuard: finite steps pass, non-finite ones are skipped and counted, K in a row stop the run."""
import pytest
import torch

from fastrlhf.guards import NonFiniteGuard


def _param_with_grad(value):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), value)
    return p


def test_finite_step_passes_and_keeps_grads():
    guard = NonFiniteGuard(3)
    p = _param_with_grad(1.0)
    assert guard.step_ok(torch.tensor(0.5), [p])
    assert p.grad is not None and guard.skipped_steps == 0


@pytest.mark.parametrize("loss, grad", [(float("nan"), 1.0), (1.0, float("inf")), (1.0, float("nan"))])
def test_non_finite_loss_or_grad_is_skipped_and_counted(loss, grad):
    guard = NonFiniteGuard(3)
    p = _param_with_grad(grad)
    assert not guard.step_ok(torch.tensor(loss), [p])
    assert p.grad is None and guard.skipped_steps == 1 and guard.consecutive == 1


def test_consecutive_counter_resets_and_k_in_a_row_raise():
    guard = NonFiniteGuard(3)
    nan = torch.tensor(float("nan"))
    assert not guard.step_ok(nan, [_param_with_grad(1.0)])
    assert not guard.step_ok(nan, [_param_with_grad(1.0)])
    assert guard.step_ok(torch.tensor(1.0), [_param_with_grad(1.0)])
    assert guard.consecutive == 0 and guard.skipped_steps == 2
    assert not guard.step_ok(nan, [])
    assert not guard.step_ok(nan, [])
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row \(last loss=nan.*lower the learning rate"):
        guard.step_ok(nan, [])
    assert guard.skipped_steps == 5


def test_precomputed_grad_norm_is_used():
    guard = NonFiniteGuard(2)
    p = _param_with_grad(1.0)
    assert not guard.step_ok(torch.tensor(1.0), [p], grad_norm=torch.tensor(float("inf")))
    assert p.grad is None


def test_unlimited_and_state_round_trip():
    guard = NonFiniteGuard(None)
    for _ in range(10):
        assert not guard.step_ok(float("nan"))
    restored = NonFiniteGuard(None)
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped_steps == 10 and restored.consecutive == 10
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(-1)
