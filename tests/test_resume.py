"""No lost work: a training process killed with SIGKILL (here: in the middle of writing a checkpoint)
resumes with resume="auto" from the last COMPLETE checkpoint and ends exactly where an uninterrupted
run ends (same weights, same logged loss at every step). And the non-finite guard inside the real
trainer: a NaN loss skips the step, K in a row stop the run with a clear message.
"""
import json
import math
import os
import signal
import time

import pytest
import torch

from fastrlhf.checkpoint import latest_checkpoint
from test_distributed import (
    SFT_RUN,
    assert_same_run,
    child_output,
    run_sft_subprocess,
    sft_records,
    uninterrupted_sft_run,
)


def reseal_manifest(file):
    """Record a checkpoint file's new size and checksum in its manifest (a test that edits a
    checkpoint on purpose; otherwise the edit is caught as corruption)."""
    import hashlib

    manifest_file = file.parent / "COMPLETE"
    manifest = json.loads(manifest_file.read_text())
    data = file.read_bytes()
    manifest["files"][file.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))


def _wait_for(path, process, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc={process.returncode}) before {path} appeared:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.1)


def test_sigkill_mid_checkpoint_then_resume_equals_uninterrupted_run(tmp_path, tmp_path_factory):
    reference = uninterrupted_sft_run(tmp_path_factory)
    out = tmp_path / "run"
    options = dict(SFT_RUN, output_dir=str(out))

    # 1) the run hangs while writing checkpoint-4 (checkpoint-2 is complete): kill -9 it right there
    process = run_sft_subprocess(dict(options, pause_in_save_at_step=4), wait=False)
    _wait_for(out / "saving.flag", process)
    process.kill()  # SIGKILL, like kill -9
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    half_written = [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-4-")]
    assert half_written and not (out / "checkpoint-4").exists()
    assert latest_checkpoint(out) == out / "checkpoint-2"
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # steps 3-4 are lost work to redo

    # 2) the same command with resume="auto" continues from checkpoint-2, never from the temp dir
    result = run_sft_subprocess(dict(options, resume="auto"))
    assert result.returncode == 0, child_output(result)
    assert "resumed from" in result.stdout + result.stderr and "checkpoint-2" in result.stdout + result.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    # CPU, fp32, same seed: bit-identical to the run that was never interrupted
    assert_same_run(out, reference, weight_tol=0.0, loss_tol=0.0)


# ----------------------------------------------------------------------------- non-finite guard
def _sft_trainer(tmp_path, *, max_steps, max_consecutive_nonfinite, nan_at_steps):
    from fastrlhf.distributed import DistContext
    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    model = RoleModel(tiny_llama(vocab_size=len(tokenizer)), roles=("policy",), lora_r=4)
    config = SFTConfig(output_dir=str(tmp_path), batch_size=4, max_steps=max_steps, learning_rate=1e-2,
                       lr_schedule="constant", backend="torch", progress=False, max_length=32, save_final=False,
                       max_consecutive_nonfinite=max_consecutive_nonfinite)
    trainer = SFTTrainer(model, tokenizer, config, sft_records(), ctx=DistContext())

    # NaN fed into the loss at the chosen steps: the policy's hidden states for the fused head (the
    # SFT loss's path) and its log-probs (the --no-fused-head path) are poisoned
    real_logprobs, real_head_inputs = model.token_logprobs, model.head_inputs

    def poisoned(*args, **kwargs):
        logps = real_logprobs(*args, **kwargs)
        return logps * float("nan") if trainer.step + 1 in nan_at_steps else logps

    def poisoned_head_inputs(*args, **kwargs):
        head = real_head_inputs(*args, **kwargs)
        return head._replace(hidden=head.hidden * float("nan")) if trainer.step + 1 in nan_at_steps else head

    model.token_logprobs, model.head_inputs = poisoned, poisoned_head_inputs
    # snapshot of the trainable weights after every step
    snapshots = []
    real_step = trainer.training_step

    def recording_step():
        metrics = real_step()
        snapshots.append([p.detach().clone() for p in trainer.params])
        return metrics

    trainer.training_step = recording_step
    return trainer, snapshots


def _metrics(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_nan_loss_step_is_skipped_and_counted(tmp_path):
    trainer, snapshots = _sft_trainer(tmp_path, max_steps=4, max_consecutive_nonfinite=3, nan_at_steps={2})
    trainer.train()
    assert trainer.guard.skipped_steps == 1 and trainer.guard.consecutive == 0
    for before, after in zip(snapshots[0], snapshots[1]):  # step 2 left the weights untouched
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))  # step 3 trained again
    assert all(torch.isfinite(p).all() for p in trainer.params)
    logged = _metrics(tmp_path)
    assert [m["skipped"] for m in logged] == [0.0, 1.0, 0.0, 0.0]
    assert math.isnan(logged[1]["loss"]) and all(math.isfinite(m["loss"]) for m in logged if m["step"] != 2)


def test_k_nan_steps_in_a_row_stop_the_run_with_a_message(tmp_path):
    trainer, snapshots = _sft_trainer(tmp_path, max_steps=10, max_consecutive_nonfinite=3, nan_at_steps=set(range(3, 11)))
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row \(last loss=nan.*lower the learning rate"):
        trainer.train()
    assert trainer.step == 4 and trainer.guard.skipped_steps == 3  # steps 3, 4 skipped; 5 raised
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    trainer, _ = _sft_trainer(tmp_path, max_steps=2, max_consecutive_nonfinite=3, nan_at_steps=set())
    trainer.config.save_steps = 2
    trainer.train()
    state_file = tmp_path / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state["world_size"] == 1
    torch.save(dict(state, world_size=2), state_file)  # as if written by a 2-process torchrun job
    reseal_manifest(state_file)
    trainer, _ = _sft_trainer(tmp_path, max_steps=4, max_consecutive_nonfinite=3, nan_at_steps=set())
    trainer.config.resume = "auto"
    with pytest.raises(ValueError, match="written by 2 processes but this run has 1"):
        trainer.train()


# ----------------------------------------------------------------------------- data position in examples (issue 13, case 3)
def _recording_sft_trainer(out, records, **options):
    """An SFTTrainer whose collate records the examples it is given (as tuples of token ids)."""
    from fastrlhf.distributed import DistContext
    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = RoleModel(tiny_llama(vocab_size=len(tokenizer), seed=0), roles=("policy",), lora_r=4)
    config = SFTConfig(**{**dict(output_dir=str(out), learning_rate=1e-3, lr_schedule="constant", backend="torch",
                                 progress=False, max_length=32, save_final=False), **options})
    trainer = SFTTrainer(model, tokenizer, config, records, ctx=DistContext())
    trainer.seen = []
    real_collate = trainer.collate

    def collate(examples):
        trainer.seen.extend(tuple(e["input_ids"]) for e in examples)
        return real_collate(examples)

    trainer.collate = collate
    return trainer


def _interrupt_in_step(trainer, step):
    """Ctrl-C (a KeyboardInterrupt raised by the code) inside step `step`, after its batches were
    taken: the loop then saves the last completed step, step - 1, with that step's data position."""
    real_optimize = trainer.optimize

    def interrupted(*args, **kwargs):
        if trainer.step + 1 == step:
            raise KeyboardInterrupt
        return real_optimize(*args, **kwargs)

    trainer.optimize = interrupted


def test_resume_with_a_larger_batch_continues_at_the_next_unseen_example(tmp_path):
    """Issue 13, case 3: 3 steps of batch 2 (6 of 16 examples), resumed with batch 4 for 2 steps:
    the resumed run trains examples 7..14 of the epoch's order, none twice, none skipped."""
    records = sft_records(16)
    first = _recording_sft_trainer(tmp_path, records, batch_size=2, max_steps=3, save_steps=3)
    first.train()
    resumed = _recording_sft_trainer(tmp_path, records, batch_size=4, max_steps=5, resume="auto")
    resumed.train()
    order = _recording_sft_trainer(tmp_path / "x", records, batch_size=16, max_steps=1)
    epoch_order = [tuple(order.train_examples[i]["input_ids"]) for i in order.ctx.shard_epoch(
        range(len(records)), seed=0, epoch=0)]
    assert first.seen == epoch_order[:6]
    assert resumed.seen == epoch_order[6:14]
    with open(tmp_path / "metrics.jsonl") as f:
        epochs = [r["epoch"] for r in map(json.loads, f) if "loss" in r]
    assert epochs == [0.125, 0.25, 0.375, 0.625, 0.875]


def test_resume_of_an_epoch_run_with_another_batch_size_trains_every_example_once(tmp_path):
    records = sft_records(16)
    first = _recording_sft_trainer(tmp_path, records, batch_size=2, epochs=1)
    _interrupt_in_step(first, 4)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    resumed = _recording_sft_trainer(tmp_path, records, batch_size=4, epochs=1, resume="auto")
    summary = resumed.train()
    assert len(first.seen) == 8  # 3 completed steps + the interrupted one's batch
    trained = first.seen[:6] + resumed.seen
    assert sorted(trained) == sorted(tuple(e["input_ids"]) for e in resumed.train_examples)
    assert summary["steps"] == 3 + 3  # 10 examples left: batches of 4, 4, 2


# ----------------------------------------------------------------------------- metrics.jsonl (issue 13, case 4)
def test_a_torn_last_metrics_line_is_skipped_with_a_warning_on_resume(tmp_path):
    records = sft_records(16)
    _recording_sft_trainer(tmp_path, records, batch_size=2, max_steps=4, save_steps=2).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.1, "l')  # the disk filled up in the middle of a line
    resumed = _recording_sft_trainer(tmp_path, records, batch_size=2, max_steps=6, resume="auto")
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 5 is not valid JSON \(a torn write\?\): skipped"):
        resumed.train()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]


def test_a_metrics_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the file as it was before the line."""
    import errno

    from fastrlhf.distributed import DistContext
    from fastrlhf.trainers import metrics_log

    log = metrics_log.MetricsLog(DistContext(), str(tmp_path), progress=False, progress_keys=())
    log.open(step=0, resumed=False)
    log.write({"step": 1, "loss": 1.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, bytes(data[:7]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_log.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        log.write({"step": 2, "loss": 0.5})
    monkeypatch.undo()
    log.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- one run per output directory
def _record(**config):
    from fastrlhf.trainers.run_dir import run_record
    from fastrlhf.trainers.sft import SFTConfig

    return run_record("SFTTrainer", SFTConfig(**{"output_dir": "x", **config}), train_records=sft_records(4))


def test_plan_run_rules(tmp_path):
    from fastrlhf.checkpoint import save_checkpoint
    from fastrlhf.trainers.run_dir import RunDirError, plan_run, write_run_record

    run = _record(max_steps=4)
    out = tmp_path / "run"
    assert plan_run(out, resume=None, overwrite=False, current=run).resume is None  # missing directory: fine
    write_run_record(out, run)
    save_checkpoint(out, 2, model_state={"w": torch.zeros(1)}, run_record=run)
    (out / "mine.txt").write_text("user file")

    with pytest.raises(RunDirError, match="is not empty: it holds a fastrlhf run .*last checkpoint checkpoint-2"):
        plan_run(out, resume=None, overwrite=False, current=_record(max_steps=4))
    plan = plan_run(out, resume=None, overwrite=True, current=_record(max_steps=4))
    assert sorted(p.name for p in plan.remove) == ["checkpoint-2", "run.json"]  # mine.txt stays

    plan = plan_run(out, resume="auto", overwrite=False, current=_record(max_steps=8, batch_size=2, logging_steps=3))
    assert plan.resume == "auto" and plan.run_id == run["run_id"]
    assert plan.notes == ["batch_size: 8 -> 2", "logging_steps: 1 -> 3", "max_steps: 4 -> 8"]
    with pytest.raises(RunDirError, match=r"--learning-rate: 0.0001 -> 0.001\n  --seed: 0 -> 1\n"):
        plan_run(out, resume="auto", overwrite=False, current=_record(max_steps=4, learning_rate=1e-3, seed=1))
    other_data = dict(_record(max_steps=4), data={"records": 5, "sha256": "ab" * 32})
    with pytest.raises(RunDirError, match=r"training data: 4 records \(sha256 .*\) -> 5 records"):
        plan_run(out, resume="auto", overwrite=False, current=other_data)

    # an explicit checkpoint: into its own directory or an empty one, never into another run's
    checkpoint = str(out / "checkpoint-2")
    assert plan_run(out, resume=checkpoint, overwrite=False, current=_record(max_steps=4)).resume == checkpoint
    assert plan_run(tmp_path / "fresh", resume=checkpoint, overwrite=False, current=_record()).run_id == run["run_id"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    with pytest.raises(RunDirError, match="is not empty and is not that checkpoint's run"):
        plan_run(busy, resume=checkpoint, overwrite=False, current=_record())
    with pytest.raises(RunDirError, match="no such checkpoint directory"):
        plan_run(out, resume=str(out / "checkpoint-9"), overwrite=False, current=_record())
    with pytest.raises(RunDirError, match="holds files but no fastrlhf run"):
        plan_run(busy, resume="auto", overwrite=False, current=_record())


def test_a_directory_of_an_older_version_is_compared_on_its_trainer_config(tmp_path):
    from fastrlhf.trainers.run_dir import RunDirError, plan_run

    old = _record(max_steps=4)["config"]
    old.pop("overwrite_output_dir")  # an option the older version did not have
    (tmp_path / "trainer_config.json").write_text(json.dumps(old))
    assert plan_run(tmp_path, resume="auto", overwrite=False, current=_record(max_steps=6)).resume == "auto"
    with pytest.raises(RunDirError, match="--weight-decay: 0.0 -> 0.1"):
        plan_run(tmp_path, resume="auto", overwrite=False, current=_record(max_steps=4, weight_decay=0.1))


def test_resume_with_another_model_setting_is_refused(tmp_path):
    """The model is part of the run: here the LoRA rank (the trainer compares the RoleModel)."""
    from fastrlhf.distributed import DistContext
    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_llama, tiny_tokenizer
    from fastrlhf.trainers.run_dir import RunDirError
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    for lora_r, resume in ((4, None), (8, "auto")):
        model = RoleModel(tiny_llama(vocab_size=len(tokenizer), seed=0), roles=("policy",), lora_r=lora_r)
        config = SFTConfig(output_dir=str(tmp_path), batch_size=4, max_steps=2, save_steps=2, backend="torch",
                           progress=False, max_length=32, save_final=False, resume=resume)
        trainer = SFTTrainer(model, tokenizer, config, sft_records(), ctx=DistContext())
        if resume is None:
            trainer.train()
    with pytest.raises(RunDirError, match="model lora_r: 4 -> 8"):
        trainer.train()


def test_a_checkpoint_of_an_older_version_resumes_at_its_batch_position_with_a_warning(tmp_path):
    """Older checkpoints counted batches (consumed_batches, epoch, batch_in_epoch) of a batch size
    they did not record: read with this run's batch size, and said so."""
    records = sft_records(16)
    _recording_sft_trainer(tmp_path, records, batch_size=2, max_steps=3, save_steps=3).train()
    state_file = tmp_path / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    old = {k: v for k, v in state.items() if k != "data"}
    torch.save(dict(old, consumed_batches=3, epoch=0, batch_in_epoch=3), state_file)
    reseal_manifest(state_file)
    resumed = _recording_sft_trainer(tmp_path, records, batch_size=2, max_steps=4, resume="auto")
    with pytest.warns(UserWarning, match="written by an older fastrlhf that counted batches.*batch_size=2"):
        resumed.train()
    order = resumed.ctx.shard_epoch(range(16), seed=0, epoch=0)
    assert resumed.seen == [tuple(resumed.train_examples[i]["input_ids"]) for i in order[6:8]]
