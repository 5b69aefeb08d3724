"""What the training loop runs on, built once from the config: the model on this rank's device
(sharded with FSDP2 when asked), the trained parameters, the LR schedule, the autocast mode."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("fastrlhf.trainers")

# RoleModel methods that run the trunk: FSDP2 must gather the shards around each of them.
ROLE_MODEL_FORWARDS = ("hidden_states", "token_logprobs", "token_logprobs_and_values", "head_inputs",
                       "head_inputs_and_values", "values", "rewards", "generate")


def resolve_bf16(mode: str, device: torch.device) -> bool:
    """Whether to autocast in bf16: mode "auto" (where CUDA supports it), "true" or "false"; never
    on CPU, where bf16 autocast is slower than fp32 (a warning says so when "true" is ignored)."""
    on_cuda = device.type == "cuda"
    if mode == "true" and not on_cuda:
        logger.warning("bf16=true ignored: autocast is only used on CUDA")
    if mode == "auto":
        return on_cuda and torch.cuda.is_bf16_supported()
    return mode == "true" and on_cuda


def place_model(model, ctx, *, fsdp: bool, bf16: bool) -> None:
    """Move the model to this rank's device (the reference copy of a no-LoRA RoleModel stays where
    RoleModel put it), then shard it with FSDP2 when `fsdp` and running under torchrun: the model,
    and the frozen no-LoRA reference copy when it lives on the ranks' device (`shard_reference`; a
    copy kept on the CPU with `reference_device="cpu"` stays whole there)."""
    first = next(iter(model.parameters()), None)
    if first is not None and first.device != ctx.device:
        model.to(ctx.device)
    if fsdp and ctx.distributed:
        mixed_precision = torch.bfloat16 if bf16 else None
        ctx.apply_fsdp(model, forward_methods=ROLE_MODEL_FORWARDS, mixed_precision=mixed_precision)
        shard_reference = getattr(model, "shard_reference_copy", None)
        if shard_reference is not None:
            shard_reference(ctx, mixed_precision=mixed_precision)


def trainable_parameters(model, roles) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates for `roles`, each once: without LoRA the value head sits
    on the policy trunk, so the policy and value roles share the trunk's parameters."""
    seen: set[int] = set()
    params = []
    for role in roles:
        for p in model.trainable_parameters(role):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def make_optimizer(params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `params`: fused (one kernel per parameter group and step) when they are all CUDA
    tensors, FSDP2's DTensor shards included; torch's default (for-each) elsewhere. For-each AdamW
    makes temporaries of the size of all trained parameters during its step, so its step held one
    more copy of them: predicted for full fine-tuning of Qwen2.5-7B (SFT, B=8, T=2048, bf16) 70.9 GiB
    at the optimizer step instead of 56.8 (`fastrlhf.planner`). On the CPU the default stays: the
    tests' trajectories are the for-each ones."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def make_scheduler(optimizer, *, schedule: str, warmup_ratio: float, total_steps: int):
    """transformers' `get_scheduler`: linear warmup over `warmup_ratio` of the `total_steps`
    optimizer steps, then `schedule` ("cosine", "linear", "constant")."""
    from transformers import get_scheduler

    warmup = int(round(warmup_ratio * total_steps))
    if schedule == "constant" and warmup:
        schedule = "constant_with_warmup"
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def needs_reference_copy(command: str, config) -> bool:
    """Whether a --no-lora stage keeps a frozen reference copy of the model during training: PPO
    (KL to the reference every iteration) and GRPO with kl_coef > 0. SFT never reads one, and DPO
    computes its reference log-probs before the first step from the still untrained policy (saved
    with the checkpoints), so a copy would only hold a second set of weights (2 bytes per parameter
    in bf16; 14 GiB at 7B)."""
    return command == "ppo" or (command == "grpo" and getattr(config, "kl_coef", 0) > 0)
