"""Ctrl-C without lost work. The first Ctrl-C only asks the loop to stop: the current step finishes,
a checkpoint is saved, then KeyboardInterrupt is raised. A second Ctrl-C interrupts at once; the loop
then saves the last completed step, for which it needs the data position and RNG state at that
step's end (`StepBoundary`), since the interrupted step already consumed data and random numbers.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

import torch

from fastrlhf.checkpoint import capture_rng_state


class DeferredCtrlC:
    """`with DeferredCtrlC(say) as ctrl_c:` ... `if ctrl_c.stop_agreed(ctx): ...`

    Inside the block the first SIGINT sets `requested` and puts Python's previous handler back, so a
    second one raises KeyboardInterrupt. Only the main thread can own signal handlers: elsewhere
    the block runs with the default handling."""

    def __init__(self, say: Callable[[str], None], activity: Callable[[], str | None] | None = None) -> None:
        self.say = say
        self.activity = activity  # what the step is doing now, for the message (e.g. "generating 12/64 tokens")
        self.requested = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> "DeferredCtrlC":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._request_stop)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _request_stop(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        doing = self.activity() if self.activity is not None else None
        now = f" (now: {doing})" if doing else ""
        self.say(f"Ctrl-C: finishing this step{now}, then saving a checkpoint; Ctrl-C again to stop at once "
                 "(the last completed step is saved)")

    def stop_agreed(self, ctx) -> bool:
        """True when any rank was asked to stop: every rank must stop at the same step, since
        saving is a collective (one tiny all-reduce under torchrun)."""
        if not ctx.distributed:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=ctx.device)
        ctx.all_reduce_max(flag)
        return bool(flag.item())


class StepBoundary:
    """The data position and RNG state after the last completed step, and whether the optimizer has
    already changed the weights in the step running now (then a save of the last completed step
    holds those weights, and says so with partial_step=True).

    Single process only: with several processes every rank would have to agree on the interrupted
    step, so there the interrupt stops the job without this extra save."""

    def __init__(self) -> None:
        self.data_position = 0  # examples consumed (BatchStream.position)
        self.rng: dict | None = None
        self.weights_changed = False

    def mark(self, data_position: int, ctx) -> None:
        self.weights_changed = False
        if not ctx.distributed:
            self.data_position, self.rng = data_position, capture_rng_state()
