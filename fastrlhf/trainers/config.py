"""The options every trainer shares (`TrainerConfig`), those of the trainers that learn from fixed
sequences (`SupervisedConfig`) and of those that learn from preference pairs (`PreferenceConfig`).
Each field's `help` is what `python -m fastrlhf.train STAGE --help` shows; `fastrlhf.cli` builds
the command line from these dataclasses.

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
from fastrlhf.trainers import TRAINERS
from fastrlhf.trl_compat import ConfigMeta

LR_SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_OUTPUT_ROOT = "fastrlhf-output"
BF16_MODES = ("auto", "true", "false")
REPORT_TO = ("tensorboard", "wandb")  # and "none", "all"


@dataclass
class TrainerConfig(metaclass=ConfigMeta):
    """Options shared by every trainer. Each field's `help` is what `python -m fastrlhf.train --help` shows.

    TRL's names are accepted too (`per_device_train_batch_size=`, `num_train_epochs=`, ...): see
    `fastrlhf.trl_compat`, the one table of them."""

    output_dir: str | None = field(default=None, metadata=option_help(
        f"directory for metrics.jsonl, TensorBoard logs, checkpoints and the trained adapters/heads; it must be "
        f"empty unless resuming or --overwrite-output-dir; "
        f"none = {DEFAULT_OUTPUT_ROOT}/<stage> (the command: sft, rm, dpo, kto, ppo, grpo)"))
    overwrite_output_dir: bool = field(default=False, metadata=option_help(
        "start a new run in a non-empty output_dir: first remove what an earlier fastrlhf run wrote there "
        "(checkpoints, logs, adapters, merged model); other files stay"))
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
    bf16: str = field(default="auto", metadata=option_help(
        "bf16 autocast: auto (on when CUDA supports it), true, false; never on CPU; --bf16 alone = true", flag="true"))
    backend: str = field(default="auto", metadata=option_help("loss/kernel backend: auto (Triton on CUDA), triton, torch"))
    progress: bool = field(default=True, metadata=option_help("show a tqdm progress bar with live metrics"))
    max_consecutive_nonfinite: int = field(default=5, metadata=option_help(
        "skip steps with NaN/inf loss or gradients; stop after this many in a row (0 = never stop)"))
    resume: str | None = field(default=None, metadata=option_help(
        "resume from a checkpoint directory, or 'auto' for the newest intact one in output_dir (the same run: "
        "only run length, batch size, cadence and progress options may change); none = start fresh"))
    fsdp: bool = field(default=False, metadata=option_help("shard the model with FSDP2 under torchrun (default: DDP-style gradient averaging)"))
    report_to: str = field(default="tensorboard", metadata=option_help(
        "where metrics go besides OUTPUT_DIR/metrics.jsonl: tensorboard (when installed), wandb (pip install wandb), "
        "both comma-separated, all, or none"))
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
        if self.output_dir is None:
            self.output_dir = default_output_dir(type(self))
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum_steps", self.grad_accum_steps, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        if isinstance(self.epochs, float) and self.epochs.is_integer():  # TRL's num_train_epochs is a float
            self.epochs = int(self.epochs)
        check_int("epochs", self.epochs, 1)
        if self.max_steps == -1:  # TRL's (transformers') "not set"
            self.max_steps = 0
        check_int("max_steps", self.max_steps, 0)
        if self.lr_schedule == "constant_with_warmup":  # TRL's name; our "constant" warms up when warmup_ratio > 0
            self.lr_schedule = "constant"
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
        self.report_to = canonical_report_to(self.report_to)
        self.resume = unset_as_none(self.resume)
        if self.resume is not None and not isinstance(self.resume, (str, os.PathLike)):
            raise ValueError(f"resume must be a checkpoint path, 'auto' or None, got {self.resume!r}")
        if self.overwrite_output_dir and self.resume is not None:
            raise ValueError(f"overwrite_output_dir starts a new run and resume={self.resume!r} continues one: "
                             "give one of them")

    def reporters(self) -> tuple[str, ...]:
        """The integrations `report_to` names ("tensorboard", "wandb"); () for none."""
        return () if self.report_to == "none" else tuple(self.report_to.split(","))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def default_output_dir(config_class: type) -> str:
    """DEFAULT_OUTPUT_ROOT/<stage>, the stage being the command-line name of the trainer the config
    belongs to (sft, rm, dpo, kto, ppo, grpo), so that the stages of a pipeline never share a directory."""
    stage = next((name for name, (_, config_name) in TRAINERS.items() if config_name == config_class.__name__),
                 config_class.__name__.removesuffix("Config").lower() or "trainer")
    return os.path.join(DEFAULT_OUTPUT_ROOT, stage)


@dataclass
class SupervisedConfig(TrainerConfig):
    """Options shared by the trainers that learn from fixed sequences (SFT, reward model, DPO)."""

    max_length: int = field(default=512, metadata=option_help(
        "max tokens per sequence (prompt + completion); longer ones are truncated with a warning"))

    def validate(self) -> None:
        super().validate()
        check_int("max_length", self.max_length, 2)


@dataclass
class PreferenceConfig(SupervisedConfig):
    """Options of the trainers on {"prompt", "chosen", "rejected"} pairs (reward model, DPO)."""

    max_prompt_length: int | None = field(default=None, metadata=option_help(
        "prompts longer than this keep their last tokens; none = cut a prompt (to max_length / 2) only when "
        "it would leave its pair no completion token within max_length"))
    drop_identical_pairs: bool = field(default=False, metadata=option_help(
        "leave out pairs whose chosen and rejected are identical after truncation (they are always counted and "
        "warned about: their loss is log 2 with zero gradient)"))

    def validate(self) -> None:
        super().validate()
        self.max_prompt_length = unset_as_none(self.max_prompt_length)
        if self.max_prompt_length is not None:
            check_int("max_prompt_length", self.max_prompt_length, 1)
            if self.max_prompt_length >= self.max_length:
                raise ValueError(f"max_prompt_length must be < max_length={self.max_length} (room for the completion), "
                                 f"got {self.max_prompt_length}")


def canonical_report_to(value) -> str:
    """TRL's report_to spellings (a list, "all", "none", None) -> "none" or a comma-separated subset of
    REPORT_TO. "all" means the installed ones; naming wandb when it is not installed is an error (the
    run would otherwise train without the logs it was asked for)."""
    import importlib.util

    if value is None or value == []:
        return "none"
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value)]
    if names == ["none"]:
        return "none"
    if names == ["all"]:
        installed = [n for n in REPORT_TO if n != "wandb" or importlib.util.find_spec("wandb") is not None]
        return ",".join(installed)
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise ValueError(f"report_to must be none, all, or a comma-separated subset of {REPORT_TO}, got {value!r}")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to=wandb needs the wandb package: pip install wandb (or report_to=tensorboard / none)")
    return ",".join(dict.fromkeys(names))
