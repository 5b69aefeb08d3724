"""The README's "Coming from TRL" scripts (fastrlhf side: Python and command line, DPO and GRPO) run
as written, on a tiny local model instead of the hub id, with tiny data files; then their outputs
are where the README says."""
from __future__ import annotations

import json
import re
import runpy
import shlex
from pathlib import Path

import pytest
import torch

import fastrlhf
from fastrlhf.testing import save_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def readme_blocks() -> dict[str, str]:
    """{name: code} of the fenced blocks that follow a `<!-- readme-run: name -->` line."""
    pattern = re.compile(r"<!-- readme-run: ([\w-]+) -->\n```\w+\n(.*?)```", re.S)
    return {name: code for name, code in pattern.findall(README.read_text())}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    import datasets

    model = save_tiny_model(tmp_path / "tiny")
    pairs = [{"prompt": "say yes", "chosen": "yes", "rejected": "no no"},
             {"prompt": "the cat is", "chosen": "small .", "rejected": "the dog"},
             {"prompt": "what is the sun ?", "chosen": "the sun is big .", "rejected": "a fish"},
             {"prompt": "say no", "chosen": "no", "rejected": "yes yes yes"}]
    prompts = [{"prompt": "say yes", "answer": "yes"}, {"prompt": "say no", "answer": "no"},
               {"prompt": "what is the sun ?", "answer": "big"}, {"prompt": "the cat is", "answer": "small"}]
    for name, rows in (("pairs", pairs), ("prompts", prompts)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    torch.set_num_threads(1)
    with fastrlhf.use_backend("torch"):
        yield tmp_path, model


def run_python(code: str, model: str, path: Path) -> None:
    assert HUB_ID in code
    path.write_text(code.replace(HUB_ID, model))
    runpy.run_path(str(path), run_name="__main__")


def run_cli(code: str, model: str) -> None:
    from fastrlhf.train import main

    argv = shlex.split(code.replace("\\\n", " ").replace(HUB_ID, model))
    assert argv[:3] == ["python", "-m", "fastrlhf.train"], argv
    assert main(argv[3:]) == 0


def test_readme_has_the_four_scripts():
    assert set(readme_blocks()) == {"dpo-python", "dpo-cli", "grpo-python", "grpo-cli"}


def test_readme_dpo_scripts_run(workdir):
    tmp_path, model = workdir
    blocks = readme_blocks()
    run_python(blocks["dpo-python"], model, tmp_path / "dpo.py")
    out = tmp_path / "SmolLM2-DPO"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert len([r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]) == 2
    out.rename(tmp_path / "from-python")  # the command line is the other way to the same run, in the same directory
    run_cli(blocks["dpo-cli"], model)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 and (out / "merged" / "config.json").is_file()


def test_readme_grpo_scripts_run(workdir):
    tmp_path, model = workdir
    blocks = readme_blocks()
    run_python(blocks["grpo-python"], model, tmp_path / "grpo.py")
    out = tmp_path / "SmolLM2-GRPO"
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2] and len(samples[0]["samples"]) == 4
    # the command line reads the same reward functions from rewards.py
    code = blocks["grpo-python"]
    (tmp_path / "rewards.py").write_text(code[code.index("def reward_len"):code.index("args =")])
    out.rename(tmp_path / "from-python")
    run_cli(blocks["grpo-cli"], model)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "reward" in summary["metrics"]
