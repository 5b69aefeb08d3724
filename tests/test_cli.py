"""`python -m fastrlhf.train`: options built from the config dataclasses, YAML merge, clear errors, and
each subcommand running 2 steps on a tiny random Llama (torch backend; the stages run in-process
through `fastrlhf.train.main`, one subprocess checks the real module entry point)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastrlhf import use_backend
from fastrlhf.cli import _fields, option_name, parse_args
from fastrlhf.options import DataOptions, ModelOptions, RewardOptions
from fastrlhf.train import commands, main

WORDS = "the cat is big . the dog is small . say yes or no . what is the sun ? the moon is white .".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random Llama + word-level ChatML tokenizer saved like a real model, and tiny datasets."""
    from fastrlhf.testing import save_tiny_model

    root = tmp_path_factory.mktemp("cli")
    save_tiny_model(root / "tiny")
    sft = [{"prompt": "say yes", "completion": "yes"}, {"prompt": "what is the sun ?", "completion": "the sun is big ."},
           {"prompt": "say no", "completion": "no"}, {"prompt": "the cat is", "completion": "small ."}]
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "the dog the dog"} for r in sft]
    prompts = [{"prompt": r["prompt"]} for r in sft]
    for name, rows in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "empty.jsonl").write_text("")
    (root / "reward.py").write_text(
        "def reward(prompts, completions, records):\n    return [float(c.count('yes')) for c in completions]\n")
    return root


def run_main(argv, capsys):
    """main(argv) -> (exit status, stderr)."""
    with use_backend("torch"):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, capsys.readouterr().err


def common(workdir, out, model=None):
    return ["--model", model or workdir / "tiny", "--output-dir", workdir / out, "--max-steps", 2,
            "--batch-size", 2, "--no-progress"]


# ------------------------------------------------------------------------------ --help


def test_module_entry_point_help():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastrlhf.train", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("sft", "rm", "dpo", "ppo", "grpo", "pipeline"):
        assert name in out.stdout
    assert "runs `pipeline`" in out.stdout


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo", "grpo", "pipeline"])
def test_help_lists_every_option_with_default(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    # argparse wraps lines (also at hyphens): compare with all whitespace removed
    text = "".join(capsys.readouterr().out.split())
    fields = _fields(commands()[name].option_classes)
    assert len(fields) > 10
    for _, f, kind in fields:
        option = option_name(f.name)
        assert option in text, option
        if kind is bool:
            assert f"--no-{f.name.replace('_', '-')}" in text
        help_text = "".join(f.metadata["help"].split())
        assert help_text and help_text in text, option
        default = f.default
        if default is None:
            shown = "none"
        elif isinstance(default, (bool, str)):
            shown = {True: "true", False: "false", "": '""'}.get(default, str(default))
        else:
            shown = str(default)
        assert f"{help_text}(default:{shown})" in text, option


def test_trainer_config_fields_all_reach_the_cli():
    from fastrlhf.trainers import PPOConfig, SFTConfig

    for config, command in ((SFTConfig, "sft"), (PPOConfig, "ppo")):
        names = {f.name for _, f, _ in _fields(commands()[command].option_classes)}
        assert set(config.__dataclass_fields__) <= names


# ------------------------------------------------------------------------------ parsing, YAML merge


def parse(argv):
    from fastrlhf.cli import build_parser

    return parse_args(build_parser(commands()), argv, default_command="pipeline")


def test_defaults_and_command_line_values():
    from fastrlhf.trainers import SFTConfig

    command, options = parse(["sft", "--learning-rate", "3e-4", "--no-lora", "--data", "x.jsonl"])
    assert command == "sft"
    assert options[SFTConfig].learning_rate == 3e-4 and options[SFTConfig].batch_size == SFTConfig().batch_size
    assert options[ModelOptions].lora is False and options[ModelOptions].lora_r == 16
    assert options[DataOptions].data == "x.jsonl"


def test_no_subcommand_means_pipeline():
    from fastrlhf.pipeline import PipelineOptions

    assert parse([])[0] == "pipeline"
    command, options = parse(["--output-dir", "elsewhere", "--seed", "3"])
    assert command == "pipeline"
    assert options[PipelineOptions].output_dir == "elsewhere" and options[PipelineOptions].seed == 3


def test_yaml_config_merged_under_command_line(tmp_path):
    from fastrlhf.trainers import PPOConfig

    config = tmp_path / "ppo.yaml"
    # 1e-5 without a dot is a *string* in YAML 1.1: it must still become a float
    config.write_text("learning-rate: 1e-5\nbatch_size: 4\nkl_coef: 0.2\nadaptive_kl: true\nreward_fn: m:f\n")
    _, options = parse(["ppo", "--config", str(config), "--batch-size", "2"])
    cfg = options[PPOConfig]
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.batch_size == 2  # command line wins
    assert cfg.kl_coef == 0.2 and cfg.adaptive_kl is True
    assert options[RewardOptions].reward_fn == "m:f"


# Options typed `X | None` (None = off / unset), and the values older versions wrote for "unset".
NONE_OPTIONS = {  # option -> (class, a value that is not None, as typed and as parsed)
    "clip_eps_high": ("PPOConfig", "0.28", 0.28),
    "dual_clip": ("PPOConfig", "3", 3.0),
    "save_total_limit": ("PPOConfig", "2", 2),
    "resume": ("PPOConfig", "auto", "auto"),
    "gguf_file": (ModelOptions, "m.gguf", "m.gguf"),
    "attn_implementation": (ModelOptions, "eager", "eager"),
    "reference_device": (ModelOptions, "cpu", "cpu"),
    "eval_data": (DataOptions, "e.jsonl", "e.jsonl"),
    "reward_fn": (RewardOptions, "m:f", "m:f"),
}


def _option_class(cls):
    from fastrlhf import trainers

    return getattr(trainers, cls) if isinstance(cls, str) else cls


@pytest.mark.parametrize("none_word", ["none", "null", "None", "NULL"])
def test_optional_options_take_none_on_the_command_line(none_word):
    _, defaults = parse(["ppo"])
    argv, none_argv = ["ppo"], ["ppo"]
    for name, (cls, text, _) in NONE_OPTIONS.items():
        assert getattr(defaults[_option_class(cls)], name) is None, name  # the default is off
        argv += [option_name(name), text]
        none_argv += [option_name(name), none_word]
    _, options = parse(argv)
    _, none_options = parse(none_argv)
    for name, (cls, _, value) in NONE_OPTIONS.items():
        parsed = getattr(options[_option_class(cls)], name)
        assert parsed == value and type(parsed) is type(value), name
        assert getattr(none_options[_option_class(cls)], name) is None, name


def test_optional_options_take_null_in_yaml(tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text("clip_eps_high: null\ndual-clip: ~\nsave_total_limit: none\nresume: null\n"
                      "gguf_file: NULL\nreward_fn: m:f\n")
    _, options = parse(["ppo", "--config", str(config), "--reference-device", "none"])
    from fastrlhf.trainers import PPOConfig

    cfg = options[PPOConfig]
    assert cfg.clip_eps_high is None and cfg.dual_clip is None and cfg.save_total_limit is None and cfg.resume is None
    assert options[ModelOptions].gguf_file is None and options[ModelOptions].reference_device is None

    config.write_text("clip_eps_high: 0.28\ndual_clip: 3\nsave_total_limit: 2\nresume: auto\n")
    _, options = parse(["ppo", "--config", str(config), "--dual-clip", "none"])  # the command line wins
    cfg = options[PPOConfig]
    assert cfg.clip_eps_high == 0.28 and cfg.save_total_limit == 2 and cfg.resume == "auto"
    assert cfg.dual_clip is None


def test_unset_values_of_older_versions_read_as_none(tmp_path):
    """0 for the clip options and save_total_limit, "" for strings: what older configs (and the
    trainer_config.json of older runs) say for "unset"; they keep their meaning."""
    config = tmp_path / "old.yaml"
    config.write_text('clip_eps_high: 0\ndual_clip: 0.0\nsave_total_limit: 0\nresume: ""\n'
                      'gguf_file: ""\nattn_implementation: ""\nreference_device: ""\neval_data: ""\nreward_model: ""\n')
    _, options = parse(["ppo", "--config", str(config), "--reward-fn", ""])
    from fastrlhf.trainers import PPOConfig

    cfg = options[PPOConfig]
    assert (cfg.clip_eps_high, cfg.dual_clip, cfg.save_total_limit, cfg.resume) == (None, None, None, None)
    model = options[ModelOptions]
    assert (model.gguf_file, model.attn_implementation, model.reference_device) == (None, None, None)
    assert options[DataOptions].eval_data is None
    assert options[RewardOptions].reward_model is None and options[RewardOptions].reward_fn is None


def test_trainer_config_json_of_a_run_is_a_valid_config_file(tmp_path):
    from fastrlhf.trainers import PPOConfig

    written = PPOConfig(output_dir=str(tmp_path / "run"), clip_eps_high=0.3, kl_coef=0.1)
    config = tmp_path / "trainer_config.json"
    config.write_text(json.dumps(written.to_dict(), indent=2))  # what Trainer.train() writes
    _, options = parse(["ppo", "--config", str(config)])
    assert options[PPOConfig] == written and options[PPOConfig].dual_clip is None


@pytest.mark.parametrize("yaml_text, message", [
    ("learning_rat: 0.1\n", "unknown option 'learning_rat' (did you mean --learning-rate?)"),
    ("batch_size: many\n", "option 'batch_size': expected int, got 'many'"),
    ("adaptive_kl: maybe\n", "option 'adaptive_kl': expected true or false"),
    ("batch_size: 0\n", "--batch-size: batch_size must be an integer >= 1, got 0"),
    ("- a\n- b\n", "expected a mapping"),
    ("batch_size: null\n", "option 'batch_size': expected int, got None"),  # None only where the type allows it
    ("dual_clip: many\n", "option 'dual_clip': expected float, got 'many'"),
    ("clip_eps_high: -1\n", "--clip-eps-high: clip_eps_high must be a finite number > 0, got -1"),
])
def test_yaml_errors_name_the_option(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    status, err = run_main(["ppo", "--config", config], capsys)
    assert status == 2 and message in err


@pytest.mark.parametrize("argv, message", [
    (["sft", "--bogus", "1"], "unknown option --bogus"),
    (["sft", "--learning-rat", "1"], "unknown option --learning-rat (did you mean --learning-rate?)"),
    (["sft", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["sft", "--batch-size", "0"], "--batch-size: batch_size must be an integer >= 1, got 0"),
    (["dpo", "--loss-type", "nope"], "--loss-type: loss_type must be one of"),
    (["pipeline", "--samples-per-prompt", "1"], "--samples-per-prompt: samples_per_prompt must be an integer >= 2"),
    (["sft"], "--data is required for sft"),
    (["sft", "--data", "missing.jsonl"], "--data: dataset file 'missing.jsonl' does not exist"),
    (["sft", "--config", "missing.yaml"], "--config: file 'missing.yaml' does not exist"),
    (["ppo", "--clip-eps-high", "x"], "argument --clip-eps-high: invalid float value: 'x'"),
    (["ppo", "--clip-eps-high", "-0.1"], "--clip-eps-high: clip_eps_high must be a finite number > 0, got -0.1"),
    (["ppo", "--dual-clip", "0.5"], "--dual-clip: dual_clip must be a finite number > 1, got 0.5"),
    (["ppo", "--save-total-limit", "-1"], "--save-total-limit: save_total_limit must be an integer >= 1, got -1"),
    (["ppo", "--batch-size", "none"], "argument --batch-size: invalid int value: 'none'"),  # not an X | None option
])
def test_bad_options_fail_before_loading_anything(argv, message, capsys):
    status, err = run_main(argv, capsys)
    assert status == 2
    assert message in err


def test_objective_options(capsys):
    """Issue 11: the objectives are selectable from the command line, bad names listed."""
    from fastrlhf.trainers import GRPOConfig, PPOConfig

    _, options = parse(["grpo", "--loss-type", "gspo", "--advantage-estimator", "rloo", "--is-correction",
                        "token_truncate", "--is-clip-max", "3", "--top-entropy-quantile", "0.2"])
    cfg = options[GRPOConfig]
    assert (cfg.loss_type, cfg.advantage_estimator, cfg.is_correction, cfg.is_clip_max,
            cfg.top_entropy_quantile) == ("gspo", "rloo", "token_truncate", 3.0, 0.2)
    _, options = parse(["ppo", "--loss-type", "cispo", "--is-correction", "sequence_mask"])
    assert options[PPOConfig].loss_type == "cispo" and options[PPOConfig].is_correction == "sequence_mask"
    for argv, message in ((["grpo", "--loss-type", "gpo"], "--loss-type: loss_type must be one of ('ppo', 'gspo'"),
                          (["grpo", "--advantage-estimator", "gae"], "--advantage-estimator: advantage_estimator must"),
                          (["ppo", "--is-correction", "tis2"], "--is-correction: is_correction must be one of"),
                          (["grpo", "--loss-type", "sapo", "--dual-clip", "3"], "dual_clip applies to loss_type ppo")):
        status, err = run_main(argv, capsys)
        assert status == 2 and message in err, err


def test_grpo_runs_with_the_new_objectives_from_the_cli(workdir, capsys):
    status, err = run_main(["grpo", "--data", workdir / "prompts.jsonl", "--reward-fn", f"{workdir / 'reward.py'}:reward",
                            "--group-size", 2, "--max-new-tokens", 4, "--no-save-merged", "--loss-type", "gspo",
                            "--advantage-estimator", "rloo", "--is-correction", "sequence_truncate",
                            "--top-entropy-quantile", "0.5", *common(workdir, "grpo-objectives")], capsys)
    assert status == 0, err
    metrics = json.loads((workdir / "grpo-objectives" / "summary.json").read_text())["metrics"]
    assert "is_weight_mean" in metrics and "entropy_kept_frac" in metrics


def test_data_and_reward_errors(workdir, capsys):
    status, err = run_main(["sft", "--data", workdir / "empty.jsonl"], capsys)
    assert status == 2 and "--data:" in err and "empty" in err
    status, err = run_main(["sft", "--data", workdir / "pairs.jsonl"], capsys)
    assert status == 2 and "has no column 'completion'" in err
    status, err = run_main(["rm", "--data", workdir / "sft.jsonl"], capsys)
    assert status == 2 and "has no column 'chosen'" in err
    status, err = run_main(["ppo", "--data", workdir / "prompts.jsonl"], capsys)
    assert status == 2 and "give a reward: --reward-model DIR" in err
    status, err = run_main(["grpo", "--data", workdir / "prompts.jsonl", "--reward-fn", "nomodule_xyz:f"], capsys)
    assert status == 2 and "--reward-fn: cannot import module 'nomodule_xyz'" in err
    status, err = run_main(["grpo", "--data", workdir / "prompts.jsonl", "--reward-fn", "fastrlhf.demo:nope"], capsys)
    assert status == 2 and "has no attribute 'nope'" in err
    status, err = run_main(["ppo", "--data", workdir / "prompts.jsonl", "--reward-model", workdir], capsys)
    assert status == 2 and "not a directory written by `fastrlhf.train rm`" in err
    status, err = run_main(["sft", "--data", workdir / "sft.jsonl", "--model", workdir / "no-such-model"], capsys)
    assert status == 2 and "--model:" in err


# ------------------------------------------------------------------------------ every stage, 2 steps


def test_every_stage_runs_two_steps(workdir, capsys):
    status, err = run_main(["sft", "--data", workdir / "sft.jsonl", *common(workdir, "sft")], capsys)
    assert status == 0, err
    merged = workdir / "sft" / "merged"
    assert (merged / "config.json").is_file()
    summary = json.loads((workdir / "sft" / "summary.json").read_text())
    assert summary["steps"] == 2

    assert run_main(["rm", "--data", workdir / "pairs.jsonl", "--eval-data", workdir / "pairs.jsonl",
                     *common(workdir, "rm", merged)], capsys)[0] == 0
    rm_summary = json.loads((workdir / "rm" / "summary.json").read_text())
    assert rm_summary["steps"] == 2 and "eval/accuracy" in rm_summary["eval"]
    assert (workdir / "rm" / "role-reward.safetensors").is_file()

    assert run_main(["dpo", "--data", workdir / "pairs.jsonl", "--no-save-merged", *common(workdir, "dpo", merged)],
                    capsys)[0] == 0
    assert not (workdir / "dpo" / "merged").exists()

    # the reward model must come with matching LoRA settings
    status, err = run_main(["ppo", "--data", workdir / "prompts.jsonl", "--reward-model", workdir / "rm",
                            "--lora-r", 8, *common(workdir, "ppo", merged)], capsys)
    assert status == 2 and "pass --lora-r 16" in err
    status, err = run_main(["ppo", "--data", workdir / "prompts.jsonl", "--reward-model", workdir / "rm",
                            "--max-new-tokens", 4, "--no-save-merged", *common(workdir, "ppo", merged)], capsys)
    assert status == 0, err
    ppo_summary = json.loads((workdir / "ppo" / "summary.json").read_text())
    assert ppo_summary["steps"] == 2 and "objective/scores" in ppo_summary["metrics"]

    status, err = run_main(["grpo", "--data", workdir / "prompts.jsonl", "--reward-fn", f"{workdir / 'reward.py'}:reward",
                            "--group-size", 2, "--max-new-tokens", 4, "--no-save-merged",
                            *common(workdir, "grpo", merged)], capsys)
    assert status == 0, err
    assert json.loads((workdir / "grpo" / "summary.json").read_text())["steps"] == 2
