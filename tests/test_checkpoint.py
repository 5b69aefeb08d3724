"""Atomic checkpoints: round trip, RNG restore, half-written directories never loaded, keep_last."""
import json
import os
import random

import numpy as np
import pytest
import torch

from fastrlhf.checkpoint import (
    COMPLETE_MARKER,
    is_complete_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_state(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    state = {"epoch": 1, "batch_in_epoch": 3, "kl_ctl": {"value": 0.07}}
    path = save_checkpoint(tmp_path, 7, model_state=model.state_dict(), optimizer=optimizer,
                           scheduler=scheduler, trainer_state=state)
    assert path == tmp_path / "checkpoint-7" and is_complete_checkpoint(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]

    fresh, fresh_opt, fresh_sched = _model_and_optimizer()
    model_state, trainer_state = load_checkpoint(path, optimizer=fresh_opt, scheduler=fresh_sched)
    fresh.load_state_dict(model_state)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    exp_avg = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    fresh_exp_avg = [fresh_opt.state[p]["exp_avg"] for p in fresh.parameters()]
    for a, b in zip(exp_avg, fresh_exp_avg):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]
    assert trainer_state == dict(state, step=7)


def test_rng_states_are_restored(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(2)})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    load_checkpoint(path)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    torch.testing.assert_close(got[2], expected[2], rtol=0, atol=0)


def test_per_rank_rng_state_is_picked_by_rank(tmp_path):
    states = []
    for seed in (10, 20):
        torch.manual_seed(seed)
        from fastrlhf.checkpoint import capture_rng_state
        states.append(capture_rng_state())
    path = save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(1)}, rng_states=states)
    load_checkpoint(path, rank=1)
    got = torch.rand(2)
    torch.manual_seed(20)
    torch.testing.assert_close(got, torch.rand(2), rtol=0, atol=0)


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(3, 2)
    path = save_checkpoint(tmp_path, 0, model_state={"embed": w, "lm_head": w, "view": w[1]})
    state, _ = load_checkpoint(path)
    torch.testing.assert_close(state["lm_head"], w)
    torch.testing.assert_close(state["view"], w[1])


def test_half_written_checkpoints_are_never_returned(tmp_path):
    good = save_checkpoint(tmp_path, 2, model_state={"w": torch.ones(2)})
    # a save killed before the rename: only the temp dir exists, even with a higher step
    tmp = tmp_path / ".tmp-checkpoint-4-12345"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    # a directory with the final name but no marker (copied by hand / killed mid-copy)
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"junk")
    # a marker that lists a file that is missing
    bad = save_checkpoint(tmp_path / "other", 8, model_state={"w": torch.ones(2)})
    os.remove(bad / "trainer_state.pt")
    assert latest_checkpoint(tmp_path) == good
    assert latest_checkpoint(tmp_path / "other") is None
    assert resolve_resume("auto", tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-6")
    # the next save clears the stale temp dir
    save_checkpoint(tmp_path, 3, model_state={"w": torch.ones(2)})
    assert not tmp.exists()


def test_resolve_resume_values(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: start fresh
    path = save_checkpoint(tmp_path, 5, model_state={"w": torch.ones(1)})
    assert resolve_resume(True, tmp_path) == path
    assert resolve_resume(str(path), tmp_path) == path


def test_keep_last_and_resave_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model_state={"w": torch.full((1,), float(step))}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    path = save_checkpoint(tmp_path, 4, model_state={"w": torch.full((1,), 40.0)}, keep_last=2)
    state, trainer_state = load_checkpoint(path, restore_rng=False)
    assert float(state["w"]) == 40.0 and trainer_state["step"] == 4
    assert json.loads((path / COMPLETE_MARKER).read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model_state={})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model_state={}, keep_last=0)
    with pytest.raises(TypeError, match="model_state\\['x'\\]"):
        save_checkpoint(tmp_path, 1, model_state={"x": 3})
