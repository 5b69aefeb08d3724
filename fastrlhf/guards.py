"""Non-finite guard: a NaN/inf loss or gradient skips the optimizer step instead of poisoning the weights.

One host sync per optimizer step, by design: the loss and every gradient norm are stacked into one
small tensor and checked with a single `torch.isfinite(...).all()` that is read on the host (the
decision "step or skip" has to be made on the host). Everything else in the training step stays
asynchronous. Under torchrun the verdict is combined over ranks (MAX of the "bad" flag, one tiny
all-reduce), so every rank skips the same steps and the replicas never diverge.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


class NonFiniteStop(RuntimeError):
    """The run stopped after `max_consecutive` non-finite steps in a row (the message says what to try)."""


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradients are not finite; stop after K in a row.

    guard = NonFiniteGuard(max_consecutive=K)
    ...
    loss.backward(); ctx.sync_gradients(params)
    if guard.step_ok(loss, params):      # False: gradients were cleared, do not step
        optimizer.step()

    max_consecutive: K >= 1; the K-th non-finite step in a row raises NonFiniteStop (a RuntimeError).
        None / 0 never raises (only skips). ctx: a `fastrlhf.distributed.DistContext` to agree across ranks.
    Counters: `.skipped_steps` (total), `.consecutive` (current run of bad steps); both survive a
    resume through `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, max_consecutive: int | None = 5, *, ctx=None) -> None:
        if max_consecutive is not None and max_consecutive < 0:
            raise ValueError(f"max_consecutive must be None or >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive or None
        self.ctx = ctx
        self.skipped_steps = 0
        self.consecutive = 0

    def step_ok(
        self,
        loss: torch.Tensor | float,
        params: Iterable[torch.nn.Parameter] = (),
        *,
        grad_norm: torch.Tensor | None = None,
    ) -> bool:
        """True if `loss` and all gradients of `params` are finite (go ahead and step).

        False: the step is skipped and counted, and the gradients of `params` are set to None so the
        next accumulation window starts clean. Raises NonFiniteStop when this makes K in a row.
        grad_norm: a total gradient norm already computed (e.g. returned by clip_grad_norm_);
        when given, the per-parameter norms are not recomputed.
        """
        params = [p for p in params if p.grad is not None]
        loss_t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        checks = [loss_t.float().reshape(-1)]
        if grad_norm is not None:
            checks.append(_local(grad_norm.detach()).float().reshape(-1).to(loss_t.device))
        elif params:
            norms = torch._foreach_norm([_local(p.grad) for p in params])
            checks.append(torch.stack([n.float() for n in norms]).to(loss_t.device))
        bad = (~torch.isfinite(torch.cat(checks)).all()).to(torch.int32).reshape(1)
        if self.ctx is not None and getattr(self.ctx, "distributed", False):
            # every rank must take the same decision, or the replicas would drift apart
            bad = bad.to(self.ctx.device)
            self.ctx.all_reduce_max(bad)
        if not bool(bad.item()):  # the one host sync per optimizer step
            self.consecutive = 0
            return True
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise NonFiniteStop(
                f"stopping: {self.consecutive} non-finite steps in a row (last loss={_fmt(loss_t)}, "
                f"{self.skipped_steps} skipped in total) — lower the learning rate / check data for "
                "NaN/inf, overly long sequences or bad rewards; with bf16 try fp32"
            )
        return False

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 DTensor (plain tensors unchanged). A shard is finite iff its
    local values are; the ranks then agree through the all-reduce in `step_ok`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fmt(loss: torch.Tensor) -> str:
    values = loss.float().reshape(-1)
    if values.numel() != 1:
        return f"tensor of {values.numel()} values"
    value = float(values.item())
    return "nan" if math.isnan(value) else repr(value)
