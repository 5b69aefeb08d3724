"""One training stage from parsed options: check the data and the reward, load the model, build
its roles, run the trainer, save the merged policy and the summary.

Shared by the command line (`fastrlhf.train`, which only parses options and calls `run_stage`) and
the built-in pipeline (`fastrlhf.pipeline`, which uses the model loading and role building).
Problems with the user's options or files are raised as `CliError`s naming the option, so the
command line reports them in one line, before the model is loaded where possible.
"""
from __future__ import annotations

import importlib
import json
import os
import time
import traceback
from typing import Any, Callable

from fastrlhf.checkpoint import CheckpointError
from fastrlhf.cli import CliError, option_name
from fastrlhf.options import (
    DataOptions,
    ModelOptions,
    PolicyOutputOptions,
    RewardOptions,
)
from fastrlhf.roles import (
    is_fastrlhf_reward_dir,
    load_reward_role,
    reward_dir_fits_base,
)
from fastrlhf.trainers.build import needs_reference_copy
from fastrlhf.trainers.data_stream import DataPositionError
from fastrlhf.trainers.run_dir import RunDirError

# what a resume or the output directory can refuse: the user's to fix, reported in one line
RESUME_ERRORS = (CheckpointError, DataPositionError, RunDirError)

DATA_KINDS = {"sft": "sft", "rm": "preference", "dpo": "preference", "kto": "unpaired", "ppo": "prompt",
              "grpo": "prompt"}
DATA_FORMATS = {
    "sft": '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]} or {"text": ...}',
    "preference": '{"prompt": ..., "chosen": ..., "rejected": ...}',
    "prompt": '{"prompt": ...} (other fields reach --reward-fn)',
    "unpaired": '{"prompt": ..., "completion": ..., "label": true | false} (true = desirable)',
}


def trainer_classes(name: str):
    from fastrlhf import trainers

    trainer_name, config_name = trainers.TRAINERS[name]
    return getattr(trainers, trainer_name), getattr(trainers, config_name)

def run_stage(command: str, options: dict[type, Any], *, ctx=None) -> dict:
    """Run one trainer from parsed options; returns the trainer's summary (also written to
    OUTPUT_DIR/summary.json by rank 0). Data, reward function and reward-model directory are checked
    before the model is loaded.

    ctx: a `DistContext`; None creates one from torchrun's environment and closes it when the stage
    is over (on every rank, after the model and trainer are gone: see `DistContext.close`)."""
    from fastrlhf.distributed import DistContext

    if ctx is not None:
        return _run_stage(command, options, ctx)
    ctx = DistContext.from_env()
    try:
        return _run_stage(command, options, ctx)
    except BaseException as error:
        # the traceback's frames still hold the model/trainer: free them so close() can free the group
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        ctx.close()

def _run_stage(command: str, options: dict[type, Any], ctx) -> dict:
    trainer_class, config_class = trainer_classes(command)
    model_opts: ModelOptions = options[ModelOptions]
    data_opts: DataOptions = options[DataOptions]
    config = options[config_class]
    kind = DATA_KINDS[command]

    if not data_opts.data:
        raise CliError(f"--data is required for {command}: a .jsonl/.json/.parquet file of {DATA_FORMATS[kind]}")
    train_records = load_data(data_opts.data, kind, "--data")
    eval_records = load_data(data_opts.eval_data, kind, "--eval-data") if data_opts.eval_data else None
    if ctx.is_main:
        check_output_dir(trainer_class.__name__, config, train_records)

    reward_fn, reward_dir = None, None
    if RewardOptions in options:
        reward_fn, reward_dir = resolve_reward(options[RewardOptions], model_opts, config, train_records)

    model, tokenizer = load_model(model_opts, verbose=ctx.is_main)
    if reward_dir:
        reward_fn, reward_dir = reward_role_or_classifier(reward_dir, model, config, train_records, verbose=ctx.is_main)
    # the new LoRA adapters and heads must start identical on every rank (only gradients are averaged)
    from fastrlhf.checkpoint import seed_everything

    seed_everything(config.seed)
    roles, trainable = {"sft": (("policy",), None), "rm": (("reward",), None), "dpo": (("policy",), None),
                        "kto": (("policy",), None), "ppo": (("policy", "value"), None),
                        "grpo": (("policy",), None)}[command]
    if reward_dir:
        roles, trainable = (*roles, "reward"), roles
    role_model = build_role_model(model, model_opts, roles, trainable_roles=trainable,
                                  with_reference=needs_reference_copy(command, config))
    if reward_dir:
        load_reward_role(role_model, reward_dir)

    if ctx.is_main:
        print(f"== {command}: {len(train_records)} training records from {data_opts.data} -> {config.output_dir}"
              + (f" ({ctx.world_size} processes{', FSDP' if config.fsdp else ''})" if ctx.distributed else ""),
              flush=True)
    try:  # the constructor checks data against the tokenizer and the config: report, don't trace back
        trainer = trainer_class(role_model, tokenizer, config, train_records, eval_records=eval_records,
                                reward_fn=reward_fn, ctx=ctx)
    except ValueError as error:
        raise CliError(str(error)) from None
    try:  # a directory of another run, a damaged checkpoint, data that moved: one line, no traceback
        summary = trainer.train()
    except RESUME_ERRORS as error:
        raise CliError(str(error)) from None
    output_dir = config.output_dir
    if options.get(PolicyOutputOptions) and options[PolicyOutputOptions].save_merged:
        merged_dir = os.path.join(output_dir, "merged")
        save_merged_policy(role_model, tokenizer, model_opts, merged_dir, ctx)
        summary["merged_model"] = merged_dir
        if ctx.is_main:
            print(f"merged policy saved to {merged_dir} (use it as --model of the next stage)", flush=True)
    if ctx.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        print(format_summary(summary), flush=True)
    return summary


def check_output_dir(trainer_name: str, config, train_records: list[dict]) -> None:
    """Before the model loads: the output directory can be created and written, and this run may
    start there (`fastrlhf.trainers.run_dir.plan_run`: empty, or the same run when resuming; an
    explicit --resume checkpoint exists and is intact). CliError otherwise. The trainer applies the
    same rules again when it starts (with the model's identity, which is not known yet here)."""
    import tempfile

    from fastrlhf.checkpoint import verify_checkpoint
    from fastrlhf.trainers.run_dir import plan_run, run_record

    out = config.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise CliError(f"--output-dir: cannot create or write {out!r} ({error.strerror or error})") from None
    current = run_record(trainer_name, config, train_records=train_records)
    try:
        plan = plan_run(out, resume=config.resume, overwrite=config.overwrite_output_dir, current=current)
        if plan.resume not in (None, "auto"):
            verify_checkpoint(plan.resume)
    except RESUME_ERRORS as error:
        raise CliError(str(error)) from None


def save_merged_policy(role_model, tokenizer, model_opts: ModelOptions, merged_dir: str, ctx) -> None:
    """Rank 0 saves the policy merged into the base as a plain HF model; call on EVERY rank.

    An FSDP-sharded model cannot be deep-copied (what `merged_policy` does), so under FSDP every rank
    gathers the policy role's full weights (a collective) and rank 0 rebuilds an unsharded copy from
    the base with the same model options, loads them into it and merges that."""
    from fastrlhf.distributed import full_state_dict
    from fastrlhf.models import save_causal_lm

    if ctx.fsdp:
        state = full_state_dict(role_model.role_state_dict("policy"))
        if ctx.is_main:
            base, _ = load_model(model_opts, verbose=False)
            # no reference copy: only the policy is merged (saves a full model copy on rank 0 without LoRA)
            unsharded = build_role_model(base, model_opts, ("policy",), with_reference=False)
            unsharded.load_role_state_dict("policy", state)
            save_causal_lm(unsharded, tokenizer, merged_dir)  # merged, in the checkpoint's dtype
            del base, unsharded
        del state
    elif ctx.is_main:
        save_causal_lm(role_model, tokenizer, merged_dir)  # merged, in the checkpoint's dtype
    ctx.barrier()  # the next stage (or a test) may read merged_dir as soon as any rank returns

def load_data(source: str, kind: str, option: str) -> list[dict]:
    """Load and validate records; any problem -> CliError naming the option, file, record and column."""
    from fastrlhf.data import load_records, validate_records

    try:
        records = load_records(source)
        validate_records(records, kind, source=source)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise CliError(f"{option}: {error}") from None
    return records

def load_model(model_opts: ModelOptions, *, verbose: bool = True):
    """(causal LM, tokenizer) from the model options (None model = the built-in default).
    verbose: print what is loaded and how long it took (False on ranks other than 0)."""
    from fastrlhf.models import load_causal_lm

    started = time.perf_counter()
    what = model_opts.model or "SmolLM2-135M-Instruct (built-in default)"
    if verbose:
        print(f"loading {what} ...", flush=True)
    try:
        model, tokenizer = load_causal_lm(
            model_opts.model, gguf_file=model_opts.gguf_file,
            dtype=None if model_opts.dtype == "auto" else model_opts.dtype,
            attn_implementation=model_opts.attn_implementation,
        )
    except (OSError, ValueError) as error:  # not installed / not found / not a model: say so, no traceback
        raise CliError(f"--model: {error}") from None
    if verbose:
        print(f"loaded in {time.perf_counter() - started:.1f}s ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)",
              flush=True)
    return model, tokenizer

def build_role_model(model, model_opts: ModelOptions, roles, *, trainable_roles=None, with_reference: bool = True):
    from fastrlhf.roles import RoleModel

    targets = model_opts.lora_target_modules
    if targets and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return RoleModel(
        model, roles=roles, trainable_roles=trainable_roles, use_lora=model_opts.lora,
        lora_r=model_opts.lora_r, lora_alpha=model_opts.lora_alpha, lora_dropout=model_opts.lora_dropout,
        lora_target_modules=targets or None, reference_device=model_opts.reference_device,
        with_reference=with_reference,
    )

def resolve_reward(reward_opts: RewardOptions, model_opts: ModelOptions, config=None,
                   train_records: list[dict] | None = None) -> tuple[Callable | None, str | None]:
    """(reward_fn, fastrlhf reward-role directory), checked before the policy model loads.

    --reward-fn (one or several, comma-separated) and a Hugging Face sequence-classification
    --reward-model become one `fastrlhf.rewards.RewardFunctions` (weights: --reward-weights), which
    is dry-called on the first training records here. A `fastrlhf.train rm` directory is returned
    as the reward-role directory instead (it scores alone; its base is checked once the model is
    loaded: `reward_role_or_classifier`)."""
    from fastrlhf.rewards import RewardFunctions, is_hf_reward_model_dir

    specs = [s.strip() for s in (reward_opts.reward_fn or "").split(",") if s.strip()]
    model_dir = reward_opts.reward_model
    if not specs and not model_dir:
        raise CliError("give a reward: --reward-model DIR (written by `fastrlhf.train rm`, or a Hugging Face "
                       "sequence-classification model) and/or --reward-fn module:function[,module:function ...]")
    sources: list = [import_reward_fn(spec) for spec in specs]
    weights = getattr(config, "reward_weights", None)
    if model_dir:
        if is_fastrlhf_reward_dir(model_dir) and not (specs and is_hf_reward_model_dir(model_dir)):
            if specs:
                raise CliError(f"--reward-model {model_dir} is a fastrlhf reward adapter on the policy's base: it scores "
                               "alone; drop --reward-fn, or give a Hugging Face sequence-classification model")
            if weights is not None:
                raise CliError("--reward-weights weigh several reward functions / models; the reward role scores alone")
            check_reward_dir(model_dir, model_opts)
            return None, model_dir
        if not is_hf_reward_model_dir(model_dir):
            raise CliError(f"--reward-model: {model_dir!r} is not a directory written by `fastrlhf.train rm` "
                           "(fastrlhf_roles.json and role-reward.safetensors) nor a Hugging Face sequence-classification "
                           "model (config.json with a ...ForSequenceClassification architecture)")
        sources.append(model_dir)
    try:
        reward_fn = RewardFunctions(sources, weights=weights)
        if train_records:
            reward_fn.dry_run(train_records)
    except ValueError as error:
        raise CliError(f"{'--reward-fn' if specs else '--reward-model'}: {error}") from None
    return reward_fn, None


def reward_role_or_classifier(path: str, base, config, train_records, *, verbose: bool = True):
    """(reward_fn, reward-role directory) once the policy's base is loaded: the reward adapter in `path`
    as the reward role when it was trained on this base; otherwise the sequence classifier saved
    beside it (a model of its own), or a CliError that says why the adapter cannot be used."""
    from fastrlhf.rewards import RewardFunctions, is_hf_reward_model_dir

    fits, reason = reward_dir_fits_base(path, base)
    if fits:
        return None, path
    if not is_hf_reward_model_dir(path):
        raise CliError(f"--reward-model {path}: {reason}")
    if verbose:
        print(f"--reward-model {path}: its adapter was trained on another base; scoring with the sequence "
              "classifier saved beside it (a separate model)", flush=True)
    reward_fn = RewardFunctions([path], weights=getattr(config, "reward_weights", None))
    reward_fn.dry_run(train_records)
    return reward_fn, None

def import_reward_fn(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function` -> the callable (CliError naming --reward-fn)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--reward-fn: expected module:function (e.g. fastrlhf.demo:gold_reward_fn), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise CliError(f"--reward-fn: file {module_name!r} does not exist")
            spec_ = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0], module_name)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise CliError(f"--reward-fn: cannot import module {module_name!r} ({error})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise CliError(f"--reward-fn: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise CliError(f"--reward-fn: {spec!r} is not callable")
    return fn

def check_reward_dir(path: str, model_opts: ModelOptions) -> None:
    """The reward directory must hold a LoRA reward role saved with the same LoRA settings as this run
    (all roles of one RoleModel share them)."""
    from fastrlhf.roles import CONFIG_FILE

    settings_file = os.path.join(path, CONFIG_FILE)
    weights = os.path.join(path, "role-reward.safetensors")
    if not (os.path.isfile(settings_file) and os.path.isfile(weights)):
        raise CliError(f"--reward-model: {path!r} is not a directory written by `fastrlhf.train rm` "
                       f"(needs {CONFIG_FILE} and role-reward.safetensors)")
    with open(settings_file) as f:
        saved = json.load(f)
    if not saved.get("use_lora", True) or not model_opts.lora:
        raise CliError("--reward-model: the reward role is loaded as a LoRA adapter on the policy's base; "
                       "train the reward model and run this stage with LoRA (without --no-lora)")
    for name in ("lora_r", "lora_alpha"):
        if name in saved and saved[name] != getattr(model_opts, name):
            raise CliError(f"--reward-model {path} was trained with {option_name(name)} {saved[name]}, "
                           f"this run uses {getattr(model_opts, name)}: pass {option_name(name)} {saved[name]}")

def format_summary(summary: dict) -> str:
    metrics = {k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float))}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("step", "epoch"))
    peak = summary.get("peak_memory_bytes")
    lines = [f"{summary.get('trainer', 'trainer')}: {summary.get('steps')} steps in {summary.get('seconds', 0):.1f}s"
             + (f", peak memory {peak / 2**20:.0f} MiB" if peak else "")]
    if shown:
        lines.append(f"  last metrics: {shown}")
    if summary.get("eval"):
        lines.append("  eval: " + ", ".join(f"{k}={v:.4g}" for k, v in summary["eval"].items()))
    return "\n".join(lines)
