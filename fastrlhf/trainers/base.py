"""The one training loop every fastrlhf trainer runs on.

A trainer subclass says only what is specific to its objective:

    data_kind        which record format `fastrlhf.data.validate_records` checks ("sft", "preference", "prompt")
    trained_roles    the RoleModel roles whose parameters the optimizer updates
    prepare(records) tokenised examples;  collate(examples) -> batch of tensors on the device
    compute_loss(batch) -> (loss, metrics);  batch_weight(batch) -> how many items the loss averages over
    training_step()  (optional) one loop step; the default consumes `grad_accum_steps` micro-batches

Everything else lives here: config validation, data order and sharding, AdamW + LR schedule,
gradient accumulation, bf16 autocast (CUDA only), gradient sync across ranks, clipping, the
non-finite guard, metrics (JSONL, TensorBoard, tqdm), checkpoints, exact resume, Ctrl-C.

Gradient accumulation is exact: each micro-batch loss (a mean over its own items) is re-weighted by
its share of the items in the whole optimizer step, over all micro-batches and all ranks. So
`batch_size=8` equals `batch_size=4, grad_accum_steps=2` and equals 2 ranks of 4 (up to float
rounding), even for token-mean losses whose micro-batches hold different numbers of tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from fastrlhf._checks import check_choice, check_int, check_number
from fastrlhf._dispatch import BACKENDS, use_backend
from fastrlhf.memory import memory_summary, peak_memory_bytes, peak_memory_kind
from fastrlhf.options import option_help

logger = logging.getLogger("fastrlhf.trainers")

LR_SCHEDULES = ("cosine", "linear", "constant")
BF16_MODES = ("auto", "true", "false")

RewardFn = Callable[[list, list, list], list]
"""reward_fn(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]."""


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
    save_total_limit: int = field(default=0, metadata=option_help("keep only the newest N checkpoints; 0 = keep all"))
    save_final: bool = field(default=True, metadata=option_help("save the trained roles (adapters + heads) to output_dir at the end"))
    bf16: str = field(default="auto", metadata=option_help("bf16 autocast: auto (on when CUDA supports it), true, false; never on CPU"))
    backend: str = field(default="auto", metadata=option_help("loss/kernel backend: auto (Triton on CUDA), triton, torch"))
    progress: bool = field(default=True, metadata=option_help("show a tqdm progress bar with live metrics"))
    max_consecutive_nonfinite: int = field(default=5, metadata=option_help(
        "skip steps with NaN/inf loss or gradients; stop after this many in a row (0 = never stop)"))
    resume: str = field(default="", metadata=option_help("resume from a checkpoint directory, or 'auto' for the latest in output_dir"))
    fsdp: bool = field(default=False, metadata=option_help("shard the model with FSDP2 under torchrun (default: DDP-style gradient averaging)"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad option. Subclasses extend it (call super().validate())."""
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
        check_int("save_total_limit", self.save_total_limit, 0)
        if isinstance(self.bf16, bool):  # accept bf16=True/False from Python callers
            self.bf16 = "true" if self.bf16 else "false"
        check_choice("bf16", str(self.bf16).lower(), BF16_MODES)
        check_choice("backend", self.backend, BACKENDS)
        check_int("max_consecutive_nonfinite", self.max_consecutive_nonfinite, 0)
        if self.resume is None:
            self.resume = ""
        if not isinstance(self.resume, (str, os.PathLike)):
            raise ValueError(f"resume must be a checkpoint path, 'auto' or '', got {self.resume!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class Trainer:
    """Shared loop. `Trainer(model, tokenizer, config, train_records, *, eval_records=None, reward_fn=None)`.

    model: a `fastrlhf.RoleModel` (it must hold the roles the trainer needs).
    train_records / eval_records: lists of dicts (or a path for `fastrlhf.data.load_records`).
    ctx: a `fastrlhf.distributed.DistContext` (default: `DistContext.from_env()`).
    All input and option checks run in the constructor, before anything is trained.
    """

    config_class: type = TrainerConfig
    data_kind: str = "sft"
    trained_roles: tuple[str, ...] = ("policy",)
    required_roles: tuple[str, ...] = ()
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(
        self,
        model,
        tokenizer,
        config: TrainerConfig | None = None,
        train_records: Sequence[dict] | str | None = None,
        *,
        eval_records: Sequence[dict] | str | None = None,
        reward_fn: RewardFn | None = None,
        ctx=None,
    ) -> None:
        from fastrlhf.distributed import DistContext
        from fastrlhf.guards import NonFiniteGuard

        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.ctx = ctx if ctx is not None else DistContext.from_env()
        self._check_roles()
        self._check_tokenizer()

        self.train_records = self._load_and_validate(train_records, "train_records")
        self.eval_records = None if eval_records is None else self._load_and_validate(eval_records, "eval_records")
        self.check_config_against_data()
        self.train_examples = self.prepare(self.train_records)
        if not self.train_examples:
            raise ValueError("train_records: no usable examples after tokenisation")
        self.eval_examples = None if self.eval_records is None else self.prepare(self.eval_records)

        self._place_model()
        self.params = self._trainable_parameters()
        if not self.params:
            raise ValueError(f"the model has no trainable parameters for roles {self.trained_roles}")
        self.batches_per_epoch = math.ceil(math.ceil(len(self.train_examples) / self.ctx.world_size) / config.batch_size)
        self.total_steps = self._total_steps()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = self._make_scheduler()
        self.guard = NonFiniteGuard(config.max_consecutive_nonfinite, ctx=self.ctx)

        self.step = 0                 # completed training steps
        self.consumed_batches = 0     # batches taken from the (infinite, epoch-ordered) data stream
        self._boundary: dict = {}     # data position + RNG after the last completed step (Ctrl-C saves)
        self._weights_dirty = False   # the optimizer already stepped inside the current loop step
        self._interrupt_requested = False
        self._saved_step = -1         # step of the last checkpoint written (or resumed from)
        self._window: dict[str, torch.Tensor] = {}
        self._window_steps = 0
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._metrics_file = None
        self._tb = None

    # ------------------------------------------------------------------ hooks for subclasses
    def prepare(self, records: list[dict]) -> list[dict]:
        """Tokenise records into examples (lists of ints); called once per dataset."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics): loss is the MEAN over the batch's `batch_weight` items; metrics detached scalars."""
        raise NotImplementedError

    def batch_weight(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many items `compute_loss` averages over (default: rows)."""
        return torch.tensor(float(batch["input_ids"].shape[0]), device=self.device)

    def check_config_against_data(self) -> None:
        """Checks that need both the config and the data/model (subclasses)."""

    def extra_state(self) -> dict:
        """Subclass state saved in checkpoints (e.g. the KL controller)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def before_train(self) -> None:
        """Called once in `train()` after a resume and before the first step (e.g. precomputations)."""

    def micro_batches_per_step(self) -> int:
        return self.config.grad_accum_steps

    def optimizer_steps_per_step(self) -> int:
        return 1

    # ------------------------------------------------------------------ setup helpers
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def model_roles(self) -> set[str]:
        roles = getattr(self.model, "roles", None)
        return set(roles) if roles is not None else {"policy"}

    def _check_roles(self) -> None:
        have = self.model_roles()
        missing = [r for r in (*self.trained_roles, *self.required_roles) if r not in have]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs the model roles {missing}; build the model with "
                f"RoleModel(base, roles={tuple(sorted(have | set(missing)))})"
            )

    def _check_tokenizer(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")

    @property
    def pad_token_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None)

    def _load_and_validate(self, records, source: str) -> list[dict]:
        from fastrlhf.data import load_records, validate_records

        if isinstance(records, (str, os.PathLike)):
            source = str(records)
            records = load_records(str(records))
        if records is None:
            raise ValueError(f"{source}: no dataset given")
        records = list(records)
        validate_records(records, self.data_kind, source=source)
        return records

    def _place_model(self) -> None:
        """Move the model to this rank's device (the reference copy of a no-LoRA RoleModel stays where
        RoleModel put it), then shard it with FSDP2 if asked."""
        first = next(iter(self.model.parameters()), None)
        if first is not None and first.device != self.device:
            self.model.to(self.device)
        if self.config.fsdp and self.ctx.distributed:
            self.ctx.apply_fsdp(
                self.model,
                forward_methods=("hidden_states", "token_logprobs", "token_logprobs_and_values", "values",
                                 "rewards", "generate"),
                mixed_precision=torch.bfloat16 if self.use_bf16 else None,
            )

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        seen: set[int] = set()
        params = []
        for role in self.trained_roles:
            for p in self.model.trainable_parameters(role):
                if id(p) not in seen:  # no-LoRA: value head sits on the policy trunk, shared params once
                    seen.add(id(p))
                    params.append(p)
        return params

    def _total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        return math.ceil(self.config.epochs * self.batches_per_epoch / self.micro_batches_per_step())

    def _make_scheduler(self):
        from transformers import get_scheduler

        total = self.total_steps * self.optimizer_steps_per_step()
        warmup = int(round(self.config.warmup_ratio * total))
        name = self.config.lr_schedule
        if name == "constant" and warmup:
            name = "constant_with_warmup"
        return get_scheduler(name, self.optimizer, num_warmup_steps=warmup, num_training_steps=total)

    @property
    def use_bf16(self) -> bool:
        mode = str(self.config.bf16).lower()
        on_cuda = self.device.type == "cuda"
        if mode == "true" and not on_cuda:
            logger.warning("bf16=true ignored: autocast is only used on CUDA")
        if mode == "auto":
            return on_cuda and torch.cuda.is_bf16_supported()
        return mode == "true" and on_cuda

    def backend_scope(self):
        """Run losses on `config.backend`; "auto" leaves the process default (and any outer
        `use_backend(...)`) alone."""
        if self.config.backend == "auto":
            return contextlib.nullcontext()
        return use_backend(self.config.backend)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def autocast(self):
        if self.use_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ data
    def batch_stream(self, examples: Sequence, batch_size: int, start: int = 0) -> Iterator[list]:
        """Batches of examples in a deterministic order: a (seed, epoch) permutation of the data,
        this rank's shard of it, cut into batches; epochs follow each other forever. `start` skips
        that many batches (resume), so no order needs to be saved."""
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            order = self.ctx.shard_epoch(range(len(examples)), seed=self.config.seed, epoch=epoch)
            for b in range(index, self.batches_per_epoch):
                ids = order[b * batch_size : (b + 1) * batch_size]
                yield [examples[i] for i in ids]
            epoch, index = epoch + 1, 0

    def next_batches(self, n: int) -> list[list]:
        """Up to `n` batches from the training stream (fewer at the very end of the last epoch)."""
        if self.config.max_steps > 0:
            left = n
        else:
            left = min(n, self.config.epochs * self.batches_per_epoch - self.consumed_batches)
        batches = [next(self._stream) for _ in range(max(left, 0))]
        self.consumed_batches += len(batches)
        return batches

    # ------------------------------------------------------------------ one optimizer step
    def training_step(self) -> dict[str, torch.Tensor]:
        """Default step: `grad_accum_steps` micro-batches -> one optimizer step."""
        self.model.train()
        micro = [self.collate(b) for b in self.next_batches(self.micro_batches_per_step())]
        return self.optimize(micro)

    def optimize(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        loss_fn: Callable | None = None,
        weight_fn: Callable | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward/backward every micro-batch, then one (guarded) optimizer step.

        Returns the step's metrics as detached tensors (weighted means over the micro-batches),
        plus `loss`, `grad_norm` (when clipping) and `skipped` (1 when the guard skipped the step).
        """
        loss_fn = loss_fn or self.compute_loss
        weight_fn = weight_fn or self.batch_weight
        cfg = self.config
        weights = [torch.as_tensor(weight_fn(mb), dtype=torch.float32, device=self.device).reshape(()) for mb in micro_batches]
        local_total = torch.stack(weights).sum() if weights else torch.zeros((), device=self.device)
        global_total = self.ctx.all_reduce_sum(local_total.clone()).clamp(min=1e-12)
        # sync_gradients / FSDP average over ranks, so scale by world_size to get the global mean
        # The same weights make the logged metrics exact: reduce_metrics takes the mean over ranks of
        # sum(metric * w * world / global_total), i.e. the global weighted mean of the whole step.
        scale = self.ctx.world_size / global_total

        total_loss = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        with self.backend_scope():
            for mb, w in zip(micro_batches, weights):
                with self.autocast():
                    loss, metrics = loss_fn(mb)
                (loss * (w * scale)).backward()
                share = w * scale
                total_loss = total_loss + loss.detach().float() * share
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * share

        self.ctx.sync_gradients(self.params)
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.guard.step_ok(total_loss, self.params, grad_norm=grad_norm):
            self._weights_dirty = True
            self.optimizer.step()
            self.scheduler.step()
            skipped = 0.0
        else:
            skipped = 1.0
        self.optimizer.zero_grad(set_to_none=True)

        out = {"loss": total_loss, **sums, "lr": torch.tensor(lr), "skipped": torch.tensor(skipped)}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm.detach().float()
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of `compute_loss` metrics over the eval data (all ranks), keys prefixed with "eval/"."""
        if not self.eval_examples:
            return {}
        self.model.eval()
        order = self.ctx.shard(range(len(self.eval_examples)))
        size = self.config.eval_batch_size
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        with self.backend_scope():
            for start in range(0, len(order), size):
                batch = self.collate([self.eval_examples[i] for i in order[start : start + size]])
                with self.autocast():
                    loss, metrics = self.compute_loss(batch)
                w = torch.as_tensor(self.batch_weight(batch), dtype=torch.float32, device=self.device)
                total = total + w
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * w
        means = {k: v / total.clamp(min=1e-12) for k, v in sums.items()}
        self.model.train()
        return self._to_floats(means, prefix="eval/")

    # ------------------------------------------------------------------ logging
    def _to_floats(self, metrics: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
        reduced = self.ctx.reduce_metrics(metrics)  # collective: every rank calls it with the same keys
        return {prefix + k: float(v) for k, v in reduced.items()}  # the host sync happens here only

    def _open_logs(self, resumed: bool) -> None:
        if not self.is_main:
            return
        out = Path(self.config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if resumed and path.exists():
            # drop lines logged after the checkpoint we resumed from, so the file reads like one run
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif not resumed and path.exists():
            path.unlink()
        self._metrics_file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL only
            self._tb = None

    def _close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write_record(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, self.step)

    def _accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).to(self.device)
            self._window[key] = self._window.get(key, 0.0) + value
        self._window_steps += 1

    def _log_window(self, bar, started: float) -> None:
        if not self._window_steps:
            return
        means = {k: v / self._window_steps for k, v in self._window.items()}
        floats = self._to_floats(means)
        self._window, self._window_steps = {}, 0
        record = {"step": self.step, "epoch": round(self.consumed_batches / self.batches_per_epoch, 4)}
        record.update(floats)
        record["elapsed_s"] = round(time.perf_counter() - started, 3)
        self.last_metrics = record
        self._write_record(record)
        if bar is not None:
            bar.set_postfix({k: f"{floats[k]:.4g}" for k in self.progress_keys if k in floats}, refresh=False)

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.last_eval = metrics
            self._write_record({"step": self.step, **metrics})
            self._say("eval @ step %d: %s" % (self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())))

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.is_main and self.config.progress:
            from tqdm.auto import tqdm

            tqdm.write(message)

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The trained roles' adapter + head weights, keyed "<role>/<name>" (full tensors, every rank)."""
        state = {}
        for role in self.trained_roles:
            for name, tensor in self.model.role_state_dict(role).items():
                if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather (collective, every rank)
                    tensor = tensor.full_tensor()
                state[f"{role}/{name}"] = tensor
        return state

    def _optimizer_state(self):
        if self.ctx.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            return get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_batches": self.consumed_batches,
            "epoch": self.consumed_batches // self.batches_per_epoch,
            "batch_in_epoch": self.consumed_batches % self.batches_per_epoch,
            "guard": self.guard.state_dict(),
            "world_size": self.ctx.world_size,
            **self.extra_state(),
        }

    def save_checkpoint(self, *, rng_states: list | None = None, partial_step: bool = False) -> Path | None:
        """Atomic `output_dir/checkpoint-<step>` (rank 0 writes; every rank takes part)."""
        from fastrlhf.checkpoint import capture_rng_state, save_checkpoint

        model_state = self._model_state()
        optimizer = self._optimizer_state()
        if rng_states is None:
            rng_states = self.ctx.all_gather_object(capture_rng_state())
        path = None
        if self.is_main:
            path = save_checkpoint(
                self.config.output_dir, self.step, model_state=model_state, optimizer=optimizer,
                scheduler=self.scheduler, trainer_state={**self.trainer_state(), "partial_step": partial_step},
                rng_states=rng_states,
                keep_last=self.config.save_total_limit or None,
            )
        self.ctx.barrier()
        self._saved_step = self.step
        return path

    def _resume(self) -> bool:
        """Load the checkpoint `config.resume` points at; True if training continues from one."""
        from fastrlhf.checkpoint import (
            load_checkpoint,
            load_optimizer_state,
            resolve_resume,
        )

        path = None
        if self.is_main:
            path = resolve_resume(self.config.resume, self.config.output_dir)
        path = self.ctx.broadcast_object(None if path is None else str(path))
        if path is None:
            if self.config.resume:
                self._say(f"resume={self.config.resume!r}: no checkpoint in {self.config.output_dir}, starting fresh")
            return False
        if self.ctx.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            model_state, state = load_checkpoint(path, scheduler=self.scheduler, rank=self.ctx.rank)
            set_optimizer_state_dict(self.model, self.optimizer, load_optimizer_state(path),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            model_state, state = load_checkpoint(path, optimizer=self.optimizer, scheduler=self.scheduler,
                                                 rank=self.ctx.rank)
        saved_world = int(state.get("world_size", self.ctx.world_size))
        if saved_world != self.ctx.world_size:
            # consumed_batches counts per-rank batches and the RNG states are per rank: neither maps
            # onto another number of processes, so the resume would silently replay or skip data.
            raise ValueError(
                f"resume: {path} was written by {saved_world} processes but this run has "
                f"{self.ctx.world_size}; resume with the same number of processes (torchrun --nproc-per-node)"
            )
        for role in self.trained_roles:
            prefix = f"{role}/"
            self.model.load_role_state_dict(role, {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)})
        self.step = int(state["step"])
        self.consumed_batches = int(state["consumed_batches"])
        self.guard.load_state_dict(state.get("guard", {}))
        self.load_extra_state(state)
        self._say(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run the whole training. Returns a summary: trainer, steps, seconds, metrics (last logged
        window), eval (last evaluation), peak_memory_bytes (+ peak_memory_kind), memory_report."""
        with self.backend_scope():
            return self._train()

    def _train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        seed_everything(cfg.seed + self.ctx.rank)  # sampling differs per rank; a resume restores the RNG below
        resumed = self._resume()
        self._open_logs(resumed)
        if self.is_main:
            out = Path(cfg.output_dir)
            (out / "trainer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            report = self.model.memory_report(self.optimizer)
            (out / "memory_report.json").write_text(json.dumps(report, indent=2))
            self._say(memory_summary(report))
        self.before_train()
        self._stream = self.batch_stream(self.train_examples, self.config.batch_size, start=self.consumed_batches)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=type(self).__name__, dynamic_ncols=True,
                   disable=not (cfg.progress and self.is_main), file=sys.stderr)
        started = time.perf_counter()
        self._saved_step = self.step if resumed else -1
        self._mark_step_boundary()
        try:
            with self._deferred_ctrl_c():
                while self.step < self.total_steps:
                    metrics = self.training_step()
                    self.step += 1
                    self._mark_step_boundary()
                    self._accumulate(metrics)
                    if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                        self._log_window(bar, started)
                    bar.update(1)
                    if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                        self._log_eval()
                    stop = self._stop_requested()
                    if (cfg.save_steps and self.step % cfg.save_steps == 0) or stop:
                        path = self.save_checkpoint()
                    if stop:
                        self._say(f"interrupted: saved {path} at step {self.step}; continue with resume='auto'")
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            # A second Ctrl-C (or an interrupt raised by code) lands mid-step: checkpoint the last
            # completed step with its data position and RNG; if the optimizer had already updated the
            # weights in the interrupted step, they are saved as they are (and flagged).
            self.optimizer.zero_grad(set_to_none=True)
            if self.step > 0 and self._saved_step != self.step and not self.ctx.distributed:
                consumed, rng = self.consumed_batches, self._boundary["rng"]
                self.consumed_batches = self._boundary["consumed_batches"]
                path = self.save_checkpoint(rng_states=[rng], partial_step=self._weights_dirty)
                self.consumed_batches = consumed
                self._say(f"interrupted: saved {path} at step {self.step}; continue with resume='auto'")
            raise
        finally:
            bar.close()
            if sys.exc_info()[0] is not None:
                self._close_logs()
        self._log_eval()
        self._close_logs()
        if cfg.save_final:
            self.save_model()
        return self.summary(time.perf_counter() - started)

    def _mark_step_boundary(self) -> None:
        """Remember the data position and RNG after a completed step (what a mid-step Ctrl-C saves)."""
        from fastrlhf.checkpoint import capture_rng_state

        self._weights_dirty = False
        if not self.ctx.distributed:
            self._boundary = {"consumed_batches": self.consumed_batches, "rng": capture_rng_state()}

    @contextlib.contextmanager
    def _deferred_ctrl_c(self):
        """First Ctrl-C: finish the current step, save a checkpoint, then raise KeyboardInterrupt.
        A second Ctrl-C interrupts at once (Python's default handler is back)."""
        import signal
        import threading

        self._interrupt_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._interrupt_requested = True
            signal.signal(signal.SIGINT, previous)
            self._say("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([int(self._interrupt_requested)], device=self.device)
        if self.ctx.distributed:  # every rank must stop at the same step (collectives)
            self.ctx.all_reduce_max(flag)
        return bool(flag.item()) if self.ctx.distributed else self._interrupt_requested

    def save_model(self) -> None:
        """The trained roles' adapters and heads into output_dir (RoleModel.save). Under FSDP the
        sharded weights are gathered into a final checkpoint-<step> instead."""
        if self.ctx.fsdp:
            if self._saved_step != self.step:
                path = self.save_checkpoint()
                self._say(f"FSDP: final weights saved in {path}")
            return
        if self.is_main:
            self.model.save(self.config.output_dir)
        self.ctx.barrier()

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "trainer": type(self).__name__,
            "steps": self.step,
            "seconds": round(seconds, 3),
            "metrics": dict(self.last_metrics),
            "eval": dict(self.last_eval),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "peak_memory_kind": peak_memory_kind(self.device),
            "memory_report": self.model.memory_report(self.optimizer),
        }


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class SupervisedConfig(TrainerConfig):
    """Options shared by the trainers that learn from fixed sequences (SFT, reward model, DPO)."""

    max_length: int = field(default=512, metadata=option_help(
        "max tokens per sequence (prompt + completion); longer ones are truncated with a warning"))

    def validate(self) -> None:
        super().validate()
        check_int("max_length", self.max_length, 2)
