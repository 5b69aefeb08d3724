"""`python -m fastrlhf.train sft` under torchrun with 2 CPU processes (gloo), DDP-style and --fsdp:
exit 0 (the process group is closed, no abort at exit), rank 0 alone writes summary.json and merged/,
and the merged policy saved from the FSDP shards equals the one saved without FSDP (same seed, data
and steps), and differs from the untrained base (the adapter was really merged)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SFT = [{"prompt": "say yes", "completion": "yes"}, {"prompt": "what is the sun ?", "completion": "the sun is big ."},
       {"prompt": "say no", "completion": "no"}, {"prompt": "the cat is", "completion": "small ."}]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from fastrlhf.testing import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli_dist")
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), tie=True)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT))
    return root


def torchrun(workdir, out, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FASTRLHF_BACKEND="torch", OMP_NUM_THREADS="1", FASTRLHF_DIST_TIMEOUT_MINUTES="2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastrlhf.train", "sft", "--model", str(workdir / "tiny"), "--data", str(workdir / "sft.jsonl"),
           "--max-steps", "2", "--batch-size", "1", "--learning-rate", "0.05", "--output-dir", str(workdir / out),
           "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def torchrun_sft(workdir, out, *extra):
    result = torchrun(workdir, out, *extra)
    report = f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    assert "terminate called" not in result.stderr, report
    assert "still referenced" not in result.stderr, report  # DistContext.close freed the group
    # one line each: only rank 0 prints the summary and writes the outputs
    assert result.stdout.count("merged policy saved to") == 1, report
    assert result.stdout.count("SFTTrainer: 2 steps") == 1, report
    summary = json.loads((workdir / out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert (workdir / out / "merged" / "config.json").is_file(), report
    return summary


def merged_weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_torchrun_sft_ddp_and_fsdp_save_the_same_merged_policy(workdir):
    torchrun_sft(workdir, "ddp")
    torchrun_sft(workdir, "fsdp", "--fsdp")
    base = merged_weights(workdir / "tiny")
    ddp = merged_weights(workdir / "ddp" / "merged")
    fsdp = merged_weights(workdir / "fsdp" / "merged")
    assert ddp.keys() == fsdp.keys() == base.keys()
    assert any(not torch.equal(ddp[k], base[k]) for k in base), "the merged policy equals the untrained base"
    for name in base:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_torchrun_fsdp_without_lora_is_refused_before_loading(workdir):
    # the full-model FSDP weights would be saved incompletely (see fastrlhf.train._run_stage)
    result = torchrun(workdir, "nolora", "--fsdp", "--no-lora")
    assert result.returncode != 0
    assert "--fsdp with --no-lora is not supported yet" in result.stderr, result.stderr
    assert not (workdir / "nolora").exists()
