"""TRL's names for fastrlhf's options: the one source of the mapping.

A TRL user's `DPOConfig(per_device_train_batch_size=4, num_train_epochs=1)` and
`python -m fastrlhf.train grpo --num-generations 8 --beta 0.04` work as they are: the config classes
(through `ConfigMeta`) and the command line (`fastrlhf.cli`) read the tables below. The README's
"Coming from TRL" table is generated from them (`mapping_table()`), so it cannot drift.

    TRL_NAMES       {config class name: {TRL field: fastrlhf field}} plain renames (same meaning,
                    same values); a class inherits the entries of its bases
    TRL_DERIVED     {config class name: {TRL field: function(value) -> {fastrlhf field: value}}}
                    TRL fields whose meaning is a value of another fastrlhf option
    TRL_REFUSED     {TRL field: why fastrlhf has no such option}: a TypeError that says so, instead
                    of Python's bare "unexpected keyword argument"

Value spellings TRL uses for fastrlhf's own fields (`max_steps=-1`, `bf16=True`,
`lr_scheduler_type="constant_with_warmup"`, `report_to=["wandb"]`, GRPO `loss_type="dapo"`,
`scale_rewards="group"`) are brought to one meaning by the configs' own `validate`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

# TrainingArguments names (every trainer) ---------------------------------------------------------
_TRAINING_ARGUMENTS = {
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "resume_from_checkpoint": "resume",
}

TRL_NAMES: dict[str, dict[str, str]] = {
    "TrainerConfig": _TRAINING_ARGUMENTS,
    "SFTConfig": {"max_seq_length": "max_length"},  # TRL < 0.20 called max_length so
    "RewardConfig": {"center_rewards_coefficient": "center_coef"},
    "DPOConfig": {"precompute_ref_log_probs": "precompute_ref_logps"},
    "KTOConfig": {"precompute_ref_log_probs": "precompute_ref_logps"},
    "PPOConfig": {
        "num_ppo_epochs": "ppo_epochs",
        "num_mini_batches": "num_minibatches",
        "cliprange": "clip_eps",
        "cliprange_value": "value_clip_eps",
        "response_length": "max_new_tokens",
    },
    "GRPOConfig": {
        "num_generations": "group_size",
        "max_completion_length": "max_new_tokens",
        "beta": "kl_coef",
        "epsilon": "clip_eps",
        "epsilon_high": "clip_eps_high",
        "num_iterations": "ppo_epochs",
    },
}


def _sequence_level(value: Any) -> dict[str, Any]:
    if value not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {value!r}")
    return {"loss_type": "gspo"} if value == "sequence" else {}


def _log_completions(value: Any) -> dict[str, Any]:
    return {"log_completions_steps": 1 if value else 0}


TRL_DERIVED: dict[str, dict[str, Callable[[Any], dict[str, Any]]]] = {
    "TrainerConfig": {"disable_tqdm": lambda value: {"progress": not value}},
    "PolicyGradientConfig": {"log_completions": _log_completions},
    "GRPOConfig": {"importance_sampling_level": _sequence_level},
}
# what each derived field means, for the README table
TRL_DERIVED_DOC = {
    "disable_tqdm": "`progress` = not disable_tqdm",
    "log_completions": "`log_completions_steps` = 1 (True) or 0",
    "importance_sampling_level": "`loss_type=\"gspo\"` for \"sequence\"",
}

TRL_REFUSED: dict[str, str] = {
    "optim": "fastrlhf always uses torch's AdamW",
    "fp16": "fp16 autocast is not offered; bf16 autocast (bf16=True) is, on CUDA",
    "use_vllm": "rollouts run on HF generate; a vLLM engine plugs in as rollout_engine= (fastrlhf.trainers.RolloutEngine)",
    "ref_model": "the reference is the base model with the adapters switched off (or a frozen copy without LoRA)",
    "model_init_kwargs": "pass a loaded model (fastrlhf.load_causal_lm(path, dtype=...)) instead",
    "save_strategy": "save_steps > 0 saves every N steps; 0 only at the end",
    "eval_strategy": "eval_steps > 0 evaluates every N steps; 0 only at the end",
}


def _class_chain(cls: type) -> list[str]:
    return [c.__name__ for c in cls.__mro__]


def trl_names(cls: type) -> dict[str, str]:
    """{TRL field: fastrlhf field} that config class `cls` accepts (its own and its bases')."""
    names: dict[str, str] = {}
    for name in reversed(_class_chain(cls)):
        names.update(TRL_NAMES.get(name, {}))
    return names


def trl_derived(cls: type) -> dict[str, Callable[[Any], dict[str, Any]]]:
    derived: dict[str, Callable] = {}
    for name in reversed(_class_chain(cls)):
        derived.update(TRL_DERIVED.get(name, {}))
    return derived


def translate_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Config keyword arguments with TRL's names replaced by fastrlhf's. Giving both names of one
    option is an error (which one would win is a guess); so is a TRL field fastrlhf refuses."""
    renames, derived = trl_names(cls), trl_derived(cls)
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in kwargs.items():
        if key in fields:
            items = {key: value}
        elif key in renames:
            items = {renames[key]: value}
        elif key in derived:
            items = derived[key](value)
        elif key in TRL_REFUSED:
            raise TypeError(f"{cls.__name__} has no option {key!r} (TRL's): {TRL_REFUSED[key]}")
        else:
            items = {key: value}  # the dataclass raises its own TypeError for an unknown name
        for name, item in items.items():
            if name in out:
                raise TypeError(f"{cls.__name__}: {origin[name]!r} and {key!r} set the same option {name!r}; give one")
            out[name], origin[name] = item, key
    return out


class ConfigMeta(type):
    """Metaclass of the trainer configs: `XConfig(**kwargs)` accepts TRL's field names (and refuses
    the TRL fields fastrlhf has no use for, saying why). `dataclasses.replace` goes through it too."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **translate_kwargs(cls, kwargs))


def option_aliases(cls: type) -> dict[str, list[str]]:
    """{fastrlhf field: [TRL names]} of the plain renames `cls` accepts (the command line's aliases)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    aliases: dict[str, list[str]] = {}
    for trl, ours in trl_names(cls).items():
        if trl not in fields:  # a config that has the TRL field itself (PPO/GRPO per_device_train_batch_size)
            aliases.setdefault(ours, []).append(trl)
    return aliases


def mapping_table() -> str:
    """The README's option table: TRL name -> fastrlhf name, per config (markdown)."""
    rows = ["| TRL | fastrlhf (Python and `--option`) | where |", "|---|---|---|"]
    where = {"TrainerConfig": "every trainer", "PolicyGradientConfig": "PPOConfig, GRPOConfig"}
    for config, names in TRL_NAMES.items():
        for trl, ours in names.items():
            scope = "SFT, RM, DPO (PPO, GRPO: last row)" if trl == "per_device_train_batch_size" else where.get(config, config)
            rows.append(f"| `{trl}` | `{ours}` (`--{ours.replace('_', '-')}`) | {scope} |")
    for config, derived in TRL_DERIVED.items():
        for trl in derived:
            rows.append(f"| `{trl}` | {TRL_DERIVED_DOC[trl]} | {where.get(config, config)} |")
    rows.append("| `per_device_train_batch_size` | completions per device per micro-batch, as in TRL: `batch_size` "
                "(prompts per iteration) = it x `grad_accum_steps` x `num_minibatches` / `group_size` | PPOConfig, "
                "GRPOConfig |")
    return "\n".join(rows)
