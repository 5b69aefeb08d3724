"""One training step of a stage, run under a `MemoryCounter` on fake tensors (the simulator) or on
real ones (to check the simulator), for each way of holding the models.

Setups:
    shared-lora   fastrlhf RoleModel, LoRA roles on one frozen base (the default of every stage)
    full          fastrlhf RoleModel with use_lora=False (--no-lora): the policy trains the whole
                  model, value head on the policy trunk, a frozen reference copy, and a frozen
                  copy of the trunk for the reward role
    separate      TRL-style: separate full models for policy, reference, value and reward
                  (`fastrlhf.planner.trl_style`; PPO and DPO)
    trl-peft      TRL with peft: policy LoRA over a base that, adapters off, is the reference;
                  value and reward separate full models (PPO and DPO)

For the fastrlhf setups the step is the trainers' own code: the trainer is constructed as
`fastrlhf.train` does (tiny placeholder records and tokenizer, which only feed code that is not
simulated) and the step calls `Trainer.optimize` with collated batches of the planned shape
(SFT / RM / DPO), or `make_experience` then `update` (PPO / GRPO). What is replaced, and why:
    - generation: `rollout` returns a batch of the planned shape (prompt + response, right padded
      by `build_rollout_batch`); sampling itself (the KV cache of `generate`) is not simulated.
    - a reward *function* runs on the host: `score` returns zeros (no GPU memory).
    - `select_rows` cuts a micro-batch to its longest row, a data-dependent width: the simulation
      keeps the full width (every sequence at the planned length, the worst case).
    - PPO/GRPO: one optimizer step of the update (each of the ppo_epochs x num_minibatches steps
      holds the same memory); at most 2 micro-batches of a gradient-accumulation window are run
      (the second one already holds the first one's gradients, as every later one does).
    - activation checkpointing: the trainer's own `gradient_checkpointing` option (which keeps it
      on in PPO/GRPO's eval-mode iteration: `RoleModel.gradient_checkpointing_enable`).
The optimizer state exists before the measured step (as in any step after the first): AdamW's
own step runs once on zero gradients, then the counter's peaks are reset.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import torch

from fastrlhf.planner import trl_style
from fastrlhf.planner.counter import MemoryCounter
from fastrlhf.planner.spec import (
    FASTRLHF_SETUPS,
    SETUPS,
    STAGES,
    StepResult,
    StepSpec,
    _Run,
    build_causal_lm,
    preference_batch,
    rollout_batch,
    sft_batch,
    use_fused_adamw,
)


class _StopAfterOneStep(Exception):
    """Raised after the first optimizer step of a PPO/GRPO update (the others repeat it)."""


# ---------------------------------------------------------------------------- models


def stage_roles(spec: StepSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(roles, trainable roles) of the RoleModel for a stage, as `fastrlhf.train` builds it."""
    roles = {"sft": ("policy",), "rm": ("reward",), "dpo": ("policy",), "ppo": ("policy", "value"),
             "grpo": ("policy",)}[spec.stage]
    trainable = roles
    if spec.stage in ("ppo", "grpo") and spec.reward_model:
        roles = (*roles, "reward")
    return roles, trainable


def keeps_reference_copy(spec: StepSpec) -> bool:
    """Whether the full fine-tuning RoleModel holds a reference copy, as `fastrlhf.train` decides
    (`needs_reference_copy`) unless the spec says otherwise."""
    if spec.reference_copy is not None:
        return spec.reference_copy
    try:
        from fastrlhf.trainers.build import needs_reference_copy
    except ImportError:  # an older tree: every stage with a policy kept one
        return True
    kl_coef = 0.04 if spec.kl_coef is None else spec.kl_coef
    return needs_reference_copy(spec.stage, type("Config", (), {"kl_coef": kl_coef})())


def role_of_parameters(role_model) -> dict[int, str]:
    """{id(parameter or buffer): role} of a RoleModel: adapters and heads by role, the shared
    base "base" (LoRA) or "policy" (full fine-tuning), the reference copy "reference"."""
    owner: dict[int, str] = {}
    reference = _reference_copy(role_model)
    if reference is not None:
        for t in [*reference.parameters(), *reference.buffers()]:
            owner[id(t)] = "reference"
    reward_lm = getattr(role_model, "reward_lm", None) if not role_model.use_lora else None
    if reward_lm is not None:
        for t in [*reward_lm.parameters(), *reward_lm.buffers()]:
            owner[id(t)] = "reward"
    for role, head in role_model.heads.items():
        for t in head.parameters():
            owner[id(t)] = role
    for name, t in role_model.named_parameters():
        parts = name.split(".")
        at = next((i for i, part in enumerate(parts) if part.startswith("lora_")), None)
        if at is not None and at + 1 < len(parts) and parts[at + 1] in role_model.roles:
            owner[id(t)] = parts[at + 1]
    base = "base" if role_model.use_lora else "policy"
    for t in [*role_model.parameters(), *role_model.buffers()]:
        owner.setdefault(id(t), base)
    return owner


# ---------------------------------------------------------------------------- batches (real tensors)


def _fake_inputs(batch: dict, mode) -> dict:
    if mode is None:
        return batch
    return {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------- the run


def run_step(spec: StepSpec, config, *, n_layers: int | None = None, fake: bool = True, target: str = "cuda",
             seed: int = 0, profile: bool = False) -> StepResult:
    """Build the setup of `spec` on `config` (cut to `n_layers` decoder layers), run one step under a
    MemoryCounter and return its peaks.

    fake: fake tensors (no memory used, any size) or real random weights on the CPU.
    target: "cuda" simulates an H100/H200 (`fastrlhf.planner.cuda`, 512-byte allocator blocks);
        "cpu" runs the CPU code paths with exact byte counts (what a real CPU run can be compared to).
    profile: real CPU runs only: also measure the step with torch.profiler's allocator events (an
        independent count that also sees buffers allocated inside kernels) -> `profiler_peak`.
    """
    if profile and (fake or target != "cpu"):
        raise ValueError("profile=True needs a real CPU run (fake=False, target='cpu')")
    from fastrlhf.planner import cuda
    from fastrlhf.planner.configs import with_layers
    from fastrlhf.planner.fake import fakeify, new_fake_mode

    if target not in ("cuda", "cpu"):
        raise ValueError(f"target must be 'cuda' or 'cpu', got {target!r}")
    if n_layers is not None:
        config = with_layers(config, n_layers)
    started = time.perf_counter()
    mode = new_fake_mode() if fake else None
    counter = MemoryCounter(block_bytes=512 if target == "cuda" else 1, scalar_answers=fake)
    with contextlib.ExitStack() as stack:
        if target == "cuda":
            stack.enter_context(cuda.cuda_semantics())
        if spec.legacy_peft_upcast:
            stack.enter_context(_legacy_peft_upcast())
        prepare = (lambda modules: fakeify(modules, mode)) if fake else (lambda modules: None)
        if spec.setup in FASTRLHF_SETUPS:
            run = _build_fastrlhf(spec, config, fake=fake, target=target, seed=seed, prepare=prepare)
        else:
            run = trl_style.build(spec, config, fake=fake, target=target, seed=seed, prepare=prepare)
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(seed)
        if mode is not None:
            stack.enter_context(mode)
        stack.enter_context(counter)
        for module in run.modules:
            for t in [*module.parameters(), *module.buffers()]:
                counter.track(t, "parameters", run.owner.get(id(t), "other"))
        for layers in run.layers:
            counter.layers.watch(layers)
        stack.callback(counter.close)
        grad_hooks = counter.watch_gradients(run.params, lambda p: run.owner.get(id(p), "other"))
        stack.callback(lambda: [h.remove() for h in grad_hooks])
        _warm_optimizer(run, counter)
        static = counter.live_snapshot().by(0)
        counter.reset_peaks()
        inputs = _fake_inputs(run.inputs, mode)
        live_before = counter.total
        profiler = _allocator_profile() if profile else contextlib.nullcontext()
        with counter.saved_tensors_hooks(), profiler as prof:
            run.step(counter, inputs)
        result = StepResult(n_layers=config.num_hidden_layers, peak=counter.peak, phase_peaks=counter.phase_peaks,
                            region_peaks=counter.region_peaks, static_bytes=static, notes=run.notes)
        if profile:
            result.profiler_peak = live_before + _profiled_peak(prof)
    result.seconds = time.perf_counter() - started
    return result


def _allocator_profile():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def _profiled_peak(prof) -> int:
    """Peak of (allocated - freed) inside the profiled window, from the CPU allocator's events."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live, current, peak = {}, 0, 0
    for _, ptr, size in sorted(events):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:
            current -= live.pop(ptr)
    return peak


def _warm_optimizer(run: _Run, counter: MemoryCounter) -> None:
    """Create the optimizer state with the optimizer's own step on zero gradients, then label it."""
    if run.optimizer is None:
        return
    with counter.label(phase="setup"), torch.no_grad():
        for p in run.params:
            p.grad = torch.zeros_like(p)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            for value in run.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor):
                    counter.relabel(value, "optimizer", run.owner.get(id(p), "other"))


@contextlib.contextmanager
def _legacy_peft_upcast():
    """LoRA over a bf16 base as before commit 6828f2e: no autocast around the decoder, peft's own
    fp32 upcast of each adapted layer's input (only needed for today's code; older code has
    nothing to switch off)."""
    import importlib

    try:
        mixed = importlib.import_module("fastrlhf._mixed_precision")
        roles = importlib.import_module("fastrlhf.roles")
    except ImportError:
        yield
        return
    null = lambda *args, **kwargs: contextlib.nullcontext()  # noqa: E731
    patches = [(mixed, "low_precision_lora"), (roles, "low_precision_lora")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in patches if hasattr(obj, name)]
    for obj, name, _ in saved:
        setattr(obj, name, null)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ---------------------------------------------------------------------------- fastrlhf setups


def _records(stage: str) -> list[dict]:
    if stage == "sft":
        return [{"prompt": "say yes", "completion": "yes"}] * 2
    if stage in ("rm", "dpo"):
        return [{"prompt": "say yes", "chosen": "yes", "rejected": "no"}] * 2
    return [{"prompt": "say yes"}] * 2


def _trainer_and_config(spec: StepSpec, target: str):
    from fastrlhf import trainers

    trainer_name, config_name = trainers.TRAINERS[spec.stage]
    trainer_class, config_class = getattr(trainers, trainer_name), getattr(trainers, config_name)
    options = dict(output_dir="/nonexistent/fastrlhf-planner", batch_size=spec.batch_size,
                   grad_accum_steps=spec.grad_accum_steps, progress=False, save_final=False, max_steps=1,
                   backend="auto" if target == "cuda" else "torch", bf16="false", fused_head=spec.fused_head,
                   gradient_checkpointing=spec.checkpointing)
    if spec.stage in ("sft", "rm", "dpo"):
        options["max_length"] = spec.seq_len
        options["eval_batch_size"] = spec.batch_size
    else:
        options.update(max_prompt_length=spec.prompt_len, max_new_tokens=spec.seq_len - spec.prompt_len,
                       ppo_epochs=spec.ppo_epochs, num_minibatches=spec.num_minibatches,
                       entropy_coef=spec.entropy_coef)
        if spec.kl_coef is not None:
            options["kl_coef"] = spec.kl_coef
        if spec.stage == "grpo":
            options["group_size"] = spec.group_size
    return trainer_class, config_class(**options)


def _label_role_methods(role_model, counter_ref: list) -> None:
    """Storages created inside a role's method are attributed to that role."""

    def wrap(name, role_of_call):
        method = getattr(role_model, name)

        def labelled(*args, **kwargs):
            counter = counter_ref[0]
            if counter is None:
                return method(*args, **kwargs)
            with counter.label(role=role_of_call(args)):
                return method(*args, **kwargs)
        setattr(role_model, name, labelled)

    first = lambda args: args[0] if args else "other"  # noqa: E731
    wrap("token_logprobs", first)
    wrap("hidden_states", first)
    wrap("values", lambda args: "value")
    wrap("rewards", lambda args: "reward")
    wrap("token_logprobs_and_values", lambda args: "policy")
    wrap("head_inputs", lambda args: "policy")
    wrap("head_inputs_and_values", lambda args: "policy")


def _decoder_layer_lists(role_model) -> list:
    from fastrlhf.planner.fake import decoder_layers

    trunks = [role_model.causal_lm]
    if not role_model.use_lora:
        trunks += [m for m in (getattr(role_model, "reward_lm", None), _reference_copy(role_model))
                   if m is not None]
    return [decoder_layers(t) for t in trunks]


def _reference_copy(role_model):
    """The no-LoRA frozen reference copy held outside the module tree (`RoleModel.reference_copy`;
    the code of commit a217878, which `benchmarks/memory_calibration.py` runs, kept it in __dict__)."""
    copy = getattr(role_model, "reference_copy", None)
    return copy if copy is not None else role_model.__dict__.get("_reference_lm")


def _build_fastrlhf(spec: StepSpec, config, *, fake: bool, target: str, seed: int, prepare) -> _Run:
    from fastrlhf.distributed import DistContext
    from fastrlhf.roles import RoleModel
    from fastrlhf.testing import tiny_tokenizer

    dtype = spec.torch_dtype
    torch.manual_seed(seed)
    base = build_causal_lm(config, dtype, fake=fake, seed=seed)
    roles, trainable = stage_roles(spec)
    role_model = RoleModel(
        base, roles=roles, trainable_roles=trainable, use_lora=spec.setup == "shared-lora",
        lora_r=spec.lora_r, lora_alpha=spec.lora_alpha,
        lora_target_modules=list(spec.lora_target_modules) if spec.lora_target_modules else None,
        reference_device=spec.reference_device, with_reference=keeps_reference_copy(spec),
    )
    notes = []
    modules = [role_model]
    reference = _reference_copy(role_model)
    if reference is not None:
        modules.append(reference)
    prepare(modules)  # fake tensors in place, before any optimizer holds the parameters
    layer_lists = _decoder_layer_lists(role_model)
    owner = role_of_parameters(role_model)

    counter_ref: list = [None]
    _label_role_methods(role_model, counter_ref)
    tokenizer = tiny_tokenizer()
    trainer_class, trainer_config = _trainer_and_config(spec, target)
    reward_fn = None if spec.reward_model or spec.stage not in ("ppo", "grpo") else (lambda p, c, r: [0.0] * len(p))
    trainer = trainer_class(role_model, tokenizer, trainer_config, _records(spec.stage), reward_fn=reward_fn,
                            ctx=DistContext(device=torch.device("cpu")))
    if target == "cuda" and dtype != torch.float32:
        from fastrlhf.planner.cuda import bf16_autocast

        trainer.autocast = bf16_autocast  # the trainers' bf16 autocast on CUDA
    if spec.fused_adamw:
        use_fused_adamw(trainer.optimizer)
    vocab = config.vocab_size
    eos = tokenizer.eos_token_id
    inputs = _stage_inputs(spec, vocab, eos, seed)

    def step(counter: MemoryCounter, batch: dict) -> None:
        counter_ref[0] = counter
        try:
            with trainer.backend_scope():  # the trainer's backend for the whole step, rollout scoring included
                _fastrlhf_step(spec, trainer, counter, batch)
        finally:
            counter_ref[0] = None

    return _Run(modules=modules, owner=owner, optimizer=trainer.optimizer, params=list(trainer.params), step=step,
                inputs=inputs, layers=layer_lists, notes=notes)


def _stage_inputs(spec: StepSpec, vocab: int, eos: int, seed: int) -> dict:
    if spec.stage == "sft":
        micro = [sft_batch(spec.batch_size, spec.seq_len, vocab, seed + i) for i in range(min(spec.grad_accum_steps, 2))]
    elif spec.stage in ("rm", "dpo"):
        micro = [preference_batch(spec.batch_size, spec.seq_len, vocab, seed + i)
                 for i in range(min(spec.grad_accum_steps, 2))]
    else:
        return rollout_batch(spec.rollout_rows, spec.prompt_len, spec.seq_len, vocab, eos, seed)
    return {f"micro{i}.{k}": v for i, batch in enumerate(micro) for k, v in batch.items()}


def _micro_batches(inputs: dict) -> list[dict]:
    out: dict[int, dict] = {}
    for key, value in inputs.items():
        index, _, name = key.partition(".")
        out.setdefault(int(index.removeprefix("micro")), {})[name] = value
    return [out[i] for i in sorted(out)]


def _phase_hooks(trainer, counter: MemoryCounter, loss_name: str) -> None:
    """Phase labels: "forward" from the start of each loss, "optimizer step" from the gradient sync
    (after the last backward) on; "backward" is found by the counter itself."""
    loss_fn = getattr(trainer, loss_name)

    def labelled_loss(*args, **kwargs):
        counter.phase = "forward"
        return loss_fn(*args, **kwargs)
    setattr(trainer, loss_name, labelled_loss)
    sync = trainer.ctx.sync_gradients

    def labelled_sync(params):
        counter.phase = "optimizer step"
        return sync(params)
    trainer.ctx.sync_gradients = labelled_sync


def _fastrlhf_step(spec: StepSpec, trainer, counter: MemoryCounter, inputs: dict) -> None:
    if spec.stage in ("sft", "rm", "dpo"):
        micro = _micro_batches(inputs)
        if spec.stage == "dpo" and trainer.precompute:
            # as PrecomputedReference._precompute (DPO, KTO): without a reference copy the untrained policy is the reference
            role = "reference" if _reference_copy(trainer.model) is not None else "policy"
            trainer.model.eval()
            with counter.label(phase="reference precompute"), torch.no_grad():
                for batch in micro:
                    with trainer.autocast():
                        batch["ref_logps"] = trainer.sequence_logps(role, batch).float()
        _phase_hooks(trainer, counter, "compute_loss")
        trainer.model.train()
        trainer.optimize(micro)
        return
    _policy_gradient_step(spec, trainer, counter, inputs)


def _policy_gradient_step(spec: StepSpec, trainer, counter: MemoryCounter, batch: dict) -> None:
    from fastrlhf.trainers import _policy_gradient as pg

    rows = batch["input_ids"].shape[0]
    batch = {**batch, "examples": [{"input_ids": [1], "prompt": "p"}] * rows}
    trainer.rollout = lambda prompts, repeat=1: batch
    if not spec.reward_model:
        trainer.score = lambda b: torch.zeros(b["input_ids"].shape[0], dtype=torch.float32)
    prompts = trainer.train_examples[:1] * spec.batch_size
    original_optimize = trainer.optimize

    def one_optimizer_step(micro, **kwargs):
        original_optimize(micro[:2], **kwargs)
        raise _StopAfterOneStep
    trainer.optimize = one_optimizer_step
    _phase_hooks(trainer, counter, "policy_loss")

    def full_width_rows(experience, rows):  # the data-dependent cut to the longest row, skipped
        return {k: v[rows.to(v.device)] for k, v in experience.items()}

    saved_select = pg.select_rows
    pg.select_rows = full_width_rows
    try:
        trainer.model.eval()
        with counter.label(phase="rollout scoring"), torch.no_grad():
            experience, _ = trainer.make_experience(prompts)
        try:
            trainer.update(experience)
        except _StopAfterOneStep:
            pass
    finally:
        pg.select_rows = saved_select


def describe(spec: StepSpec) -> str:
    shape = (f"B={spec.batch_size} prompts x T={spec.seq_len} ({spec.prompt_len}+{spec.seq_len - spec.prompt_len})"
             if spec.stage in ("ppo", "grpo") else
             f"B={spec.batch_size}{' pairs' if spec.stage in ('rm', 'dpo') else ''} x T={spec.seq_len}")
    return f"{spec.stage} {spec.setup} {shape} {spec.dtype}{' ckpt' if spec.checkpointing else ''}"


def with_changes(spec: StepSpec, **changes) -> StepSpec:
    return replace(spec, **changes)


__all__ = ["STAGES", "SETUPS", "StepSpec", "StepResult", "run_step", "describe", "with_changes",
           "sft_batch", "preference_batch", "rollout_batch", "build_causal_lm"]
