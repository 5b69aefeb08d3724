"""Checkpoints in trainer terms, on top of `fastrlhf.checkpoint` (atomic, verified directories, RNG
states): which weights a trainer saves (its trained roles' adapters and heads, keyed "<role>/<name>"),
the optimizer state (gathered into one full state under FSDP2), and where the loop stands
(`loop_state`: the keys of trainer_state.pt, the data position in examples). Rank 0 writes and
chooses the checkpoint to resume from; every rank takes part, since gathering sharded weights and
RNG states are collectives.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastrlhf.checkpoint import (
    CheckpointContents,
    CheckpointError,
    capture_rng_state,
    read_checkpoint,
    read_resume_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def loop_state(*, step: int, data: dict, epoch: float, guard, world_size: int) -> dict:
    """Where the loop stands after `step` completed steps: what a resume needs besides the weights,
    the optimizer, the schedule and the RNG (trainers add their own keys, e.g. the KL controller).
    data: `BatchStream.state_dict()`, the position in examples."""
    return {
        "step": step,
        "data": data,
        "epoch": epoch,
        "guard": guard.state_dict(),
        "world_size": world_size,
    }


def legacy_data_position(state: dict, stream) -> dict | None:
    """The data position of a checkpoint written before positions were counted in examples (it
    counted batches of a batch size it did not record): read with this run's batch size, so the
    resume is exact only if the batch size is the same. None when `state` has the new key."""
    if "data" in state or "consumed_batches" not in state:
        return None
    epoch, batch = int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0))
    return {**stream.state_dict(), "examples": epoch * stream.examples_per_epoch + batch * stream.batch_size}


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
                            keep_last: int | None = None, run_record: dict | None = None) -> Path | None:
    """Atomic `output_dir/checkpoint-<step>`; call on every rank. Returns its path on rank 0, None on
    the others. rng_states: one per rank (default: gathered from every rank now). run_record: the
    run's identity (run.json), which also limits keep_last to this run's checkpoints."""
    model_state = roles_state(model, roles)
    optimizer_state = _optimizer_state(model, optimizer, ctx)
    if rng_states is None:
        rng_states = ctx.all_gather_object(capture_rng_state())
    path = None
    if ctx.is_main:
        path = save_checkpoint(output_dir, step, model_state=model_state, optimizer=optimizer_state,
                               scheduler=scheduler, trainer_state=trainer_state, rng_states=rng_states,
                               keep_last=keep_last, run_record=run_record)
    ctx.barrier()
    return path


def read_trainer_checkpoint(ctx, *, resume, output_dir: str, run_id: str | None = None,
                            warn=None) -> CheckpointContents | None:
    """The checkpoint `resume` points at ("auto": the newest intact one of run `run_id` in
    output_dir, skipping damaged ones with a warning), read into memory on every rank; None when
    there is nothing to resume from. Rank 0 chooses for every rank; an error there (a damaged
    explicit checkpoint) is raised on every rank, so that none waits for the others."""
    contents, chosen = None, None
    if ctx.is_main:
        try:
            contents = read_resume_checkpoint(resume, output_dir, run_id=run_id, warn=warn)
            chosen = ("path", None if contents is None else str(contents.path))
        except CheckpointError as error:
            chosen = ("error", str(error))
    kind, value = ctx.broadcast_object(chosen)
    if kind == "error":
        raise CheckpointError(value)
    if value is None:
        return None
    return contents if contents is not None else read_checkpoint(value, verify=False)


def apply_trainer_checkpoint(ctx, contents: CheckpointContents, model, roles, optimizer, scheduler) -> None:
    """Load a checkpoint read by `read_trainer_checkpoint` into the roles' weights, the optimizer
    (re-sharded under FSDP2), the scheduler and this rank's RNG."""
    if ctx.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, contents.optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    elif contents.optimizer_state is not None:
        optimizer.load_state_dict(contents.optimizer_state)
    if scheduler is not None and contents.scheduler_state is not None:
        scheduler.load_state_dict(contents.scheduler_state)
    rng = contents.rng_state(ctx.rank)
    if rng is not None:
        restore_rng_state(rng)
    for role in roles:
        prefix = f"{role}/"
        model.load_role_state_dict(role, {k[len(prefix):]: v for k, v in contents.model_state.items()
                                          if k.startswith(prefix)})


def check_world_size(contents: CheckpointContents, ctx) -> None:
    saved_world = int(contents.trainer_state.get("world_size", ctx.world_size))
    if saved_world != ctx.world_size:
        # the data position is per rank and the RNG states are per rank: neither maps onto another
        # number of processes, so the resume would silently replay or skip data.
        raise CheckpointError(
            f"resume: {contents.path} was written by {saved_world} processes but this run has "
            f"{ctx.world_size}; resume with the same number of processes (torchrun --nproc-per-node)"
        )
