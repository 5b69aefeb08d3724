"""TRL-shaped trainer construction: what `DPOTrainer(model=..., args=DPOConfig(...), train_dataset=...,
processing_class=tok, peft_config=LoraConfig(...))` means in fastrlhf's terms.

    model             a RoleModel (used as it is), a path or hub id (loaded with `load_causal_lm`), or
                      a plain Hugging Face causal LM; the last two are wrapped in a RoleModel with the
                      roles the trainer needs (LoRA from peft_config, fastrlhf's defaults without one)
    args              the trainer's config (TRL's field names are accepted by the config itself)
    train_dataset,    lists of dicts, a `datasets.Dataset`, or a data file path
    eval_dataset
    processing_class  the tokenizer (loaded from the model's directory when not given)
    peft_config       a peft `LoraConfig`: r, lora_alpha, lora_dropout, target_modules of every role
    reward_funcs      PPO / GRPO: functions (TRL's keyword convention), Hugging Face reward-model
                      directories or models, or a fastrlhf reward-model directory (loaded as the
                      reward role when it was trained on this base); weights from args.reward_weights
    reward_model      PPO (TRL's name for a single reward model): the same as reward_funcs=[reward_model]

The reward functions are checked with a dry call on the training data before the model loads.
Everything else TRL's trainers take is refused with the reason (`REFUSED`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fastrlhf.roles import is_fastrlhf_reward_dir, reward_dir_fits_base

REFUSED = {
    "ref_model": "the reference is the base model with the adapters switched off (a frozen copy without LoRA); "
                 "pass ref_model=None",
    "value_model": "PPO's value model is a LoRA adapter + value head on the policy's base; pass value_model=None",
    "data_collator": "each trainer collates its own data format",
    "compute_metrics": "evaluation logs the trainer's own metrics (eval/...)",
    "optimizers": "fastrlhf builds AdamW and its schedule from the config",
    "optimizer_cls_and_kwargs": "fastrlhf builds AdamW and its schedule from the config",
    "preprocess_logits_for_metrics": "no logits are materialised",
    "formatting_func": "give records in one of TRL's formats ({'prompt','completion'}, {'messages'}, {'text'})",
    "compute_loss_func": "each trainer computes its own loss",
    "model_init": "pass the model",
}
TRL_INPUTS = ("args", "train_dataset", "eval_dataset", "processing_class", "peft_config", "reward_funcs",
              "reward_model", "reward_processing_classes", "ref_model", "value_model")


@dataclass
class TrainerInputs:
    model: Any
    tokenizer: Any
    config: Any
    train_records: Any
    eval_records: Any
    reward_fn: Any


def is_role_model(model) -> bool:
    from fastrlhf.roles import RoleModel

    return isinstance(model, RoleModel) or hasattr(model, "trainable_parameters") and hasattr(model, "roles")


def needs_resolving(model, trl_inputs: dict) -> bool:
    return bool(trl_inputs) or not is_role_model(model)


def resolve(trainer_cls, model, tokenizer, config, train_records, eval_records, reward_fn, trl: dict) -> TrainerInputs:
    """The positional inputs of `Trainer.__init__` from TRL-shaped ones (module docstring)."""
    for name, value in trl.items():
        if name in REFUSED and value is not None:
            raise ValueError(f"{trainer_cls.__name__}: {name}= is not taken: {REFUSED[name]}")
        if name not in TRL_INPUTS and name not in REFUSED:
            raise TypeError(f"{trainer_cls.__name__}() got an unexpected keyword argument {name!r}")
    config = _one("config", config, "args", trl.get("args"))
    tokenizer = _one("tokenizer", tokenizer, "processing_class", trl.get("processing_class"))
    train_records = _one("train_records", train_records, "train_dataset", trl.get("train_dataset"))
    eval_records = _one("eval_records", eval_records, "eval_dataset", trl.get("eval_dataset"))
    config = trainer_cls.config_class() if config is None else config
    if not isinstance(config, trainer_cls.config_class):
        raise ValueError(f"args must be fastrlhf's {trainer_cls.config_class.__name__} "
                         f"(from fastrlhf.trainers import {trainer_cls.config_class.__name__}; it takes TRL's field "
                         f"names), got {type(config).__module__}.{type(config).__name__}")
    config.validate()

    sources = _reward_sources(trl.get("reward_funcs"), trl.get("reward_model"))
    is_policy_gradient = hasattr(trainer_cls, "samples_per_prompt")
    if sources and not is_policy_gradient:
        raise ValueError(f"{trainer_cls.__name__} takes no reward_funcs (PPOTrainer and GRPOTrainer do)")
    if sources and reward_fn is not None:
        raise ValueError("give reward_funcs= (TRL's convention) or reward_fn= (fastrlhf's positional one), not both")
    peft_config = trl.get("peft_config")

    # 1. data and rewards, before any model is loaded
    from fastrlhf.trainers.data_stream import load_and_check_records

    train_records = load_and_check_records(_rows(train_records), trainer_cls.data_kind, "train_dataset")
    eval_records = _rows(eval_records)
    reward_role_dir = None
    if sources:
        from fastrlhf.rewards import RewardFunctions

        role_dirs = [s for s in sources if isinstance(s, (str, os.PathLike)) and is_fastrlhf_reward_dir(s)]
        if role_dirs and len(sources) > 1:
            raise ValueError(f"{role_dirs[0]} is a fastrlhf reward role; it scores alone (reward_funcs=[that directory])")
        if role_dirs:
            reward_role_dir = str(role_dirs[0])
        else:
            reward_fn = RewardFunctions(sources, weights=getattr(config, "reward_weights", None),
                                        processing_classes=trl.get("reward_processing_classes"))
            reward_fn.dry_run(train_records, tokenizer)

    # 2. the model
    if is_role_model(model):
        if peft_config is not None:
            raise ValueError("peft_config is for a plain model; this RoleModel already has its LoRA settings")
        if reward_role_dir:
            raise ValueError("with a RoleModel, load the reward role yourself (fastrlhf.roles.load_reward_role)")
        if tokenizer is None:
            raise ValueError("processing_class (the tokenizer) is required with a RoleModel")
        return TrainerInputs(model, tokenizer, config, train_records, eval_records, reward_fn)
    base, tokenizer = _load_base(model, tokenizer)
    use_reward_role = False
    if reward_role_dir:
        use_reward_role, reason = reward_dir_fits_base(reward_role_dir, base)
        if not use_reward_role:
            from fastrlhf.rewards import RewardFunctions, is_hf_reward_model_dir

            if not is_hf_reward_model_dir(reward_role_dir):
                raise ValueError(f"reward_funcs {reward_role_dir}: {reason}")
            # the same directory also holds the reward model as a sequence classifier: it runs on its own base
            reward_fn = RewardFunctions([reward_role_dir])
            reward_fn.dry_run(train_records, tokenizer)
    roles = tuple(dict.fromkeys((*trainer_cls.trained_roles, *trainer_cls.required_roles)))
    trainable = None
    if use_reward_role:
        roles, trainable = (*roles, "reward"), roles
    from fastrlhf.checkpoint import seed_everything
    from fastrlhf.roles import RoleModel

    seed_everything(config.seed)  # the new adapters and heads: the same on every rank and every run
    role_model = RoleModel(base, roles=roles, trainable_roles=trainable, with_reference=_needs_reference(trainer_cls, config),
                           **lora_settings(peft_config))
    if use_reward_role:
        from fastrlhf.roles import load_reward_role

        load_reward_role(role_model, reward_role_dir)
    return TrainerInputs(role_model, tokenizer, config, train_records, eval_records, reward_fn)


def lora_settings(peft_config) -> dict:
    """RoleModel LoRA keywords from a peft LoraConfig (None: fastrlhf's defaults). What a RoleModel
    cannot honour (DoRA, trained biases, modules_to_save) is refused rather than ignored."""
    if peft_config is None:
        return {}
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(f"peft_config must be a peft LoraConfig (one LoRA adapter per role), got {type(peft_config).__name__}")
    for name, unsupported in (("use_dora", bool(getattr(peft_config, "use_dora", False))),
                              ("bias", getattr(peft_config, "bias", "none") != "none"),
                              ("modules_to_save", bool(getattr(peft_config, "modules_to_save", None)))):
        if unsupported:
            raise ValueError(f"peft_config.{name}={getattr(peft_config, name)!r} is not supported: every role shares the "
                             "frozen base, so only LoRA matrices (no DoRA, no trained biases or extra modules) are per role")
    targets = peft_config.target_modules
    if isinstance(targets, (set, frozenset, tuple)):
        targets = sorted(targets)
    return {"lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
            "lora_target_modules": targets}


def _needs_reference(trainer_cls, config) -> bool:
    from fastrlhf.trainers import TRAINERS
    from fastrlhf.trainers.build import needs_reference_copy

    command = next((c for c, (t, _) in TRAINERS.items() if t == trainer_cls.__name__), None)
    return True if command is None else needs_reference_copy(command, config)


def _load_base(model, tokenizer):
    """(causal LM, tokenizer) from a path / hub id or a plain Hugging Face model."""
    from fastrlhf.models import load_causal_lm

    if isinstance(model, (str, os.PathLike)):
        loaded, own_tokenizer = load_causal_lm(str(model))
        return loaded, tokenizer if tokenizer is not None else own_tokenizer
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        raise ValueError("model is a PeftModel: pass its base model and peft_config=LoraConfig(...) instead "
                         "(fastrlhf puts one adapter per role on the base itself)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        kind = type(model).__name__
        hint = (" (RewardTrainer takes a causal LM too: the reward is a LoRA adapter + score head on it, saved as "
                "a sequence classifier by save_model)" if "SequenceClassification" in kind else "")
        raise ValueError(f"model must be a causal LM with an output embedding (AutoModelForCausalLM), a path, or a "
                         f"RoleModel; got {kind}{hint}")
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", "")
        if not (name and os.path.isdir(name)):
            raise ValueError("processing_class (the tokenizer) is required when model is a loaded model "
                             "that does not come from a local directory")
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _one(ours: str, ours_value, trl: str, trl_value):
    if ours_value is not None and trl_value is not None:
        raise ValueError(f"give {ours} or {trl} (TRL's name for it), not both")
    return trl_value if trl_value is not None else ours_value


def _rows(dataset):
    """A `datasets.Dataset` / DatasetDict -> list of dicts (paths and lists pass through)."""
    if dataset is None or isinstance(dataset, (str, os.PathLike, list)):
        return dataset
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):
        raise ValueError(f"train_dataset is a DatasetDict with splits {sorted(dataset.keys())}: pass one split, "
                         "e.g. dataset['train']")
    if hasattr(dataset, "to_list"):
        return dataset.to_list()
    return list(dataset)


def _reward_sources(reward_funcs, reward_model) -> list:
    sources = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if reward_model is not None:
        sources.append(reward_model)
    return sources
