"""The one training loop every fastrlhf trainer runs on, to read top to bottom:

    train()          output-dir rules, resume, logs, then per step: training_step -> log -> evaluate -> checkpoint
    training_step()  `grad_accum_steps` micro-batches from the data stream -> optimize()
    optimize()       forward + backward of each micro-batch, gradient sync, clipping, guarded optimizer step
    evaluate()       the mean of compute_loss's metrics over the eval data

A trainer subclass says only what is specific to its objective:

    data_kind        which record format `fastrlhf.data.validate_records` checks ("sft", "preference", "prompt")
    trained_roles    the RoleModel roles whose parameters the optimizer updates
    prepare(records) tokenised examples;  collate(examples) -> batch of tensors on the device
    compute_loss(batch) -> (loss, metrics);  batch_weight(batch) -> how many items the loss averages over
    training_step()  (optional) one loop step; the default consumes `grad_accum_steps` micro-batches

Beside the loop, one job per module: config.py (the options), build.py (device placement, trained
parameters, LR schedule, autocast mode), data_stream.py (records, batch order), metrics_log.py
(metrics.jsonl, TensorBoard, tqdm, the host sync), checkpointing.py (save and resume), run_dir.py
(one run per output directory: run.json, what a new run or a resume may find there), interrupt.py
(Ctrl-C); `fastrlhf.memory` measures memory.

Gradient accumulation is exact: a trainer whose loss has whole-batch denominators (`step_totals`:
SFT, PPO, GRPO) normalises each micro-batch loss by the optimizer step's total tokens / sequences
over all micro-batches and ranks (`ppo_loss(total_tokens=..., total_sequences=..., norm_length=...)`,
the fused head's equivalents), so the micro-batch losses add up to the one big batch's loss; the
others (DPO, RM: a mean over pairs, every pair counts) re-weight each micro-batch loss, a mean over
its own items, by its share of the step's items. So `batch_size=8` equals `batch_size=4,
grad_accum_steps=2` and equals 2 ranks of 4 (up to float rounding), for every aggregation, even when
micro-batches hold different numbers of tokens, empty rows or different widths.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastrlhf._dispatch import use_backend
from fastrlhf.checkpoint import seed_everything
from fastrlhf.distributed import DistContext
from fastrlhf.guards import NonFiniteGuard
from fastrlhf.memory import memory_summary, peak_memory_bytes, peak_memory_kind, reset_peak_memory
from fastrlhf.trainers.build import (
    make_optimizer,
    make_scheduler,
    place_model,
    resolve_bf16,
    trainable_parameters,
)
from fastrlhf.trainers.checkpointing import (
    apply_trainer_checkpoint,
    check_world_size,
    legacy_data_position,
    loop_state,
    read_trainer_checkpoint,
    save_trainer_checkpoint,
)
from fastrlhf.trainers.config import TrainerConfig
from fastrlhf.trainers.data_stream import BatchStream, load_and_check_records
from fastrlhf.trainers.interrupt import DeferredCtrlC, StepBoundary
from fastrlhf.trainers import from_trl
from fastrlhf.trainers.metrics_log import MetricsLog
from fastrlhf.trainers.run_dir import RunDirError, RunPlan, plan_run, run_record, write_run_record

RewardFn = Callable[[list, list, list], list]
"""reward_fn(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]."""


class Trainer:
    """Shared loop. `Trainer(model, tokenizer, config, train_records, *, eval_records=None, reward_fn=None)`,
    or TRL-shaped: `Trainer(model=path | HF model | RoleModel, args=config, train_dataset=...,
    eval_dataset=..., processing_class=tokenizer, peft_config=..., reward_funcs=..., callbacks=...)`
    (`fastrlhf.trainers.from_trl` says what each means).

    model: a `fastrlhf.RoleModel` (it must hold the roles the trainer needs).
    train_records / eval_records: lists of dicts (or a path for `fastrlhf.data.load_records`).
    ctx: a `fastrlhf.distributed.DistContext` (default: `DistContext.from_env()`).
    callbacks: `transformers.TrainerCallback`s (or objects with some of their on_* methods).
    All input and option checks run in the constructor, before anything is trained.
    """

    config_class: type = TrainerConfig
    data_kind: str = "sft"
    trained_roles: tuple[str, ...] = ("policy",)
    required_roles: tuple[str, ...] = ()
    progress_keys: tuple[str, ...] = ("loss",)

    def __init__(self, model=None, tokenizer=None, config: TrainerConfig | None = None,
                 train_records: Sequence[dict] | str | None = None, *, eval_records: Sequence[dict] | str | None = None,
                 reward_fn: RewardFn | None = None, ctx=None, callbacks: Sequence | None = None, **trl_inputs) -> None:
        if from_trl.needs_resolving(model, trl_inputs):
            given = from_trl.resolve(type(self), model, tokenizer, config, train_records, eval_records, reward_fn, trl_inputs)
            model, tokenizer, config = given.model, given.tokenizer, given.config
            train_records, eval_records, reward_fn = given.train_records, given.eval_records, given.reward_fn
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        config.validate()  # checked when built; once more here because a config can be changed after that
        self.config, self.model, self.tokenizer, self.reward_fn = config, model, tokenizer, reward_fn
        self.ctx = ctx if ctx is not None else DistContext.from_env()
        self._check_roles()
        self._check_tokenizer()

        self.train_records = load_and_check_records(train_records, self.data_kind, "train_records")
        self.eval_records = (None if eval_records is None
                             else load_and_check_records(eval_records, self.data_kind, "eval_records"))
        self.check_config_against_data()
        self.train_examples = self.prepare(self.train_records)
        if not self.train_examples:
            raise ValueError("train_records: no usable examples after tokenisation")
        self.eval_examples = None if self.eval_records is None else self.prepare(self.eval_records)

        self.use_bf16 = resolve_bf16(config.bf16, self.device)
        if config.gradient_checkpointing:  # also effective in eval mode (PPO/GRPO): RoleModel.train
            model.gradient_checkpointing_enable()
        place_model(model, self.ctx, fsdp=config.fsdp, bf16=self.use_bf16)
        self.params = trainable_parameters(model, self.trained_roles)
        if not self.params:
            raise ValueError(f"the model has no trainable parameters for roles {self.trained_roles}")
        self.data = BatchStream(self.train_examples, config.batch_size, ctx=self.ctx, seed=config.seed,
                                epochs=None if config.max_steps > 0 else config.epochs)
        self.step = 0                    # completed training steps
        self.optimizer = make_optimizer(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = None
        self._set_total_steps(self._planned_total_steps())
        self.guard = NonFiniteGuard(config.max_consecutive_nonfinite, ctx=self.ctx)
        self.metrics_log = MetricsLog(self.ctx, config.output_dir, progress=config.progress,
                                      progress_keys=self.progress_keys, report_to=config.reporters(),
                                      callbacks=callbacks, config=config)

        self.step_totals: dict | None = None  # see whole_step_totals; set only inside optimize()
        self._boundary = StepBoundary()  # data position + RNG after the last completed step
        self._saved_step = -1            # step of the last checkpoint written (or resumed from)
        self._run_record: dict | None = None  # the run's identity (run.json), set on rank 0 by train()
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

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

    # Metrics that a loss normalised by `step_totals` reports already as its share of the step
    # (summed over micro-batches, not weighted), e.g. the aggregated policy term `pg_loss`.
    step_total_metrics: tuple[str, ...] = ()

    def whole_step_totals(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict | None:
        """The denominators of the whole optimizer step's loss (all micro-batches, all ranks), as the
        keyword arguments of the loss (e.g. {"total_tokens": ...}), for THIS rank's loss: a count
        over all ranks divided by the world size, since gradients are averaged over ranks. While
        the micro-batch losses of the step run they are `self.step_totals`, and `compute_loss` then
        returns its micro-batch's share of the step's loss (the losses add up to the step's).
        None (default): `compute_loss` averages over its own items and `optimize` re-weights it."""
        return None

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

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run the whole training. Returns a summary: trainer, steps, seconds, metrics (last logged
        window), eval (last evaluation), peak_memory_bytes (+ peak_memory_kind), memory_report."""
        with self.backend_scope():
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg, log = self.config, self.metrics_log
        if self.device.type == "cuda":  # the CPU peak is process-wide: the pipeline measures its stages with it
            reset_peak_memory(self.device)
        seed_everything(cfg.seed + self.ctx.rank)  # sampling differs per rank; a resume restores the RNG below
        plan = self._plan_run()
        resumed = self._resume(plan)
        log.open(step=self.step, resumed=resumed)
        if self.is_main:
            out = Path(cfg.output_dir)
            write_run_record(out, self._run_record)
            (out / "trainer_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            report = self.model.memory_report(self.optimizer)
            (out / "memory_report.json").write_text(json.dumps(report, indent=2))
            log.say(memory_summary(report))
        self.before_train()
        self.data.start()
        log.start_bar(total=self.total_steps, initial=self.step, desc=type(self).__name__)
        started = time.perf_counter()
        self._saved_step = self.step if resumed else -1
        self._boundary.mark(self.data.position, self.ctx)
        try:
            with DeferredCtrlC(log.say, activity=log.activity) as ctrl_c:
                while self.step < self.total_steps and not log.stop_requested:
                    metrics = self.training_step()
                    self.step += 1
                    self._boundary.mark(self.data.position, self.ctx)
                    log.accumulate(metrics)
                    if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                        self.last_metrics = log.log_window(step=self.step, epoch=self.data.epoch(),
                                                           elapsed_s=time.perf_counter() - started)
                    log.step_done()
                    if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                        self._log_eval()
                    stop = ctrl_c.stop_agreed(self.ctx)
                    if (cfg.save_steps and self.step % cfg.save_steps == 0) or stop:
                        path = self.save_checkpoint()
                    if stop:
                        log.say(f"interrupted: saved {path} at step {self.step}; continue with resume='auto'")
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            self._save_last_completed_step()
            raise
        finally:
            log.close_bar()
            if sys.exc_info()[0] is not None:
                log.close()
        self._log_eval()
        log.close()
        if cfg.save_final:
            self.save_model()
        return self.summary(time.perf_counter() - started)

    def training_step(self) -> dict[str, torch.Tensor]:
        """Default step: `grad_accum_steps` micro-batches -> one optimizer step."""
        self.model.train()
        micro = [self.collate(b) for b in self.next_batches(self.micro_batches_per_step())]
        return self.optimize(micro)

    def next_batches(self, n: int) -> list[list]:
        """Up to `n` batches from the training stream (fewer at the very end of the last epoch)."""
        return self.data.take(n)

    def optimize(self, micro_batches: list[dict[str, torch.Tensor]], loss_fn: Callable | None = None,
                 weight_fn: Callable | None = None) -> dict[str, torch.Tensor]:
        """Forward/backward every micro-batch, then one (guarded) optimizer step.

        Returns the step's metrics as detached tensors (weighted means over the micro-batches),
        plus `loss`, `lr`, `grad_norm` (when clipping) and `skipped` (1 when the guard skipped the step).
        """
        loss_fn = loss_fn or self.compute_loss
        weight_fn = weight_fn or self.batch_weight
        weights = [torch.as_tensor(weight_fn(mb), dtype=torch.float32, device=self.device).reshape(()) for mb in micro_batches]
        local_total = torch.stack(weights).sum() if weights else torch.zeros((), device=self.device)
        global_total = self.ctx.all_reduce_sum(local_total.clone()).clamp(min=1e-12)
        # sync_gradients / FSDP average over ranks, so scale by world_size to get the global mean.
        # The same weights make the logged metrics exact: reduce_metrics takes the mean over ranks of
        # sum(metric * w * world / global_total), i.e. the global weighted mean of the whole step.
        scale = self.ctx.world_size / global_total

        total_loss = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        # Losses with whole-step denominators are already each micro-batch's share of the step's
        # loss; the others are re-weighted by `share`. Metrics are weighted by `share` either way,
        # except those that the totals already scale (`step_total_metrics`).
        self.step_totals = self.whole_step_totals(micro_batches)
        summed = set(self.step_total_metrics) if self.step_totals is not None else set()
        try:
            for mb, w in zip(micro_batches, weights):
                with self.autocast():
                    loss, metrics = loss_fn(mb)
                share = w * scale
                part = loss if self.step_totals is not None else loss * share
                part.backward()
                total_loss = total_loss + part.detach().float()
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * (1.0 if key in summed else share)
        finally:
            self.step_totals = None

        self.ctx.sync_gradients(self.params)
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.guard.step_ok(total_loss, self.params, grad_norm=grad_norm):
            self._boundary.weights_changed = True
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
        return self.metrics_log.to_floats(means, prefix="eval/")

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.last_eval = metrics
            self.metrics_log.write({"step": self.step, **metrics})
            self.metrics_log.say("eval @ step %d: %s" % (self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())))

    # ------------------------------------------------------------------ checkpoints and results
    def save_checkpoint(self, *, rng_states: list | None = None, partial_step: bool = False,
                        data_position: int | None = None) -> Path | None:
        """Atomic `output_dir/checkpoint-<step>` (rank 0 writes; every rank takes part).
        data_position: examples consumed to record (default: the stream's current position)."""
        data = self.data.state_dict(data_position)
        state = {**loop_state(step=self.step, data=data, epoch=data["examples"] / self.data.examples_per_epoch,
                              guard=self.guard, world_size=self.ctx.world_size),
                 **self.extra_state(), "partial_step": partial_step}
        path = save_trainer_checkpoint(self.ctx, self.model, self.trained_roles, self.optimizer, self.scheduler,
                                       output_dir=self.config.output_dir, step=self.step, trainer_state=state,
                                       rng_states=rng_states, keep_last=self.config.save_total_limit,
                                       run_record=self._run_record)
        self._saved_step = self.step
        return path

    def _save_last_completed_step(self) -> None:
        """After an interrupt inside a step (a second Ctrl-C, or raised by code): checkpoint the last
        completed step with its data position and RNG. Weights the optimizer already changed in the
        interrupted step are saved as they are, flagged with partial_step=True."""
        if self.step > 0 and self._saved_step != self.step and not self.ctx.distributed:
            boundary = self._boundary
            path = self.save_checkpoint(rng_states=[boundary.rng], partial_step=boundary.weights_changed,
                                        data_position=boundary.data_position)
            self.metrics_log.say(f"interrupted: saved {path} at step {self.step}; continue with resume='auto'")

    def _plan_run(self) -> RunPlan:
        """The output directory's rules (`fastrlhf.trainers.run_dir`), decided on rank 0 before
        anything is written: a new run needs an empty directory (or overwrite_output_dir), a resume
        the same run. Every rank gets the plan, or raises the same RunDirError."""
        cfg, decided = self.config, None
        if self.is_main:
            record = run_record(type(self).__name__, cfg, model=self.model, train_records=self.train_records,
                                world_size=self.ctx.world_size)
            try:
                plan = plan_run(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, current=record)
                plan.apply()
                self._run_record = dict(record, run_id=plan.run_id)
                decided = ("plan", plan)
            except (RunDirError, OSError) as error:
                decided = ("error", f"{type(error).__name__}: {error}" if isinstance(error, OSError) else str(error))
        kind, value = self.ctx.broadcast_object(decided)
        if kind == "error":
            raise RunDirError(value)
        for note in value.notes:
            self.metrics_log.say(f"resume changes {note}")
        return value

    def _resume(self, plan: RunPlan) -> bool:
        """Continue from the checkpoint the plan points at; False when there is none. ValueError
        (CheckpointError, DataPositionError, RunDirError) when it cannot be continued exactly."""
        cfg = self.config
        contents = read_trainer_checkpoint(self.ctx, resume=plan.resume, output_dir=cfg.output_dir,
                                           run_id=plan.run_id)
        if contents is None:
            if cfg.resume:
                self.metrics_log.say(f"resume={cfg.resume!r}: no checkpoint in {cfg.output_dir}, starting fresh")
            return False
        check_world_size(contents, self.ctx)
        state = contents.trainer_state
        if cfg.max_steps and cfg.max_steps < int(state["step"]):
            raise RunDirError(f"--max-steps {cfg.max_steps} is below the step of {contents.path} (step "
                              f"{int(state['step'])}): resume with --max-steps >= {int(state['step'])}")
        data_state = state.get("data")
        if data_state is None:
            data_state = legacy_data_position(state, self.data)
            warnings.warn(f"{contents.path} was written by an older fastrlhf that counted batches: its data "
                          f"position is read with batch_size={cfg.batch_size}; it is exact only if that is the "
                          "batch size it was written with", stacklevel=2)
        self.step = int(state["step"])
        self.data.load_state_dict(data_state)
        self._set_total_steps(self._planned_total_steps())  # epochs with another batch size: another count
        apply_trainer_checkpoint(self.ctx, contents, self.model, self.trained_roles, self.optimizer, self.scheduler)
        self.guard.load_state_dict(state.get("guard", {}))
        self.load_extra_state(state)
        self.metrics_log.say(f"resumed from {contents.path} at step {self.step}")
        return True

    def _planned_total_steps(self) -> int:
        """max_steps, or the steps until the last epoch ends from the data position (the same number
        as epochs x batches per epoch for a new run; recounted after a resume with another batch size)."""
        if self.config.max_steps:
            return self.config.max_steps
        return self.step + math.ceil(self.data.batches_left() / self.micro_batches_per_step())

    def _set_total_steps(self, total: int) -> None:
        """Set the run length and (re)build the LR schedule over it."""
        if self.scheduler is not None and total == self.total_steps:
            return
        self.total_steps = total
        cfg = self.config
        self.scheduler = make_scheduler(self.optimizer, schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio,
                                        total_steps=total * self.optimizer_steps_per_step())

    def save_model(self, output_dir: str | None = None) -> None:
        """The trained roles into output_dir (default: config.output_dir): fastrlhf's role files
        (RoleModel.save, what resume and --reward-model read) and the same roles in the ecosystem's
        formats (`fastrlhf.export`: PEFT adapters, the reward model as a transformers sequence
        classifier) with the tokenizer. Under FSDP the sharded weights are gathered into a final
        checkpoint-<step> instead."""
        if self.ctx.fsdp:
            if self._saved_step != self.step:
                path = self.save_checkpoint()
                self.metrics_log.say(f"FSDP: final weights saved in {path}")
            return
        if self.is_main:
            from fastrlhf.export import export_trained_roles

            output_dir = str(output_dir or self.config.output_dir)
            self.model.save(output_dir)
            export_trained_roles(self.model, self.trained_roles, self.tokenizer, output_dir)
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

    # ------------------------------------------------------------------ small helpers
    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def pad_token_id(self) -> int | None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else getattr(self.tokenizer, "eos_token_id", None)

    def model_roles(self) -> set[str]:
        roles = getattr(self.model, "roles", None)
        return set(roles) if roles is not None else {"policy"}

    def _check_roles(self) -> None:
        have = self.model_roles()
        missing = [r for r in (*self.trained_roles, *self.required_roles) if r not in have]
        if missing:
            raise ValueError(f"{type(self).__name__} needs the model roles {missing}; build the model with "
                             f"RoleModel(base, roles={tuple(sorted(have | set(missing)))})")

    def _check_tokenizer(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")

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
