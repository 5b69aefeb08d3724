"""Memory planner: the peak GPU memory of a training step, predicted by running the real step code on
fake tensors (no weights, no GPU).

    python -m fastrlhf.train ppo --plan --model Qwen2.5-7B --max-prompt-length 1024 --max-new-tokens 1024

    from fastrlhf.planner import StepSpec, load_config, simulate, make_plan, format_plan
    config, name = load_config("Qwen2.5-7B")             # catalog name, model directory or config.json
    spec = StepSpec("ppo", batch_size=8, seq_len=2048, prompt_len=1024, checkpointing=True)
    prediction = simulate(spec, config, model_name=name)
    prediction.peak_bytes, prediction.by_category(), prediction.by_role(), prediction.fsdp_peak_bytes(8)
    print(format_plan(make_plan(spec, config, name, gpu_memory_gib=80)))

Modules, one job each: `counter` (live storages by category / role / phase, CUDA allocator
rounding), `fake` (models from a config on the meta device, then fake tensors), `cuda` (the CUDA
decisions on fake CPU tensors), `steps` (one step per stage and setup: fastrlhf's trainers, or
`trl_style`), `simulate` (few layers, extrapolated), `configs` (the catalog of public configs),
`plan` and `cli` (what `--plan` prints).
"""
from __future__ import annotations

_EXPORTS = {
    "StepSpec": "fastrlhf.planner.spec", "run_step": "fastrlhf.planner.steps",
    "STAGES": "fastrlhf.planner.steps", "SETUPS": "fastrlhf.planner.steps",
    "simulate": "fastrlhf.planner.simulate", "Prediction": "fastrlhf.planner.simulate",
    "make_plan": "fastrlhf.planner.plan", "format_plan": "fastrlhf.planner.plan",
    "load_config": "fastrlhf.planner.configs", "CATALOG": "fastrlhf.planner.configs",
    "ConfigError": "fastrlhf.planner.configs", "MemoryCounter": "fastrlhf.planner.counter",
}


def __getattr__(name: str):
    # lazy: `python -m fastrlhf.train --help` imports the planner's CLI options, not transformers
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
