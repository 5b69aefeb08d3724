"""Memory simulator and planner (fastrlhf.planner): fake-tensor steps against real runs, the layer
extrapolation against a direct run, detection of one extra activation, the planner's answer for a 7B
model, and clear errors for bad input. CPU only."""
from __future__ import annotations

import json

import pytest
import torch

from fastrlhf.planner.configs import ConfigError, config_from_dict, load_config, with_layers
from fastrlhf.planner.simulate import simulate
from fastrlhf.planner.steps import StepSpec, run_step
from fastrlhf.testing import save_tiny_model, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_config():
    return tiny_llama(vocab_size=len(tiny_tokenizer()), tie=True).config


def _spec(stage, **kw):
    return StepSpec(stage=stage, batch_size=kw.pop("batch_size", 4), seq_len=kw.pop("seq_len", 48),
                    prompt_len=kw.pop("prompt_len", 16), dtype="fp32", **kw)


# ---------------------------------------------------------------------------- simulator vs real runs


@pytest.mark.parametrize("stage,setup", [("sft", "shared-lora"), ("dpo", "shared-lora"), ("ppo", "shared-lora"),
                                         ("ppo", "full")])
def test_fake_step_matches_real_step_on_the_tiny_model(tiny_config, stage, setup):
    """The same step on fake and on real tensors, counted by the same counter: within 5% (in fact
    byte for byte: the same ops run either way), and the peak holds more than the weights."""
    spec = _spec(stage, setup=setup)
    real = run_step(spec, tiny_config, fake=False, target="cpu")
    fake = simulate(spec, tiny_config, target="cpu")
    assert abs(fake.peak_bytes / real.peak.total - 1) < 0.05
    assert fake.peak_bytes == real.peak.total
    assert real.peak.total > 1.5 * real.static_bytes["parameters"]
    assert {"parameters", "activations"} <= set(real.peak.by(0))


def test_counter_agrees_with_the_profilers_allocator_events(tiny_config):
    """An independent count (torch.profiler's CPU allocator events) of the same real step."""
    real = run_step(_spec("sft"), tiny_config, fake=False, target="cpu", profile=True)
    assert abs(real.profiler_peak / real.peak.total - 1) < 0.02


def test_layer_extrapolation_equals_a_direct_run(tiny_config):
    """2 and 3 layers extrapolated to 6 == the 6-layer step run directly (fake), region by region."""
    config = with_layers(tiny_config, 6)
    spec = _spec("ppo")
    predicted = simulate(spec, config, target="cpu")
    direct = run_step(spec, config, fake=True, target="cpu")
    assert predicted.method.startswith("2 and 3 layers")
    assert predicted.peak_bytes == direct.peak.total
    assert predicted.by_category() == direct.peak.by(0)


def test_one_extra_hidden_sized_activation_is_detected(tiny_config, monkeypatch):
    """A test double of the role model that keeps one more [B, T, H] tensor alive through the step
    raises the predicted peak by that tensor's bytes."""
    from fastrlhf.roles import RoleModel

    spec = _spec("sft")
    before = simulate(spec, tiny_config, target="cpu").peak_bytes
    kept = []
    original = RoleModel._decoder_hidden

    def keeps_a_copy(self, role, input_ids, attention_mask):
        hidden = original(self, role, input_ids, attention_mask)
        kept.append(hidden.detach().clone())  # [B, T, H], alive until the test ends
        return hidden

    monkeypatch.setattr(RoleModel, "_decoder_hidden", keeps_a_copy)
    after = simulate(spec, tiny_config, target="cpu").peak_bytes
    extra = spec.batch_size * spec.seq_len * tiny_config.hidden_size * 4
    assert after - before == extra


# ---------------------------------------------------------------------------- the planner


def test_plan_for_a_7b_model_names_the_dominant_term():
    """Full fine-tuning of a 7B model: AdamW's two moments (bf16, 2 x 7.6B x 2 bytes) are the largest
    term, and the plan says it does not fit one 24 GiB GPU and names an FSDP degree that does."""
    from fastrlhf.planner.plan import format_plan, make_plan

    config, name = load_config("Qwen2.5-7B")
    plan = make_plan(StepSpec("sft", setup="full", batch_size=1, seq_len=256), config, name, gpu_memory_gib=24,
                     search=False)
    text = format_plan(plan)
    nominal = plan.parameters * 2
    cats = plan.modes[0].prediction.by_category()
    assert plan.modes[0].prediction.dominant()[0] == "optimizer"
    assert abs(cats["optimizer"] / (2 * nominal) - 1) < 0.01
    assert "dominant term: optimizer" in text
    assert "fits one 24 GiB GPU" in text and "FSDP over 2 GPUs" in text
    assert not plan.modes[0].fits and any("FSDP over" in s for s in plan.suggestions)


def test_plan_cli_on_a_local_model_directory(tmp_path, capsys):
    from fastrlhf.train import main

    path = save_tiny_model(tmp_path / "tiny")
    assert main(["dpo", "--plan", "--model", path, "--batch-size", "2", "--max-length", "32",
                 "--gpu-memory", "1.01"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: dpo on tiny" in out and "fits one 1.01 GiB GPU (--gpu-memory)" in out
    assert "largest --batch-size on one GPU" in out


def _cli_error(argv, capsys) -> str:
    from fastrlhf.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_plan_rejects_a_bad_gpu_memory(value, capsys):
    err = _cli_error(["sft", "--plan", "--model", "SmolLM2-135M", "--gpu-memory", value], capsys)
    assert "--gpu-memory" in err and "GiB > 0" in err


def test_plan_rejects_an_unknown_model(capsys):
    err = _cli_error(["sft", "--plan", "--model", "no-such-model-7b"], capsys)
    assert "no-such-model-7b" in err and "Qwen2.5-7B" in err  # names the catalog


def test_plan_says_what_would_fit_when_nothing_does(tmp_path, capsys):
    """A GPU too small even for batch size 1: the plan says so and names an FSDP degree."""
    from fastrlhf.train import main

    path = save_tiny_model(tmp_path / "tiny")
    assert main(["sft", "--plan", "--model", path, "--no-lora", "--batch-size", "2", "--max-length", "32",
                 "--gpu-memory", "1.0008"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits on one GPU even at --batch-size 1" in out
    assert "FSDP over" in out and "LoRA roles" in out


def test_config_errors_name_the_field(tmp_path):
    values = dict(json.loads(json.dumps(load_config_dict_for("Qwen2.5-0.5B"))))
    del values["num_attention_heads"]
    with pytest.raises(ConfigError, match="num_attention_heads"):
        config_from_dict(values)
    with pytest.raises(ConfigError, match="model_type='not-a-model'"):
        config_from_dict({**load_config_dict_for("Qwen2.5-0.5B"), "model_type": "not-a-model"})
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_dict({**load_config_dict_for("Qwen2.5-0.5B"), "hidden_size": 0})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        load_config(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without a config.json"):
        load_config(str(tmp_path / "empty"))


def load_config_dict_for(name):
    from fastrlhf.planner.configs import load_config_dict

    return load_config_dict(name)[0]


def test_catalog_models_have_their_published_sizes():
    """Parameter counts of the shipped configs (facts from the models' cards)."""
    from fastrlhf.planner.configs import parameter_count

    expected = {"Qwen2.5-0.5B": 0.494e9, "Qwen2.5-7B": 7.62e9, "Llama-3.1-8B": 8.03e9, "SmolLM2-135M": 0.135e9}
    for name, count in expected.items():
        assert abs(parameter_count(load_config(name)[0]) / count - 1) < 0.01, name


def test_step_spec_validation():
    with pytest.raises(ValueError, match="stage"):
        StepSpec("nope")
    with pytest.raises(ValueError, match="setup 'separate'"):
        StepSpec("sft", setup="separate")
    with pytest.raises(ValueError, match="prompt_len"):
        StepSpec("ppo", seq_len=64, prompt_len=64)
    with pytest.raises(ValueError, match="batch_size"):
        StepSpec("sft", batch_size=0)


def test_cuda_target_counts_allocator_blocks(tiny_config):
    """Simulated CUDA: every allocation is a multiple of 512 bytes, the reserved bound covers the
    allocated bytes, and the bf16 weights take half the fp32 bytes."""
    spec = StepSpec("sft", batch_size=2, seq_len=32, dtype="bf16")
    cuda = run_step(spec, tiny_config, fake=True, target="cuda")
    cpu32 = run_step(StepSpec("sft", batch_size=2, seq_len=32, dtype="fp32"), tiny_config, fake=True, target="cpu")
    assert all(v % 512 == 0 for v in cuda.peak.parts.values())
    assert cuda.peak.reserved >= cuda.peak.total
    assert cuda.static_bytes["parameters"] < cpu32.static_bytes["parameters"]


def test_fake_tensors_leave_no_real_memory_behind():
    """A 7B step simulated: the process allocates no weights (fake tensors), so the peak the
    simulator reports is far above what this process holds."""
    import resource

    config, _ = load_config("Qwen2.5-7B")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = run_step(StepSpec("sft", batch_size=1, seq_len=64), config, n_layers=2, target="cuda")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert result.peak.total > 2e9 and after - before < 0.5e9
    assert torch.get_default_dtype() == torch.float32


def test_full_fine_tuning_keeps_a_reference_copy_only_where_training_reads_it():
    """fastrlhf.train: --no-lora SFT and DPO (reference log-probs precomputed from the untrained
    policy) hold no reference copy; PPO and GRPO with a KL term do. The simulator follows it: the
    SFT peak without the copy is lower by the model's bf16 weights."""
    from fastrlhf.trainers.build import needs_reference_copy
    from fastrlhf.trainers import DPOConfig, GRPOConfig, PPOConfig, SFTConfig

    assert not needs_reference_copy("sft", SFTConfig()) and not needs_reference_copy("dpo", DPOConfig())
    assert needs_reference_copy("ppo", PPOConfig()) and needs_reference_copy("grpo", GRPOConfig())
    assert not needs_reference_copy("grpo", GRPOConfig(kl_coef=0.0))
    config, name = load_config("Qwen2.5-0.5B")
    spec = StepSpec("sft", setup="full", batch_size=1, seq_len=128)
    with_copy = run_step(StepSpec("sft", setup="full", batch_size=1, seq_len=128, reference_copy=True), config,
                         n_layers=2)
    as_trained = run_step(spec, config, n_layers=2)
    weights = as_trained.static_bytes["parameters"]
    assert with_copy.static_bytes["parameters"] == 2 * weights
    assert with_copy.peak.total - as_trained.peak.total == weights
