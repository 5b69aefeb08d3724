"""`python -m fastrlhf.train sft` under torchrun with 2 CPU processes (gloo), DDP-style and --fsdp:
exit 0 (the process group is closed, no abort at exit), rank 0 alone writes summary.json and merged/,
and the merged policy saved from the FSDP shards equals the one saved without FSDP (same seed, data
and steps), and differs from the untrained base (the adapter was really merged); with --no-lora too
(full-model shards, tied embeddings, resume)."""
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
    from fastrlhf.testing import save_tiny_model

    root = tmp_path_factory.mktemp("cli_dist")
    save_tiny_model(root / "tiny")
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
    ddp_summary = torchrun_sft(workdir, "ddp")
    fsdp_summary = torchrun_sft(workdir, "fsdp", "--fsdp")
    # Rank 0's memory report: under FSDP each rank holds its shard of the base (about half here),
    # not one tensor (data_ptr() of every DTensor is 0, which the report used to dedup by).
    base_bytes = ddp_summary["memory_report"]["base"]["params_bytes"]
    assert 0.4 * base_bytes < fsdp_summary["memory_report"]["base"]["params_bytes"] < 0.75 * base_bytes
    base = merged_weights(workdir / "tiny")
    ddp = merged_weights(workdir / "ddp" / "merged")
    fsdp = merged_weights(workdir / "fsdp" / "merged")
    assert ddp.keys() == fsdp.keys() == base.keys()
    assert any(not torch.equal(ddp[k], base[k]) for k in base), "the merged policy equals the untrained base"
    for name in base:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_torchrun_fsdp_without_lora_saves_the_full_model_with_its_tied_weights(workdir):
    # full fine-tuning under FSDP2: every sharded (DTensor) weight reaches the merged model and the
    # checkpoints, the tied lm_head stays tied, and a resume re-shards the gathered weights
    torchrun_sft(workdir, "ddp_nolora", "--no-lora")
    torchrun_sft(workdir, "fsdp_nolora", "--fsdp", "--no-lora", "--save-steps", "1")
    base = merged_weights(workdir / "tiny")
    ddp = merged_weights(workdir / "ddp_nolora" / "merged")
    fsdp = merged_weights(workdir / "fsdp_nolora" / "merged")
    assert ddp.keys() == fsdp.keys() == base.keys()
    changed = [k for k in base if not torch.equal(ddp[k], base[k])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(base) // 2, changed
    for name in base:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert_tied(workdir / "fsdp_nolora" / "merged")

    from safetensors.torch import load_file

    saved = load_file(workdir / "fsdp_nolora" / "checkpoint-2" / "model.safetensors")
    assert sorted(saved) == sorted(f"policy/trunk.{k}" for k in base if k != "lm_head.weight")

    # resume from checkpoint-1: the same merged policy as the uninterrupted run
    import shutil

    shutil.rmtree(workdir / "fsdp_nolora" / "checkpoint-2")
    shutil.rmtree(workdir / "fsdp_nolora" / "merged")
    torchrun_sft(workdir, "fsdp_nolora", "--fsdp", "--no-lora", "--save-steps", "1", "--resume", "auto")
    resumed = merged_weights(workdir / "fsdp_nolora" / "merged")
    for name in base:
        torch.testing.assert_close(resumed[name], fsdp[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def assert_tied(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
