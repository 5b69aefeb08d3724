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
    from fastrlhf.testing import save_tiny_model

    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "tiny")
    rows = [{"prompt": f"say {w}", "completion": f"{w} {WORDS[(i * 5) % len(WORDS)]}"} for i, w in enumerate(WORDS)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


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
