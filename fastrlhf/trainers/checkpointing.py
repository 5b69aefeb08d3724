"""Checkpoints in trainer terms, on top of `fastrlhf.checkpoint` (atomic directories, RNG states):
which weights a trainer saves (its trained roles' adapters and heads, keyed "<role>/<name>"), the
optimizer state (gathered into one full state under FSDP2), and where the loop stands
(`loop_state`: the keys of trainer_state.pt). Rank 0 writes; every rank takes part, since gathering
sharded weights and RNG states are collectives.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_optimizer_state,
    resolve_resume,
    save_checkpoint,
)


def loop_state(*, step: int, consumed_batches: int, batches_per_epoch: int, guard, world_size: int) -> dict:
    """Where the loop stands after `step` completed steps: what a resume needs besides the weights,
    the optimizer, the schedule and the RNG (trainers add their own keys, e.g. the KL controller)."""
    return {
        "step": step,
        "consumed_batches": consumed_batches,
        "epoch": consumed_batches // batches_per_epoch,
        "batch_in_epoch": consumed_batches % batches_per_epoch,
        "guard": guard.state_dict(),
        "world_size": world_size,
    }


def roles_state(model, roles) -> dict[str, torch.Tensor]:
    """The trained roles' adapter + head weights, keyed "<role>/<name>" (full tensors, every rank)."""
    state = {}
    for role in roles:
        for name, tensor in model.role_state_dict(role).items():
            if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather (collective, every rank)
                tensor = tensor.full_tensor()
            state[f"{role}/{name}"] = tensor
    return state


def _optimizer_state(model, optimizer, ctx):
    if ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer


def save_trainer_checkpoint(ctx, model, roles, optimizer, scheduler, *, output_dir: str, step: int,
                            trainer_state: dict, rng_states: list | None = None,
                            keep_last: int | None = None) -> Path | None:
    """Atomic `output_dir/checkpoint-<step>`; call on every rank. Returns its path on rank 0, None on
    the others. rng_states: one per rank (default: gathered from every rank now)."""
    model_state = roles_state(model, roles)
    optimizer_state = _optimizer_state(model, optimizer, ctx)
    if rng_states is None:
        rng_states = ctx.all_gather_object(capture_rng_state())
    path = None
    if ctx.is_main:
        path = save_checkpoint(output_dir, step, model_state=model_state, optimizer=optimizer_state,
                               scheduler=scheduler, trainer_state=trainer_state, rng_states=rng_states,
                               keep_last=keep_last)
    ctx.barrier()
    return path


def load_trainer_checkpoint(ctx, model, roles, optimizer, scheduler, *, resume, output_dir: str) -> tuple[Path, dict] | None:
    """Load the checkpoint `resume` points at ("auto": the latest in output_dir) into the roles'
    weights, the optimizer, the scheduler and this rank's RNG; returns (path, trainer_state), or
    None when there is nothing to resume from. Rank 0 chooses the checkpoint for every rank."""
    path = resolve_resume(resume, output_dir) if ctx.is_main else None
    path = ctx.broadcast_object(None if path is None else str(path))
    if path is None:
        return None
    if ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        model_state, state = load_checkpoint(path, scheduler=scheduler, rank=ctx.rank)
        set_optimizer_state_dict(model, optimizer, load_optimizer_state(path),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        model_state, state = load_checkpoint(path, optimizer=optimizer, scheduler=scheduler, rank=ctx.rank)
    saved_world = int(state.get("world_size", ctx.world_size))
    if saved_world != ctx.world_size:
        # consumed_batches counts per-rank batches and the RNG states are per rank: neither maps
        # onto another number of processes, so the resume would silently replay or skip data.
        raise ValueError(
            f"resume: {path} was written by {saved_world} processes but this run has "
            f"{ctx.world_size}; resume with the same number of processes (torchrun --nproc-per-node)"
        )
    for role in roles:
        prefix = f"{role}/"
        model.load_role_state_dict(role, {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)})
    return Path(path), state
