"""The training data as the loop sees it: records loaded and checked, then an endless stream of
batches in an order that needs no saving (a seeded permutation per epoch, this rank's shard of it),
so a resumed run finds its place from one number, the batches consumed so far."""
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


class BatchStream:
    """Batches of `examples` in a deterministic order: the (seed, epoch) permutation of the data,
    this rank's shard of it, cut into `batch_size` batches; epochs follow each other without end,
    or stop after `epochs` when it is given.

    `consumed` counts the batches taken on this rank; a resume sets it before `start()`.
    """

    def __init__(self, examples: Sequence, batch_size: int, *, ctx, seed: int, epochs: int | None) -> None:
        self.examples, self.batch_size, self.ctx, self.seed = examples, batch_size, ctx, seed
        self.batches_per_epoch = math.ceil(math.ceil(len(examples) / ctx.world_size) / batch_size)
        self.limit = None if epochs is None else epochs * self.batches_per_epoch
        self.consumed = 0
        self._batches: Iterator[list] | None = None

    def start(self) -> None:
        """(Re)start the stream at `consumed` (0, or where a resumed run left off)."""
        self._batches = self._from(self.consumed)

    def take(self, n: int) -> list[list]:
        """Up to `n` batches (fewer at the very end of the last epoch)."""
        left = n if self.limit is None else min(n, self.limit - self.consumed)
        batches = [next(self._batches) for _ in range(max(left, 0))]
        self.consumed += len(batches)
        return batches

    def epoch(self) -> float:
        """Epochs completed so far, fractional."""
        return self.consumed / self.batches_per_epoch

    def _from(self, start: int) -> Iterator[list]:
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            order = self.ctx.shard_epoch(range(len(self.examples)), seed=self.seed, epoch=epoch)
            for b in range(index, self.batches_per_epoch):
                ids = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield [self.examples[i] for i in ids]
            epoch, index = epoch + 1, 0
