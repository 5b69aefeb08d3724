"""`python -m fastrlhf.train STAGE --plan [usual options]`: the memory plan instead of training.

Reads only what decides memory: --model (a local model directory, a config.json, or a catalog name
such as Qwen2.5-7B; no weights are loaded), --dtype, the LoRA options, --reference-device, and the
stage's batch and length options (SFT / RM / DPO: --batch-size x --max-length; PPO / GRPO:
--batch-size prompts x (--max-prompt-length + --max-new-tokens), --group-size, --num-minibatches,
--grad-accum-steps). --data and the reward options are not needed; PPO / GRPO plan with a reward
role unless --reward-fn is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastrlhf._checks import check_int
from fastrlhf.options import option_help

GPU_MEMORY_AUTO = "auto"


@dataclass
class PlanOptions:
    """Memory plan (--plan): predicted peak GPU memory of one training step, no training."""

    plan: bool = field(default=False, metadata=option_help(
        "print the predicted peak GPU memory per GPU of one training step (checkpointing off/on, FSDP), whether it "
        "fits --gpu-memory and the largest --batch-size that does, then exit; loads no weights and needs no --data"))
    gpu_memory: str = field(default=GPU_MEMORY_AUTO, metadata=option_help(
        "GPU memory in GiB that --plan checks against; auto = the local GPU's, else 80"))
    plan_gpus: int = field(default=8, metadata=option_help("--plan shows FSDP over 2, 4, ... up to this many GPUs"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_int("plan_gpus", self.plan_gpus, 1)
        gpu_memory_gib(self.gpu_memory)

    def fsdp_degrees(self) -> tuple[int, ...]:
        out, n = [], 2
        while n <= self.plan_gpus:
            out.append(n)
            n *= 2
        return tuple(out)


def gpu_memory_gib(value: Any) -> float | None:
    """None for auto; else the number of GiB (ValueError naming gpu_memory when not > 0)."""
    if value is None or str(value).strip().lower() == GPU_MEMORY_AUTO:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"gpu_memory must be a number of GiB > 0 or {GPU_MEMORY_AUTO!r}, got {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"gpu_memory must be a number of GiB > 0 (a GPU with {value} GiB holds nothing), "
                         f"got {value!r}; e.g. 24, 80 or 141")
    return number


def resolve_gpu_memory(value: Any) -> tuple[float, str]:
    """(GiB, where it came from): the option, the local GPU, or the 80 GiB default."""
    from fastrlhf.planner.plan import DEFAULT_GPU_GIB

    number = gpu_memory_gib(value)
    if number is not None:
        return number, "--gpu-memory"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / 2**30, f"local {props.name}"
    return DEFAULT_GPU_GIB, "no local GPU: default"


def spec_from_options(command: str, options: dict[type, Any]):
    """The StepSpec of a stage's parsed options (ModelOptions, the trainer config, RewardOptions)."""
    from fastrlhf.options import ModelOptions
    from fastrlhf.planner.steps import StepSpec

    model: ModelOptions = options[ModelOptions]
    config = next(v for k, v in options.items() if k.__name__.endswith("Config"))
    dtype = model.dtype if model.dtype != "auto" else "bf16"
    targets = None
    if model.lora_target_modules and model.lora_target_modules != "all-linear":
        targets = tuple(t.strip() for t in model.lora_target_modules.split(",") if t.strip())
    kwargs = dict(stage=command, setup="shared-lora" if model.lora else "full", batch_size=config.batch_size,
                  grad_accum_steps=config.grad_accum_steps, dtype=dtype, lora_r=model.lora_r,
                  lora_alpha=model.lora_alpha, lora_target_modules=targets,
                  fused_head=getattr(config, "fused_head", True))
    if command in ("ppo", "grpo"):
        reward_fn = next((getattr(v, "reward_fn", "") for k, v in options.items() if k.__name__ == "RewardOptions"), "")
        kwargs.update(seq_len=config.max_prompt_length + config.max_new_tokens, prompt_len=config.max_prompt_length,
                      num_minibatches=config.num_minibatches, ppo_epochs=config.ppo_epochs,
                      reward_model=not reward_fn, kl_coef=config.kl_coef, entropy_coef=config.entropy_coef)
        if command == "grpo":
            kwargs["group_size"] = config.group_size
    else:
        kwargs["seq_len"] = config.max_length
    return StepSpec(**kwargs)


def run_plan(command: str, options: dict[type, Any]) -> int:
    """Print the plan of `command` with `options`; bad input -> CliError (an argparse message)."""
    from fastrlhf.cli import CliError
    from fastrlhf.options import ModelOptions
    from fastrlhf.planner.configs import ConfigError, load_config
    from fastrlhf.planner.plan import format_plan, make_plan

    plan_options: PlanOptions = options[PlanOptions]
    model_options: ModelOptions = options[ModelOptions]
    try:
        gib, source = resolve_gpu_memory(plan_options.gpu_memory)
        config, name = load_config(model_options.model or "SmolLM2-135M")
        spec = spec_from_options(command, options)
    except (ConfigError, ValueError) as error:
        raise CliError(f"--plan: {error}") from None
    if spec.stage in ("ppo", "grpo") and spec.rollout_rows < spec.num_minibatches * spec.grad_accum_steps:
        raise CliError(f"--plan: --num-minibatches x --grad-accum-steps = {spec.num_minibatches * spec.grad_accum_steps} "
                       f"exceeds the {spec.rollout_rows} sequences per iteration")
    print(f"planning {command} on {name} (simulating the step on fake tensors, under a minute) ...", flush=True)
    try:
        plan = make_plan(spec, config, name, gpu_memory_gib=gib, gpu_source=source,
                         fsdp_gpus=plan_options.fsdp_degrees(),
                         drop_reference_parameters=(model_options.reference_device or "").startswith("cpu")
                         and not model_options.lora)
    except Exception as error:  # a model the simulator cannot run: say so, no traceback
        raise CliError(f"--plan could not simulate {name}: {type(error).__name__}: {error}") from None
    if (model_options.reference_device or "").startswith("cpu") and not model_options.lora:
        plan.notes.append("--reference-device cpu: the reference copy's weights are left out of the GPU total")
    print(format_plan(plan), flush=True)
    return 0
