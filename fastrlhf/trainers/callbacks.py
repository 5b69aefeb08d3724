"""Callbacks and metric reporters, with transformers' `TrainerCallback` interface.

A callback is any object with some of the methods `on_train_begin`, `on_step_end`, `on_log`,
`on_evaluate`, `on_train_end`, each called as `method(args, state, control, **kwargs)` like
transformers' Trainer does: `args` is the trainer config, `state` a `transformers.TrainerState`
(global_step, max_steps, epoch, log_history), `control` a `transformers.TrainerControl`; setting
`control.should_training_stop = True` ends the run after the current step (single process).
So `transformers.TrainerCallback` subclasses written for TRL work unchanged, within these events.

The `report_to` integrations are callbacks too: `TensorBoardReporter` (OUTPUT_DIR/tensorboard) and
`WandbReporter` (wandb is optional: imported only when asked for). Both also receive the sample
completions (`log_samples`), as text and as a table.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("fastrlhf.trainers")

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_train_end")


class CallbackRunner:
    """Calls the callbacks' methods with (args, state, control); rank 0 only (see MetricsLog)."""

    def __init__(self, callbacks: Sequence, args) -> None:
        from transformers import TrainerControl, TrainerState

        for cb in callbacks:
            if not any(callable(getattr(cb, event, None)) for event in EVENTS) and not hasattr(cb, "log_samples"):
                raise ValueError(f"callback {cb!r} has none of the methods {EVENTS}")
        self.callbacks = list(callbacks)
        self.args = args
        self.state = TrainerState()
        self.control = TrainerControl()

    def call(self, event: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if callable(method):
                method(self.args, self.state, self.control, **kwargs)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        for cb in self.callbacks:
            if callable(getattr(cb, "log_samples", None)):
                cb.log_samples(step, samples)


def samples_markdown(samples: list[dict]) -> str:
    """A markdown table of sample completions (what TensorBoard's text tab shows)."""
    keys = list(samples[0]) if samples else []
    rows = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for sample in samples:
        rows.append("| " + " | ".join(str(sample[k]).replace("|", "\\|").replace("\n", " ") for k in keys) + " |")
    return "\n".join(rows)


class TensorBoardReporter:
    """Scalars of every logged record and the sample completions (text) to OUTPUT_DIR/tensorboard.
    Without the tensorboard package it says so once and does nothing."""

    def __init__(self, output_dir: str, *, required: bool = False) -> None:
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        except Exception as error:  # noqa: BLE001 - tensorboard missing or broken
            (logger.warning if required else logger.info)(f"TensorBoard logging off: {error}")

    def on_log(self, args, state, control, logs=None, **_: Any) -> None:
        if self.writer is None or not logs:
            return
        step = logs.get("step", state.global_step)
        for key, value in logs.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if self.writer is not None:
            self.writer.add_text("completions", samples_markdown(samples), step)
            self.writer.flush()

    def on_train_end(self, *_: Any, **__: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbReporter:
    """Every logged record and the sample completions (a wandb.Table) to Weights & Biases. The run
    is named after the output directory; WANDB_PROJECT (default "fastrlhf") and the other WANDB_*
    variables work as usual."""

    def __init__(self, output_dir: str, config: dict) -> None:
        import wandb  # checked by the config: report_to=wandb needs the package

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastrlhf"),
                              name=os.path.basename(os.path.abspath(output_dir)), config=config, dir=output_dir)

    def on_log(self, args, state, control, logs=None, **_: Any) -> None:
        if logs:
            numbers = {k: v for k, v in logs.items() if k != "step" and isinstance(v, (int, float))}
            self.run.log(numbers, step=logs.get("step", state.global_step))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        if samples:
            table = self.wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])
            self.run.log({"completions": table}, step=step)

    def on_train_end(self, *_: Any, **__: Any) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def make_reporters(report_to: Sequence[str], output_dir: str, config: dict) -> list:
    reporters: list = []
    for name in report_to:
        if name == "tensorboard":
            reporters.append(TensorBoardReporter(output_dir))
        elif name == "wandb":
            reporters.append(WandbReporter(output_dir, config))
        else:
            raise ValueError(f"report_to: unknown integration {name!r}")
    return reporters
