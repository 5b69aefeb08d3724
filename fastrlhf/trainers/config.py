"""The options every trainer shares (`TrainerConfig`) and those of the trainers that learn from fixed
sequences (`SupervisedConfig`). Each field's `help` is what `python -m fastrlhf.train STAGE --help`
shows; `fastrlhf.cli` builds the command line from these dataclasses.

Values are checked once, when the config is built (`__post_init__` -> `validate`), with errors that
name the option; the CLI reports them as `--option: ...`. An option that can be off is typed
`X | None` and is None when off.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from fastrlhf._checks import check_choice, check_int, check_number
from fastrlhf._dispatch import BACKENDS
from fastrlhf.options import option_help, unset_as_none

LR_SCHEDULES = ("cosine", "linear", "constant")
BF16_MODES = ("auto", "true", "false")


@dataclass
class TrainerConfig:
    """Options shared by every trainer. Each field's `help` is what `python -m fastrlhf.train --help` shows."""

    output_dir: str = field(default="fastrlhf-output", metadata=option_help(
        "directory for metrics.jsonl, TensorBoard logs, checkpoints and the trained adapters/heads"))
    learning_rate: float = field(default=1e-4, metadata=option_help("peak AdamW learning rate"))
    batch_size: int = field(default=8, metadata=option_help(
        "examples per device per micro-batch (global batch = batch_size x grad_accum_steps x processes)"))
    grad_accum_steps: int = field(default=1, metadata=option_help("micro-batches accumulated per optimizer step"))
    eval_batch_size: int = field(default=8, metadata=option_help("examples per device per evaluation batch"))
    epochs: int = field(default=1, metadata=option_help("passes over the training data (ignored when max_steps > 0)"))
    max_steps: int = field(default=0, metadata=option_help("stop after this many training steps; 0 = run `epochs` epochs"))
    lr_schedule: str = field(default="cosine", metadata=option_help(f"learning-rate schedule after warmup: {', '.join(LR_SCHEDULES)}"))
    warmup_ratio: float = field(default=0.0, metadata=option_help("fraction of optimizer steps with linear LR warmup, in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=option_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=option_help("clip the global gradient norm to this value; 0 = no clipping"))
    seed: int = field(default=0, metadata=option_help("seed for the data order, sampling and initialisation of new heads"))
    logging_steps: int = field(default=1, metadata=option_help("write averaged metrics every N steps"))
    eval_steps: int = field(default=0, metadata=option_help("evaluate every N steps when eval data is given; 0 = only at the end"))
    save_steps: int = field(default=0, metadata=option_help("save a resumable checkpoint every N steps; 0 = none during training"))
    save_total_limit: int | None = field(default=None, metadata=option_help(
        "keep only the newest N checkpoints; none = keep all (0, which older versions wrote, is read as none)"))
    save_final: bool = field(default=True, metadata=option_help("save the trained roles (adapters + heads) to output_dir at the end"))
    bf16: str = field(default="auto", metadata=option_help("bf16 autocast: auto (on when CUDA supports it), true, false; never on CPU"))
    backend: str = field(default="auto", metadata=option_help("loss/kernel backend: auto (Triton on CUDA), triton, torch"))
    progress: bool = field(default=True, metadata=option_help("show a tqdm progress bar with live metrics"))
    max_consecutive_nonfinite: int = field(default=5, metadata=option_help(
        "skip steps with NaN/inf loss or gradients; stop after this many in a row (0 = never stop)"))
    resume: str | None = field(default=None, metadata=option_help(
        "resume from a checkpoint directory, or 'auto' for the latest in output_dir; none = start fresh"))
    fsdp: bool = field(default=False, metadata=option_help("shard the model with FSDP2 under torchrun (default: DDP-style gradient averaging)"))
    gradient_checkpointing: bool = field(default=False, metadata=option_help(
        "activation checkpointing: recompute each decoder layer in backward instead of storing its activations "
        "(also in PPO/GRPO, whose iteration runs in eval mode)"))
    fused_head: bool = field(default=True, metadata=option_help(
        "compute the final loss (SFT, DPO, PPO/GRPO policy) straight from the hidden states with the LM head's "
        "gradients made in the forward (6·N·V·H FLOPs); --no-fused-head: token log-probs, then the loss "
        "(the logits are made again in backward, 8·N·V·H)"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad option. Subclasses extend it (call super().validate()).

        Also brings accepted spellings to their one meaning, so nothing downstream re-interprets
        them: bf16 True/False/"TRUE" -> "true"/"false", resume "" -> None, save_total_limit 0 -> None.
        Safe to call again (the trainer does, since a config is a mutable dataclass)."""
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum_steps", self.grad_accum_steps, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("epochs", self.epochs, 1)
        check_int("max_steps", self.max_steps, 0)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_number("warmup_ratio", self.warmup_ratio, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("max_grad_norm", self.max_grad_norm, low=0)
        check_int("seed", self.seed, 0)
        check_int("logging_steps", self.logging_steps, 1)
        check_int("eval_steps", self.eval_steps, 0)
        check_int("save_steps", self.save_steps, 0)
        self.save_total_limit = unset_as_none(self.save_total_limit)
        if self.save_total_limit is not None:
            check_int("save_total_limit", self.save_total_limit, 1)
        if isinstance(self.bf16, bool):  # accept bf16=True/False from Python callers
            self.bf16 = "true" if self.bf16 else "false"
        if isinstance(self.bf16, str):
            self.bf16 = self.bf16.lower()
        check_choice("bf16", self.bf16, BF16_MODES)
        check_choice("backend", self.backend, BACKENDS)
        check_int("max_consecutive_nonfinite", self.max_consecutive_nonfinite, 0)
        self.resume = unset_as_none(self.resume)
        if self.resume is not None and not isinstance(self.resume, (str, os.PathLike)):
            raise ValueError(f"resume must be a checkpoint path, 'auto' or None, got {self.resume!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class SupervisedConfig(TrainerConfig):
    """Options shared by the trainers that learn from fixed sequences (SFT, reward model, DPO)."""

    max_length: int = field(default=512, metadata=option_help(
        "max tokens per sequence (prompt + completion); longer ones are truncated with a warning"))

    def validate(self) -> None:
        super().validate()
        check_int("max_length", self.max_length, 2)

