"""Fault injection on the command line (issue 13): reused output directories, changed options on
resume, damaged checkpoints and logs, bad data, and processes killed at random moments (SIGKILL in
a step, in the middle of a checkpoint, in the middle of a metrics line; SIGINT). Each ends either
exactly where an uninterrupted run ends or in one clear line naming the problem (exit status 2,
no traceback). Tiny model from `fastrlhf.testing.save_tiny_model`, torch backend, CPU.

Most runs call `fastrlhf.train.main` in-process (a few seconds each); the kills run the real
module in a subprocess (`python -m fastrlhf.train`, or a wrapper that injects the fault and then
calls main). The whole file is sized for CI: under 2 minutes on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from fastrlhf import use_backend
from fastrlhf.train import main

WORDS = "red green blue black white cat dog bird fish sun moon one two three four five".split()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    import torch

    from fastrlhf.testing import save_tiny_model

    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "tiny")
    rows = [{"prompt": f"say {w}", "completion": f"{w} {WORDS[(i * 5) % len(WORDS)]}"} for i, w in enumerate(WORDS)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only wait for each other on a busy 2-core machine
    yield root
    torch.set_num_threads(threads)


def sft_argv(work, out, *extra):
    return ["sft", "--model", work / "tiny", "--data", work / "sft.jsonl", "--batch-size", 2, "--output-dir", out,
            "--backend", "torch", "--no-progress", "--lr-schedule", "constant", *extra]


def run_cli(argv, capsys):
    """main(argv) in this process -> (exit status, stderr)."""
    with use_backend("torch"):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, capsys.readouterr().err


def snapshot(directory) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def metrics_steps(out) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


def assert_one_line_error(status, err, *fragments):
    assert status == 2, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------- reused directories (cases 1, 2)
def test_resume_auto_with_another_configuration_is_refused_and_lists_the_differences(work, tmp_path, capsys):
    """Case 1: run B (other learning rate) with --resume auto in run A's directory used to exit 0
    after 0 steps, reporting A's 4 steps, with A's weights."""
    out = tmp_path / "D"
    assert run_cli(sft_argv(work, out, "--max-steps", 4, "--save-steps", 2), capsys)[0] == 0
    before = snapshot(out)
    status, err = run_cli(sft_argv(work, out, "--max-steps", 3, "--learning-rate", 1e-3, "--resume", "auto"), capsys)
    assert_one_line_error(status, err, "holds a different run", "--learning-rate: 0.0001 -> 0.001")
    assert snapshot(out) == before  # nothing of A was touched

    # the same run with a larger --max-steps is allowed: it continues from checkpoint-4
    status, err = run_cli(sft_argv(work, out, "--max-steps", 6, "--save-steps", 2, "--resume", "auto"), capsys)
    assert status == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    # ... but not below the checkpoint's step
    status, err = run_cli(sft_argv(work, out, "--max-steps", 3, "--resume", "auto"), capsys)
    assert_one_line_error(status, err, "--max-steps 3", "step 6")


def test_a_new_run_refuses_a_used_output_dir_and_overwrite_replaces_the_old_run(work, tmp_path, capsys):
    """Case 2: run B (no --resume) in A's directory with --save-steps 1 --save-total-limit 1 used
    to replace A's adapters and metrics silently, and B's own checkpoints were deleted as soon as
    written because A's checkpoint-4 counted as the newest."""
    out = tmp_path / "D"
    assert run_cli(sft_argv(work, out, "--max-steps", 4, "--save-steps", 2), capsys)[0] == 0
    before = snapshot(out)
    b_argv = sft_argv(work, out, "--max-steps", 3, "--save-steps", 1, "--save-total-limit", 1, "--learning-rate", 1e-3)
    status, err = run_cli(b_argv, capsys)
    assert_one_line_error(status, err, "is not empty", "--resume auto", "--overwrite-output-dir")
    assert snapshot(out) == before

    (out / "notes.txt").write_text("mine")  # not written by fastrlhf: survives the overwrite
    status, err = run_cli([*b_argv, "--overwrite-output-dir"], capsys)
    assert status == 0, err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # B's newest, A's gone
    assert metrics_steps(out) == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["learning_rate"] == 1e-3
    assert json.loads((out / "checkpoint-3" / "run.json").read_text())["run_id"] == run["run_id"]


def test_each_stage_has_its_own_default_output_dir(work, tmp_path, capsys, monkeypatch):
    """Issue 12: `sft` then `dpo` without --output-dir wrote into the same directory (the DPO
    adapter and merged/ replaced the SFT ones)."""
    monkeypatch.chdir(tmp_path)
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": w, "rejected": "no"}) + "\n" for w in WORDS))
    common = ["--model", work / "tiny", "--batch-size", 2, "--max-steps", 1, "--backend", "torch", "--no-progress"]
    assert run_cli(["sft", "--data", work / "sft.jsonl", *common], capsys)[0] == 0
    sft_files = snapshot(tmp_path / "fastrlhf-output" / "sft")
    assert run_cli(["dpo", "--data", pairs, *common, "--model", tmp_path / "fastrlhf-output" / "sft" / "merged"],
                   capsys)[0] == 0
    assert snapshot(tmp_path / "fastrlhf-output" / "sft") == sft_files
    assert (tmp_path / "fastrlhf-output" / "dpo" / "merged" / "config.json").is_file()
    # and the same stage twice refuses to overwrite its own default directory
    status, err = run_cli(["sft", "--data", work / "sft.jsonl", *common], capsys)
    assert_one_line_error(status, err, "fastrlhf-output/sft", "is not empty")


# ----------------------------------------------------------------------------- checks before the model loads (case 11)
@pytest.mark.parametrize("case", ["not_a_dataset_dir", "non_utf8", "output_dir_not_creatable", "resume_missing",
                                  "resume_damaged"])
def test_user_mistakes_are_one_line_before_the_model_loads(work, tmp_path, capsys, case):
    """--model points nowhere: an error about the model would mean the check came too late."""
    out, data = tmp_path / "out", work / "sft.jsonl"
    extra: list = []
    if case == "not_a_dataset_dir":
        data = tmp_path / "folder"
        data.mkdir()
        (data / "notes.txt").write_text("not data")
        expected = [f"--data: {data}: not a dataset directory"]
    elif case == "non_utf8":
        data = tmp_path / "latin1.jsonl"
        data.write_bytes((work / "sft.jsonl").read_bytes() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
        expected = [f"--data: {data}: line {len(WORDS) + 1}, column 16: not UTF-8 (byte 0xe9)"]
    elif case == "output_dir_not_creatable":
        out = work / "sft.jsonl" / "out"  # below a file
        expected = ["--output-dir: cannot create or write", "Not a directory"]
    elif case == "resume_missing":
        extra = ["--resume", tmp_path / "nowhere" / "checkpoint-4"]
        expected = ["no such checkpoint directory"]
    else:
        done = tmp_path / "done"
        assert run_cli(sft_argv(work, done, "--max-steps", 2, "--save-steps", 2), capsys)[0] == 0
        optimizer = done / "checkpoint-2" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
        extra = ["--resume", done / "checkpoint-2"]
        expected = [f"{optimizer}: 100 bytes, the manifest says"]
    argv = sft_argv(work, out, *extra)
    argv[argv.index("--data") + 1] = data
    argv[argv.index("--model") + 1] = tmp_path / "no-model-here"
    status, err = run_cli(argv, capsys)
    assert_one_line_error(status, err, *expected)


def test_identical_preference_pairs_are_warned_and_dropped_on_request(work, tmp_path, capsys):
    """Case 9: pairs with chosen == rejected trained at loss 0.6931 with zero gradient, no warning."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"say {w}", "chosen": w, "rejected": w if i % 2 else "no"} for i, w in enumerate(WORDS)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["rm", "--model", work / "tiny", "--data", pairs, "--batch-size", 2, "--max-steps", 1, "--backend", "torch",
            "--no-progress"]
    with pytest.warns(UserWarning, match=r"8 of 16 pairs have chosen == rejected"):
        assert run_cli([*argv, "--output-dir", tmp_path / "kept"], capsys)[0] == 0
    with pytest.warns(UserWarning, match=r"8 of 16 pairs have chosen == rejected .*they were dropped"):
        assert run_cli([*argv, "--output-dir", tmp_path / "dropped", "--drop-identical-pairs"], capsys)[0] == 0
    run = json.loads((tmp_path / "dropped" / "run.json").read_text())
    assert run["config"]["drop_identical_pairs"] is True


# ----------------------------------------------------------------------------- reused directory, new batch size
def test_resume_with_another_batch_size_ends_the_epoch_on_the_last_example(work, tmp_path, capsys):
    """Case 3 on the command line: 3 steps of batch 2 (6 of 16 examples), then the rest of the
    epoch with batch 4: 10 examples in 3 steps (4, 4, 2), the epoch ends at 1.0, not before."""
    out = tmp_path / "D"
    assert run_cli(sft_argv(work, out, "--max-steps", 3, "--save-steps", 3), capsys)[0] == 0
    argv = sft_argv(work, out, "--max-steps", 0, "--resume", "auto")
    argv[argv.index("--batch-size") + 1] = 4
    status, err = run_cli(argv, capsys)
    assert status == 0, err
    with open(out / "metrics.jsonl") as f:
        epochs = [(r["step"], r["epoch"]) for r in map(json.loads, f) if "loss" in r]
    assert epochs == [(1, 0.125), (2, 0.25), (3, 0.375), (4, 0.625), (5, 0.875), (6, 1.0)]


# ----------------------------------------------------------------------------- damaged checkpoints (cases 5, 10)
@pytest.mark.parametrize("damage", ["truncated_model", "flipped_optimizer_byte", "planted_pickle"])
def test_auto_resume_skips_a_damaged_newest_checkpoint_and_ends_like_the_uninterrupted_run(work, tmp_path, capsys,
                                                                                            damage):
    import torch

    out = tmp_path / "D"
    argv = sft_argv(work, out, "--max-steps", 4, "--save-steps", 2, "--no-save-merged")
    assert run_cli(argv, capsys)[0] == 0
    final = (out / "role-policy.safetensors").read_bytes()
    newest = out / "checkpoint-4"
    if damage == "truncated_model":
        name = "model.safetensors"
        (newest / name).write_bytes((newest / name).read_bytes()[:-64])
    elif damage == "flipped_optimizer_byte":
        name = "optimizer.pt"
        data = bytearray((newest / name).read_bytes())
        data[len(data) // 3] ^= 0x01
        (newest / name).write_bytes(bytes(data))
    else:
        name, flag = "rng_state.pt", tmp_path / "pwned"

        class RunsCode:
            def __reduce__(self):
                return (os.system, (f"touch {flag}",))

        torch.save([RunsCode()], newest / name)
        from test_resume import reseal_manifest

        reseal_manifest(newest / name)  # sizes and checksums match: only weights_only=True stops it
    with pytest.warns(UserWarning, match=rf"skipping checkpoint-4: {newest / name}"):
        status, err = run_cli([*argv, "--resume", "auto"], capsys)
    assert status == 0, err
    assert (out / "role-policy.safetensors").read_bytes() == final  # steps 3, 4 redone from checkpoint-2
    assert metrics_steps(out) == [1, 2, 3, 4]
    if damage == "planted_pickle":
        assert not flag.exists()


# ----------------------------------------------------------------------------- processes killed at random moments
WRAPPER = r'''
"""python wrapper.py FAULT FLAG ARGV...: fastrlhf.train.main(ARGV) with one fault injected.
checkpoint:S  hang (to be killed) inside the save of checkpoint-S, after its model file was written
log:S         write half of step S's metrics line, then hang
slow:SECONDS  every training step lasts SECONDS longer, so that a signal lands inside the run
none          no fault"""
import json, os, sys, time

fault, flag, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
kind, _, arg = fault.partition(":")


def hang():
    open(flag, "w").close()
    time.sleep(600)


if kind == "checkpoint":
    import fastrlhf.checkpoint as checkpoint

    real_save = checkpoint._torch_save

    def save(obj, path):
        if path.name == checkpoint.OPTIMIZER_FILE and path.parent.name.startswith(f".tmp-checkpoint-{arg}-"):
            hang()
        real_save(obj, path)

    checkpoint._torch_save = save
elif kind == "log":
    from fastrlhf.trainers import metrics_log

    real_append = metrics_log.append_line

    def append(fd, line):
        record = json.loads(line)
        if record.get("step") == int(arg) and "loss" in record:
            os.write(fd, line.encode()[: len(line) // 2])
            hang()
        real_append(fd, line)

    metrics_log.append_line = append
elif kind == "slow":
    from fastrlhf.trainers.base import Trainer

    real_step = Trainer.training_step

    def step(self):
        metrics = real_step(self)
        time.sleep(float(arg))
        return metrics

    Trainer.training_step = step

from fastrlhf.train import main

sys.exit(main(argv))
'''


def child_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRLHF_BACKEND="torch", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def logged_steps(out) -> list[int]:
    """Steps with a loss in metrics.jsonl, tolerating a torn line (a run may be writing it)."""
    steps = []
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "loss" in record:
                    steps.append(record["step"])
    except FileNotFoundError:
        pass
    return steps


def wait_until(condition, process, what, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (rc={process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {timeout}s")
        time.sleep(0.02)


def test_runs_killed_at_random_moments_end_bit_identical_to_an_uninterrupted_run(work, tmp_path):
    """One run killed four times, each resumed with the same command and --resume auto: SIGKILL
    in the middle of a checkpoint, SIGKILL in the middle of a metrics line, SIGKILL at a random
    moment of a step, SIGINT (Ctrl-C) at a random step; then it finishes. CPU, fp32: its final
    adapter and every logged loss equal the uninterrupted run's, bit for bit.
    FASTRLHF_FAULT_SEED picks other kill points (default 0)."""
    import random
    import signal

    from fastrlhf.checkpoint import latest_intact_checkpoint

    rng = random.Random(int(os.environ.get("FASTRLHF_FAULT_SEED", "0")))
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    argv = [str(a) for a in sft_argv(work, "OUT", "--max-steps", 10, "--save-steps", 2, "--lr-schedule", "cosine",
                                     "--warmup-ratio", 0.2, "--no-save-merged")]

    def command(out, fault=None, resume=True):
        args = [a if a != "OUT" else str(out) for a in argv] + (["--resume", "auto"] if resume else [])
        prefix = [str(wrapper), fault, str(tmp_path / "hanging.flag")] if fault else ["-m", "fastrlhf.train"]
        return [sys.executable, *prefix, *args]

    def start(out, fault, resume=True):
        (tmp_path / "hanging.flag").unlink(missing_ok=True)
        return subprocess.Popen(command(out, fault, resume), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def killed(process, sig=signal.SIGKILL):
        process.send_signal(sig)
        output = process.communicate(timeout=60)[0]
        return process.returncode, output

    def resumes_from(out):
        path = latest_intact_checkpoint(out)
        return 0 if path is None else int(path.name.split("-")[1])

    reference = subprocess.run(command(tmp_path / "reference", resume=False), env=child_env(), capture_output=True,
                               text=True, timeout=300)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    out = tmp_path / "run"
    flag_seen = lambda: (tmp_path / "hanging.flag").exists()  # noqa: E731

    # 1. SIGKILL while checkpoint-c is half written: the temp dir is never loaded
    c = rng.choice([4, 6])
    process = start(out, f"checkpoint:{c}", resume=False)
    wait_until(flag_seen, process, f"the save of checkpoint-{c}")
    assert killed(process)[0] == -signal.SIGKILL
    assert resumes_from(out) == c - 2 and not (out / f"checkpoint-{c}").exists()

    # 2. SIGKILL in the middle of step l's metrics line: the torn line is skipped on the next resume
    log_step = rng.randint(c - 1, 8)
    process = start(out, f"log:{log_step}")
    wait_until(flag_seen, process, f"the metrics line of step {log_step}")
    assert killed(process)[0] == -signal.SIGKILL
    with open(out / "metrics.jsonl", "rb") as f:
        assert not f.read().endswith(b"\n")  # really torn

    # 3. SIGKILL at a random moment once step k was logged
    k = rng.randint(log_step, 9)
    start_step = resumes_from(out)
    process = start(out, "slow:0.3")
    wait_until(lambda: max(logged_steps(out), default=0) >= max(k, start_step + 1), process, f"step {k}")
    code, output = killed(process)
    assert code == -signal.SIGKILL, output
    assert "line" in output and "is not valid JSON (a torn write?): skipped" in output  # the torn line of fault 2

    # 4. Ctrl-C at a random step: the step finishes, a checkpoint is saved, exit 130 without a traceback
    k2 = rng.randint(k, 9)
    start_step = resumes_from(out)
    process = start(out, "slow:0.3")
    wait_until(lambda: max(logged_steps(out), default=0) >= max(k2, start_step + 1), process, f"step {k2}")
    code, output = killed(process, signal.SIGINT)
    assert code == 130 and "Traceback" not in output and "--resume auto continues" in output, output
    stopped = resumes_from(out)
    assert stopped >= max(k2, start_step + 1) and stopped == max(logged_steps(out))

    # 5. the same command to the end
    final = subprocess.run(command(out), env=child_env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    reference_adapter = (tmp_path / "reference" / "role-policy.safetensors").read_bytes()
    assert (out / "role-policy.safetensors").read_bytes() == reference_adapter
    with open(out / "metrics.jsonl") as f, open(tmp_path / "reference" / "metrics.jsonl") as g:
        got = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
        want = [(r["step"], r["loss"]) for r in map(json.loads, g) if "loss" in r]
    assert got == want and [s for s, _ in got] == list(range(1, 11))


def test_a_diverging_run_stops_with_one_line_and_exit_status_1(work, tmp_path, capsys, monkeypatch):
    """The non-finite guard's stop (K NaN steps in a row) is the user's to act on: its message,
    no traceback."""
    from fastrlhf.trainers.sft import SFTTrainer

    real = SFTTrainer.compute_loss
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda self, batch: (real(self, batch)[0] * float("nan"), {}))
    status, err = run_cli(sft_argv(work, tmp_path / "D", "--max-steps", 5, "--max-consecutive-nonfinite", 2), capsys)
    assert status == 1 and "Traceback" not in err, err
    assert "stopping: 2 non-finite steps in a row" in err and "lower the learning rate" in err
