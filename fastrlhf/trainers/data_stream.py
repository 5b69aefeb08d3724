"""The training data as the loop sees it: records loaded and checked, then an endless stream of
batches in an order that needs no saving (a seeded permutation per epoch, this rank's shard of it),
so a resumed run finds its place from one number, the examples consumed so far (with any batch size)."""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence


def load_and_check_records(records, kind: str, source: str) -> list[dict]:
    """`records` (a list of dicts, or a path for `fastrlhf.data.load_records`) checked against the
    record format `kind` ("sft", "preference", "prompt"); ValueError naming `source` otherwise."""
    from fastrlhf.data import load_records, validate_records

    if isinstance(records, (str, os.PathLike)):
        source = str(records)
        records = load_records(str(records))
    if records is None:
        raise ValueError(f"{source}: no dataset given")
    records = list(records)
    validate_records(records, kind, source=source)
    return records


class DataPositionError(ValueError):
    """A saved data position that cannot be continued exactly (the data or the number of processes changed)."""


class BatchStream:
    """Batches of `examples` in a deterministic order: the (seed, epoch) permutation of the data,
    this rank's shard of it, cut into `batch_size` batches (the last batch of an epoch may be
    shorter; no batch spans two epochs); epochs follow each other without end, or stop after
    `epochs` when it is given.

    The position is counted in EXAMPLES of this rank's shard (`position`, over all epochs), not in
    batches: the batch size does not enter the order, so a run resumed with another batch size
    continues exactly at the next unseen example (`state_dict` / `load_state_dict`).
    """

    def __init__(self, examples: Sequence, batch_size: int, *, ctx, seed: int, epochs: int | None) -> None:
        self.examples, self.batch_size, self.ctx, self.seed, self.epochs = examples, batch_size, ctx, seed, epochs
        self.examples_per_epoch = math.ceil(len(examples) / ctx.world_size)  # this rank's shard
        self.limit = None if epochs is None else epochs * self.examples_per_epoch
        self.position = 0
        self._batches: Iterator[list] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.examples_per_epoch / self.batch_size)

    def start(self) -> None:
        """(Re)start the stream at `position` (0, or where a resumed run left off)."""
        self._batches = self._from(self.position)

    def take(self, n: int) -> list[list]:
        """Up to `n` batches (fewer at the very end of the last epoch)."""
        batches = []
        while len(batches) < n and (self.limit is None or self.position < self.limit):
            batch = next(self._batches)
            self.position += len(batch)
            batches.append(batch)
        return batches

    def epoch(self) -> float:
        """Epochs completed so far, fractional."""
        return self.position / self.examples_per_epoch

    def batches_left(self) -> int | None:
        """Batches until the last epoch ends from the current position (None without an epoch limit)."""
        if self.limit is None:
            return None
        epoch, offset = divmod(min(self.position, self.limit), self.examples_per_epoch)
        if epoch >= self.epochs:
            return 0
        this_epoch = math.ceil((self.examples_per_epoch - offset) / self.batch_size)
        return this_epoch + (self.epochs - epoch - 1) * self.batches_per_epoch

    def state_dict(self, position: int | None = None) -> dict:
        """The data position to save (default: the current one): examples of this rank's shard
        consumed, with what it is relative to, so that a resume can check it still applies."""
        return {"examples": self.position if position is None else position,
                "examples_per_epoch": self.examples_per_epoch, "num_examples": len(self.examples),
                "world_size": self.ctx.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a saved position; DataPositionError when it cannot be continued exactly."""
        if state.get("num_examples") != len(self.examples):
            raise DataPositionError(
                f"the checkpoint's data position counts {state.get('num_examples')} training examples, this run "
                f"has {len(self.examples)}: the training data changed, so where the run stopped cannot be found "
                "in it; resume with the same data (and max_length), or start a new run")
        if state.get("world_size", self.ctx.world_size) != self.ctx.world_size:
            raise DataPositionError(
                f"the checkpoint's data position is per process for {state.get('world_size')} processes, this run "
                f"has {self.ctx.world_size}; resume with the same number of processes")
        self.position = int(state["examples"])

    def _from(self, position: int) -> Iterator[list]:
        epoch, offset = divmod(position, self.examples_per_epoch)
        while True:
            order = self.ctx.shard_epoch(range(len(self.examples)), seed=self.seed, epoch=epoch)
            for start in range(offset, self.examples_per_epoch, self.batch_size):
                yield [self.examples[i] for i in order[start : start + self.batch_size]]
            epoch, offset = epoch + 1, 0
