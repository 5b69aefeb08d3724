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


# ----------------------------------------------------------------------------- verification (issue 13, case 5)
def _two_checkpoints(tmp_path):
    model, optimizer, scheduler = _model_and_optimizer()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model_state=model.state_dict(), optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"marker": step})
    return tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    _, newest = _two_checkpoints(tmp_path)
    manifest = json.loads((newest / COMPLETE_MARKER).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in newest.iterdir() if p.name != COMPLETE_MARKER)
    for name, entry in manifest["files"].items():
        data = (newest / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.pt"])
@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_damaged_newest_checkpoint_is_named_and_auto_falls_back(tmp_path, name, damage):
    older, newest = _two_checkpoints(tmp_path)
    file = newest / name
    data = bytearray(file.read_bytes())
    if damage == "truncate":  # e.g. storage corruption after the COMPLETE marker was written
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, different content: only the checksum sees it
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    assert is_complete_checkpoint(newest)  # the marker and every file are still there
    with pytest.warns(UserWarning, match=rf"skipping checkpoint-4: .*checkpoint-4/{name}"):
        assert resolve_resume("auto", tmp_path) == older
    from fastrlhf.checkpoint import read_resume_checkpoint

    with pytest.warns(UserWarning, match=rf"skipping checkpoint-4: .*checkpoint-4/{name}"):
        assert read_resume_checkpoint("auto", tmp_path).trainer_state["marker"] == 2
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name}"):  # an explicit path is refused, naming the file
        resolve_resume(str(newest), tmp_path)
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name}"):
        load_checkpoint(newest)
    _, state = load_checkpoint(older, restore_rng=False)
    assert state["marker"] == 2


def test_auto_resume_with_every_checkpoint_damaged_starts_fresh_with_warnings(tmp_path):
    older, newest = _two_checkpoints(tmp_path)
    for path in (older, newest):
        (path / "optimizer.pt").write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        assert resolve_resume("auto", tmp_path) is None
    assert [str(w.message).split(":")[0] for w in record] == ["skipping checkpoint-4", "skipping checkpoint-2"]


# ----------------------------------------------------------------------------- safe loading (issue 13, case 10)
class _RunsCode:
    """Unpickling this calls os.system: what a checkpoint from elsewhere could hold."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


@pytest.mark.parametrize("name", ["rng_state.pt", "trainer_state.pt", "optimizer.pt", "scheduler.pt"])
def test_a_planted_pickle_that_runs_code_is_refused(tmp_path, name):
    import hashlib

    _, newest = _two_checkpoints(tmp_path)
    flag = tmp_path / "pwned"
    torch.save({"state": _RunsCode(flag)}, newest / name)
    # whoever planted it also rewrote the manifest, so sizes and checksums match
    manifest = json.loads((newest / COMPLETE_MARKER).read_text())
    if isinstance(manifest["files"], dict):
        data = (newest / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / COMPLETE_MARKER).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"checkpoint-4/{name}: refused to load"):
        load_checkpoint(newest)
    assert not flag.exists()
    from fastrlhf.checkpoint import read_resume_checkpoint

    with pytest.warns(UserWarning, match=rf"skipping checkpoint-4: .*checkpoint-4/{name}: refused to load"):
        assert read_resume_checkpoint("auto", tmp_path).path == tmp_path / "checkpoint-2"
    assert not flag.exists()


def test_every_checkpoint_file_loads_with_weights_only(tmp_path):
    _, newest = _two_checkpoints(tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.pt"):
        torch.load(newest / name, weights_only=True)  # no allow-list needed for what we write


def test_rng_file_of_older_versions_still_loads(tmp_path):
    """Older versions pickled the numpy RNG state (an ndarray); it is read with exactly the numpy
    array types allow-listed."""
    from fastrlhf.checkpoint import capture_rng_state

    path = save_checkpoint(tmp_path, 1, model_state={"w": torch.zeros(1)})
    np.random.seed(5), random.seed(5), torch.manual_seed(5)
    torch.save([capture_rng_state()], path / "rng_state.pt")  # the old format
    manifest = json.loads((path / COMPLETE_MARKER).read_text())
    manifest["files"] = list(manifest["files"])  # and the old manifest: names only
    (path / COMPLETE_MARKER).write_text(json.dumps(manifest))
    expected = (random.random(), float(np.random.rand()))
    np.random.seed(9), random.seed(9)
    load_checkpoint(path)
    assert (random.random(), float(np.random.rand())) == expected


def test_keep_last_deletes_only_checkpoints_of_the_same_run(tmp_path):
    for step in (4, 5):  # an older run's checkpoints (higher steps) in the same directory
        save_checkpoint(tmp_path, step, model_state={"w": torch.zeros(1)}, run_record={"run_id": "A"})
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model_state={"w": torch.zeros(1)}, keep_last=1, run_record={"run_id": "B"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert json.loads((tmp_path / "checkpoint-3" / "run.json").read_text()) == {"run_id": "B"}
