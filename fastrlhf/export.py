"""A RoleModel's trained roles in the formats the rest of the ecosystem reads.

    policy    PEFT adapter (adapter_config.json + adapter_model.safetensors): 
              `PeftModel.from_pretrained(base, OUTPUT_DIR)`, exactly TRL's layout with peft_config
    value     PEFT adapter + value_head.safetensors in OUTPUT_DIR/value_adapter/
    reward    a transformers sequence classifier (config.json + model.safetensors, the adapter merged
              into the base, the score head as `score`): `AutoModelForSequenceClassification.
              from_pretrained(OUTPUT_DIR)`, TRL's RewardTrainer layout; and its PEFT adapter in
              OUTPUT_DIR/reward_adapter/

fastrlhf's own role files (role-<name>.safetensors, fastrlhf_roles.json) are written beside them by
`RoleModel.save`: resume and `--reward-model` read those. Weights of full models are saved in the
dtype of the checkpoint the base came from (`fastrlhf.models.source_dtype`), adapters as trained.
"""
from __future__ import annotations

import copy
import os

import torch

from fastrlhf.models import source_dtype
from fastrlhf.roles import decoder_of

VALUE_ADAPTER_DIR = "value_adapter"
REWARD_ADAPTER_DIR = "reward_adapter"


def save_peft_adapter(role_model, role: str, output_dir: str) -> str:
    """`role`'s LoRA adapter as a PEFT adapter directory (what `PeftModel.save_pretrained` writes for
    one adapter): loadable by `PeftModel.from_pretrained(base_model, output_dir)`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not role_model.use_lora:
        raise ValueError("save_peft_adapter: this RoleModel trains the full model (use_lora=False), it has no adapters")
    role_model._require(role)
    peft_model = role_model._trunks.peft_model
    config = copy.deepcopy(peft_model.peft_config[role])
    config.inference_mode = True
    if not config.base_model_name_or_path:
        config.base_model_name_or_path = getattr(role_model.causal_lm.config, "_name_or_path", "") or None
    state = get_peft_model_state_dict(peft_model, adapter_name=role)
    os.makedirs(output_dir, exist_ok=True)
    config.save_pretrained(output_dir)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(output_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return output_dir


def reward_model_as_sequence_classifier(role_model, *, pad_token_id: int | None, dtype: torch.dtype | None = None):
    """The reward role as a transformers `...ForSequenceClassification` model (a new model: the
    reward trunk with its adapter merged, the reward head as `score`). Its logit at the last non-pad
    token equals `role_model.rewards(...)` when pad_token_id is not a token of the scored texts (a
    tokenizer whose pad IS its eos makes transformers score the token before a final eos)."""
    from transformers import AutoModelForSequenceClassification

    trunk = role_model.merged_trunk("reward")
    config = copy.deepcopy(trunk.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    classifier = AutoModelForSequenceClassification.from_config(config)
    score = getattr(classifier, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise ValueError(f"{type(classifier).__name__} has no bias-free `score` layer to hold the reward head")
    decoder_state = decoder_of(trunk).state_dict()
    missing, unexpected = classifier.base_model.load_state_dict(decoder_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"reward export: decoder weights do not fit {type(classifier).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head = role_model.heads["reward"]
    with torch.no_grad():
        score.weight.copy_(head.weight.to(score.weight.dtype))
    target = dtype or source_dtype(trunk) or trunk.dtype
    classifier.config.architectures = [type(classifier).__name__]
    return classifier.to(target).eval()


def save_reward_model(role_model, tokenizer, output_dir: str) -> str:
    """The reward role as a transformers sequence classifier in output_dir (+ the tokenizer)."""
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    classifier = reward_model_as_sequence_classifier(role_model, pad_token_id=pad)
    os.makedirs(output_dir, exist_ok=True)
    classifier.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


def export_trained_roles(role_model, roles, tokenizer, output_dir: str) -> list[str]:
    """Write `roles` (the trainer's trained roles) in the ecosystem's formats (module docstring) and
    the tokenizer into output_dir; returns the paths written. LoRA mode only for the policy and
    value adapters (without LoRA the policy is a full model: `fastrlhf.models.save_causal_lm`)."""
    written = []
    if "reward" in roles:
        written.append(save_reward_model(role_model, tokenizer, output_dir))
        if role_model.use_lora:
            written.append(save_peft_adapter(role_model, "reward", os.path.join(output_dir, REWARD_ADAPTER_DIR)))
    if role_model.use_lora:
        if "policy" in roles:
            written.append(save_peft_adapter(role_model, "policy", output_dir))
        if "value" in roles:
            path = save_peft_adapter(role_model, "value", os.path.join(output_dir, VALUE_ADAPTER_DIR))
            from safetensors.torch import save_file

            head = {k: v.detach().contiguous() for k, v in role_model.heads["value"].state_dict().items()}
            save_file(head, os.path.join(path, "value_head.safetensors"))
            written.append(path)
    if tokenizer is not None and "reward" not in roles:  # save_reward_model wrote it already
        tokenizer.save_pretrained(output_dir)
    return written
