"""What a run reports while it trains: `OUTPUT_DIR/metrics.jsonl` (one JSON line per logged window
of steps and per evaluation), the same records to the `report_to` integrations (TensorBoard, wandb)
and the user's callbacks (`fastrlhf.trainers.callbacks`), sample completions to
`OUTPUT_DIR/completions.jsonl`, a tqdm bar with live metrics and what the step is doing right now
(`set_activity`: "generating 12/64 tokens"), and log lines. Rank 0 writes; every rank averages.

Step metrics stay tensors on the device and are summed into a window; `to_floats` is the one place
where they reach the host (a mean over ranks, then `float`), once per logged window and per
evaluation, so the training step itself never waits for the device.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger("fastrlhf.trainers")


class MetricsLog:
    def __init__(self, ctx, output_dir: str, *, progress: bool, progress_keys: Sequence[str],
                 report_to: Sequence[str] = ("tensorboard",), callbacks: Sequence | None = None, config=None) -> None:
        self.ctx = ctx
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.progress_keys = tuple(progress_keys)
        self.report_to = tuple(report_to)
        self.user_callbacks = list(callbacks or [])
        self.config = config
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self._file = None
        self._callbacks = None  # CallbackRunner over the reporters and the user's callbacks (rank 0, once open)
        self._bar = None
        self._desc = ""
        self._activity: str | None = None
        self._activity_shown = 0.0
        self._stop_requested = False

    def to_floats(self, metrics: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
        """Mean over ranks of each scalar, as Python floats keyed `prefix + name`: the host sync.
        A collective: every rank calls it with the same keys."""
        reduced = self.ctx.reduce_metrics(metrics)
        return {prefix + k: float(v) for k, v in reduced.items()}

    def say(self, message: str) -> None:
        """A log line (and a line above the progress bar on rank 0; on stderr without the bar)."""
        logger.info(message)
        if self.ctx.is_main and self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)
        elif self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ what the step is doing
    def set_activity(self, text: str | None, *, force: bool = False) -> None:
        """Show what the current step is doing next to the bar ("generating 12/64 tokens"); None clears
        it. Redrawn at most 5 times a second unless `force`."""
        self._activity = text
        if self._bar is None or self._bar.disable:
            return
        now = time.monotonic()
        if force or text is None or now - self._activity_shown >= 0.2:
            self._activity_shown = now
            self._bar.set_description(self._desc if text is None else f"{self._desc} [{text}]", refresh=True)

    def activity(self) -> str | None:
        """What the current step is doing (what a Ctrl-C interrupts), or None."""
        return self._activity

    @property
    def stop_requested(self) -> bool:
        """A callback set control.should_training_stop."""
        return self._stop_requested

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Sample completions ([{"prompt", "completion", "reward", ...}]) to completions.jsonl and the
        integrations (rank 0)."""
        if not self.ctx.is_main or not samples:
            return
        with open(self.output_dir / "completions.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "samples": samples}) + "\n")
        if self._callbacks is not None:
            self._callbacks.log_samples(step, samples)

    # ------------------------------------------------------------------ files and bar
    def open(self, *, step: int, resumed: bool) -> None:
        """Open metrics.jsonl for appending (after a resume: without the lines logged after the
        checkpoint's `step`, so the file reads like one run, and without lines that are not JSON,
        e.g. one torn by a crash, each skipped with a warning; otherwise emptied) and TensorBoard."""
        if not self.ctx.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "metrics.jsonl"
        if resumed and path.exists():
            kept = [line for line, record in read_metrics_lines(path) if record.get("step", 0) <= step]
            from fastrlhf.checkpoint import write_text_atomic

            write_text_atomic(path, "".join(line + "\n" for line in kept))  # a crash here keeps the old file
        elif not resumed and path.exists():
            path.unlink()
        self._file = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        samples = self.output_dir / "completions.jsonl"
        if not resumed and samples.exists():
            samples.unlink()
        from fastrlhf.trainers.callbacks import CallbackRunner, make_reporters

        config = self.config.to_dict() if self.config is not None else {}
        reporters = make_reporters(self.report_to, str(self.output_dir), config)
        self._callbacks = CallbackRunner([*reporters, *self.user_callbacks], self.config)
        self._callbacks.state.global_step = self._steps_done = step
        self._callbacks.call("on_train_begin")

    def start_bar(self, *, total: int, initial: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self._desc = desc
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                         disable=not (self.progress and self.ctx.is_main), file=sys.stderr)
        if self._callbacks is not None:
            self._callbacks.state.max_steps = total

    def step_done(self) -> None:
        self.set_activity(None)
        self._bar.update(1)
        if self._callbacks is not None:
            self._callbacks.state.global_step = self._steps_done = self._steps_done + 1
            self._callbacks.call("on_step_end")
            if self._callbacks.control.should_training_stop and not self._stop_requested:
                if self.ctx.distributed:  # every rank must stop at the same step; only rank 0 runs callbacks
                    self.say("a callback asked to stop; ignored under torchrun (stop with Ctrl-C)")
                else:
                    self._stop_requested = True
                    self.say(f"a callback asked to stop: stopping after step {self._callbacks.state.global_step}")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if self._callbacks is not None:
            self._callbacks.call("on_train_end")
            self._callbacks = None

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line (rank 0); its numbers also go to TensorBoard at `record["step"]`.
        The line reaches the file whole or not at all (`append_line`)."""
        if not self.ctx.is_main:
            return
        append_line(self._file, json.dumps(record) + "\n")
        if self._callbacks is not None:
            self._callbacks.state.global_step = record.get("step", self._callbacks.state.global_step)
            self._callbacks.state.log_history.append(dict(record))
            self._callbacks.call("on_log", logs=record)
            if any(k.startswith("eval/") for k in record):
                self._callbacks.call("on_evaluate", metrics={k: v for k, v in record.items() if k.startswith("eval/")})

    # ------------------------------------------------------------------ the window of step metrics
    def accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).to(self.ctx.device)
            self._window[key] = self._window.get(key, 0.0) + value
        self._window_steps += 1

    def log_window(self, *, step: int, epoch: float, elapsed_s: float) -> dict[str, Any] | None:
        """Write the mean of the steps accumulated since the last call; returns the record written
        ({"step", "epoch", metrics..., "elapsed_s"}), None when the window is empty."""
        if not self._window_steps:
            return None
        floats = self.to_floats({k: v / self._window_steps for k, v in self._window.items()})
        self._window, self._window_steps = {}, 0
        record = {"step": step, "epoch": round(epoch, 4), **floats, "elapsed_s": round(elapsed_s, 3)}
        if self._callbacks is not None:
            self._callbacks.state.epoch = epoch
        self.write(record)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{floats[k]:.4g}" for k in self.progress_keys if k in floats}, refresh=False)
        return record


def append_line(fd: int, line: str) -> None:
    """Append `line` to the file opened as `fd` (O_APPEND) whole or not at all: one os.write of the
    whole line (continued if the OS writes part of it); if writing fails part-way (a full disk),
    the file is cut back to its length before the line and the error is raised."""
    data = line.encode("utf-8")
    start = os.lseek(fd, 0, os.SEEK_END)
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
    except BaseException:
        if written or os.lseek(fd, 0, os.SEEK_END) != start:
            os.ftruncate(fd, start)
        raise


def read_metrics_lines(path) -> list[tuple[str, dict]]:
    """(line, record) for every line of a metrics.jsonl that is a JSON object; other lines (a
    write torn by a crash or a full disk) are skipped with a warning naming the file and line."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                warnings.warn(f"{path}: line {number} is not valid JSON (a torn write?): skipped: {line[:80]!r}",
                              stacklevel=3)
                continue
            out.append((line, record))
    return out
