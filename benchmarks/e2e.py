"""End to end: one PPO step and one DPO step (forward + backward + AdamW step) on a Qwen2-0.5B-sized
model with random weights (GPU) or a tiny one (CPU), four ways:

  fastrlhf-shared-lora   one frozen base, LoRA adapters for policy/value(/reward), the reference =
                         adapters off (fastrlhf.roles.RoleModel), fused log-probs from hidden states
                         (`token_logprobs`, logits remade in backward) + ppo_loss / dpo_loss.
  fastrlhf-shared-lora-fused  the same roles, the final policy (DPO) loss by the fused RL head:
                         `policy_loss_from_hidden` (`dpo_loss_from_hidden`) on the policy's hidden
                         states, gradients computed in its forward, as the trainers use it; the
                         reference log-probs still come from `token_logprobs` without grad.
  separate-models-fused  one full model per role (PPO: policy, reference, value, reward; DPO: policy,
                         reference), full fine-tuning, fused log-probs from hidden states.
  trl-style              the same separate models, but log-probs from the full [B, T, V] logits with TRL's
                         selective_log_softmax (what TRL's PPO/DPO trainers did before fused heads).

The PPO step scores with the reference (logps) and reward model (no grad), runs policy logps and
values with grad, then ppo_loss + value_loss, backward and one optimizer step; generation is not part
of it. peak_bytes here is the WHOLE footprint (weights + gradients + optimizer state + the step's
peak activations), not the extra over inputs as for the kernel rows: that is what "four models vs
one" changes. Full fine-tuning vs LoRA is part of the difference being measured, by design.

Every step is measured twice in the same run: with activation checkpointing of the trunks that run
with grad (policy and value; shape suffix ",ckpt"; what real PPO setups use, so weights, gradients
and optimizer state dominate) and without (no suffix). The no-grad reference/reward forwards are the
same in both. The note column carries static_bytes = weights + trainable gradients + optimizer state,
so peak_bytes - static_bytes is the step's activation peak.
"""
from __future__ import annotations

import copy
import gc
import time

import torch

from benchmarks import measure, peers
from benchmarks.device import DeviceInfo, today
from benchmarks.runner import _error_status, log

PROVIDERS = ("fastrlhf-shared-lora-fused", "fastrlhf-shared-lora", "separate-models-fused", "trl-style")
FUSED = "fastrlhf-shared-lora-fused"


def model_config(quick: bool, gpu: bool):
    from transformers import Qwen2Config

    if gpu and not quick:
        # Qwen2-0.5B's architecture (tied embeddings, 151936 vocab, 24 layers, GQA 14/2 heads).
        return "qwen2-0.5b", Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True, max_position_embeddings=4096,
                                         attn_implementation="sdpa")
    # CPU: tiny trunk, real-size vocabulary, so the full-logits cost is visible.
    return "qwen2-tiny", Qwen2Config(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     max_position_embeddings=512, attn_implementation="sdpa")


def _new_model(config, device, dtype, seed=0):
    from transformers import AutoModelForCausalLM

    # Initialised directly on the device in its dtype: a 0.5B model built on the CPU first would cost
    # seconds per model, and the PPO comparison builds four of them per provider.
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype)


def _batch(B, T, V, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(3 * T // 4, T + 1, (B,), generator=g)
    am = (torch.arange(T)[None] < lengths[:, None]).long()
    loss_mask = am.clone()
    loss_mask[:, : T // 4] = 0  # the prompt
    return ids.to(device), am.to(device), loss_mask.to(device)


def _hidden(model, ids, am):
    out = model.model(input_ids=ids, attention_mask=am)
    return out.last_hidden_state


def _fused_logps(model, ids, am):
    import fastrlhf

    hidden = _hidden(model, ids, am)
    targets = ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
    return fastrlhf.token_logprobs(hidden[:, :-1], model.get_output_embeddings().weight, targets)


def _trl_logps(model, ids, am):
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
    return peers.trl_selective_log_softmax(logits, ids[:, 1:]) * am[:, 1:]


class _ScalarHead(torch.nn.Module):
    """A model whose output is one scalar per position (value model) from a causal LM trunk."""

    def __init__(self, lm, dtype):
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=torch.float32)

    def forward(self, ids, am):
        return self.head(_hidden(self.lm, ids, am).float()).squeeze(-1)


def _last(x, am):
    idx = am.sum(1) - 1
    return x[torch.arange(x.shape[0], device=x.device), idx]


def _checkpoint(model) -> None:
    """Non-reentrant activation checkpointing of an HF causal LM, as RoleModel.gradient_checkpointing_enable
    does it (transformers 5 renamed the method), so every provider recomputes its layers the same way."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # HF layers only checkpoint in training mode (dropout is 0 in these configs)


# ----------------------------------------------------------------------------- PPO


def _next_token_mask(am, loss_mask):
    """The mask [B, T-1] of the tokens whose log-probs count (the fused head's targets are -100
    outside it: `RoleModel.head_inputs(..., loss_mask=)`)."""
    return loss_mask[:, 1:].bool() & am[:, 1:].bool()


def build_ppo(kind, config, device, dtype, ckpt=False):
    if kind == FUSED:
        return _build_ppo_fused(config, device, dtype, ckpt)
    if kind == "fastrlhf-shared-lora":
        from fastrlhf.roles import RoleModel

        rm = RoleModel(_new_model(config, device, dtype), roles=("policy", "value", "reward"),
                       trainable_roles=("policy", "value"))
        if ckpt:  # the shared trunk; only the policy/value forwards run with grad, so only they checkpoint
            rm.gradient_checkpointing_enable()
        params = rm.trainable_parameters()

        def forward(ids, am):
            with torch.no_grad():
                ref = rm.token_logprobs("reference", ids, am)
                scores = rm.rewards(ids, am)
            logps, values = rm.token_logprobs_and_values(ids, am)
            return logps, ref, values, scores
        return forward, params, [rm]
    policy = _new_model(config, device, dtype, seed=0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    value = _ScalarHead(_new_model(config, device, dtype, seed=1), dtype)
    reward = _ScalarHead(_new_model(config, device, dtype, seed=2), dtype).requires_grad_(False)
    if ckpt:  # after the reference copy: the trunks that run with grad, as in the shared-LoRA provider
        _checkpoint(policy)
        _checkpoint(value.lm)
    logps_fn = _fused_logps if kind == "separate-models-fused" else _trl_logps

    def forward(ids, am):
        with torch.no_grad():
            ref = logps_fn(reference, ids, am)
            scores = _last(reward(ids, am), am)
        return logps_fn(policy, ids, am), ref, value(ids, am), scores
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    return forward, params, [policy, reference, value, reward]


def _build_ppo_fused(config, device, dtype, ckpt):
    """Shared-LoRA roles; the step's policy loss is `policy_loss_from_hidden` (see ppo_step_fn)."""
    from fastrlhf.roles import RoleModel

    rm = RoleModel(_new_model(config, device, dtype), roles=("policy", "value", "reward"),
                   trainable_roles=("policy", "value"))
    if ckpt:
        rm.gradient_checkpointing_enable()
    return _FusedRoles(rm), rm.trainable_parameters(), [rm]


class _FusedRoles:
    """What the PPO/DPO steps need from a RoleModel whose final loss is the fused head."""

    def __init__(self, roles):
        self.roles = roles


def _ppo_step_fused(roles, opt, ids, am, loss_mask):
    import fastrlhf

    rm = roles.roles
    mask = _next_token_mask(am, loss_mask)

    def step():
        with torch.no_grad():
            ref = rm.token_logprobs("reference", ids, am)
            scores = rm.rewards(ids, am)
        values = rm.values(ids, am)[:, :-1]
        with torch.no_grad():
            rewards = torch.zeros_like(values)
            rewards[:, -1] = scores.to(rewards.dtype)
            adv, returns = fastrlhf.gae(rewards, values.detach(), mask, gamma=1.0, lam=0.95)
        head = rm.head_inputs(ids, am, loss_mask=loss_mask)  # what the trainers call
        # old_logps=None: one on-policy pass (ratio 1), what ppo_step_fn's logps.detach() does.
        loss, _ = fastrlhf.policy_loss_from_hidden(head.hidden, head.weight, head.targets, None, adv, mask,
                                                   ref_logps=ref, kl_coef=0.05, **head.head_kwargs())
        vloss, _ = fastrlhf.value_loss(values, values.detach(), returns, mask)
        (loss + 0.1 * vloss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ppo_step_fn(forward, params, ids, am, loss_mask):
    import fastrlhf

    opt = torch.optim.AdamW(params, lr=1e-6)
    if isinstance(forward, _FusedRoles):
        return _ppo_step_fused(forward, opt, ids, am, loss_mask)
    mask = loss_mask[:, 1:].bool()

    def step():
        logps, ref, values, scores = forward(ids, am)
        values = values[:, :-1]
        with torch.no_grad():
            rewards = torch.zeros_like(values)
            rewards[:, -1] = scores.to(rewards.dtype)
            adv, returns = fastrlhf.gae(rewards, values.detach(), mask, gamma=1.0, lam=0.95)
        loss, _ = fastrlhf.ppo_loss(logps, logps.detach(), adv, mask, ref_logps=ref, kl_coef=0.05)
        vloss, _ = fastrlhf.value_loss(values, values.detach(), returns, mask)
        (loss + 0.1 * vloss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------- DPO


def build_dpo(kind, config, device, dtype, ckpt=False):
    if kind == FUSED:
        from fastrlhf.roles import RoleModel

        rm = RoleModel(_new_model(config, device, dtype), roles=("policy",))
        if ckpt:
            rm.gradient_checkpointing_enable()
        return _FusedRoles(rm), rm.trainable_parameters(), [rm]
    if kind == "fastrlhf-shared-lora":
        from fastrlhf.roles import RoleModel

        rm = RoleModel(_new_model(config, device, dtype), roles=("policy",))
        if ckpt:
            rm.gradient_checkpointing_enable()

        def forward(ids, am):
            with torch.no_grad():
                ref = rm.token_logprobs("reference", ids, am)
            return rm.token_logprobs("policy", ids, am), ref
        return forward, rm.trainable_parameters(), [rm]
    policy = _new_model(config, device, dtype)
    reference = copy.deepcopy(policy).requires_grad_(False)
    if ckpt:
        _checkpoint(policy)
    logps_fn = _fused_logps if kind == "separate-models-fused" else _trl_logps

    def forward(ids, am):
        with torch.no_grad():
            ref = logps_fn(reference, ids, am)
        return logps_fn(policy, ids, am), ref
    return forward, list(policy.parameters()), [policy, reference]


def _dpo_step_fused(roles, opt, ids, am, loss_mask):
    import fastrlhf

    rm = roles.roles
    mask = _next_token_mask(am, loss_mask)
    pairs = ids.shape[0] // 2

    def step():
        with torch.no_grad():
            ref_seq = fastrlhf.sequence_logps(rm.token_logprobs("reference", ids, am), mask)
        head = rm.head_inputs(ids, am, loss_mask=loss_mask)  # what DPOTrainer calls
        loss, _ = fastrlhf.dpo_loss_from_hidden(head.hidden, head.weight, head.targets, ref_seq[:pairs],
                                                ref_seq[pairs:], beta=0.1, **head.head_kwargs())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def dpo_step_fn(forward, params, ids, am, loss_mask):
    import fastrlhf

    opt = torch.optim.AdamW(params, lr=1e-6)
    if isinstance(forward, _FusedRoles):
        return _dpo_step_fused(forward, opt, ids, am, loss_mask)
    mask = loss_mask[:, 1:]
    pairs = ids.shape[0] // 2

    def step():
        logps, ref = forward(ids, am)
        seq = fastrlhf.sequence_logps(logps, mask)
        ref_seq = fastrlhf.sequence_logps(ref, mask)
        loss, _ = fastrlhf.dpo_loss(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------- runner

# (step, checkpointing) in run order: the checkpointed PPO step first, as a time budget cuts the tail
# and that is the configuration where weights (four models vs one base + adapters) dominate.
CONFIGS = (("e2e_ppo_step", True), ("e2e_ppo_step", False), ("e2e_dpo_step", True), ("e2e_dpo_step", False))
STEPS = {"e2e_ppo_step": (build_ppo, ppo_step_fn), "e2e_dpo_step": (build_dpo, dpo_step_fn)}


def _state_bytes(modules, params_with_state) -> int:
    """Unique storages of every parameter/buffer plus optimizer state (CPU footprint accounting)."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_bytes(params) -> int:
    """AdamW keeps two fp32-or-param-dtype moments per trainable parameter; gradients are freed
    (set_to_none) between steps but exist during one, and the step peak already counts them."""
    return sum(2 * p.numel() * p.element_size() for p in params)


def _grad_bytes(params) -> int:
    """The trainable gradients, one per parameter in its dtype (freed by zero_grad between steps, so
    not in memory_allocated() after a step, but alive at the end of every backward)."""
    return sum(p.numel() * p.element_size() for p in params)


def _row(info, step_name, kind, ckpt, name, B, T, gpu) -> dict:
    backend = ("triton" if gpu else "torch") if kind != "trl-style" else "eager"
    what = "fused RL head for the final loss; " if kind == FUSED else ""
    return dict(kernel=step_name, provider=kind, mode="full", dtype="bf16" if gpu else "fp32",
                shape=f"model={name},B={B},T={T}" + (",ckpt" if ckpt else ""), device=info.name, date=today(),
                backend=backend, note=what + "peak = weights+grads+optimizer+step",
                **{k: info.versions.get(k, "") for k in ("torch", "triton", "fastrlhf", "liger_kernel", "trl")})


def _measure_gpu(build, make_step, batch) -> tuple:
    """(timing, peak, static): peak and static count everything allocated since before the build."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    forward, params, modules = build()
    step = make_step(forward, params, *batch)
    step()  # allocates the optimizer state
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated() - base + _grad_bytes(params)
    timing = measure.bench(step, "cuda", quick=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return timing, torch.cuda.max_memory_allocated() - base, static


def _measure_cpu(build, make_step, batch) -> tuple:
    """(timing, peak, static) from storage sizes plus the profiler's peak of one step (which includes
    the gradients, allocated inside the step)."""
    forward, params, modules = build()
    step = make_step(forward, params, *batch)
    step()  # allocates the optimizer state
    held = _state_bytes(modules, params) + _optimizer_bytes(params)
    timing = measure.bench(step, "cpu", quick=True)
    return timing, held + measure.peak_bytes(step, "cpu"), held + _grad_bytes(params)


def _run_one(row, build, make_step, batch, gpu) -> dict:
    what = "fused RL head for the final loss; " if row["provider"] == FUSED else ""
    import fastrlhf

    log(f"[{row['kernel']}] {row['provider']} {row['shape']}")
    try:
        with fastrlhf.use_backend("auto" if gpu else "torch"):
            timing, peak, static = (_measure_gpu if gpu else _measure_cpu)(build, make_step, batch)
    except Exception as exc:
        row = dict(row, status=_error_status(exc))
        log(f"  {row['kernel']} {row['provider']}: {row['status']}")
        return row
    finally:
        if gpu:  # the models are garbage now; collect cycles (RoleModel/PEFT) before the next build
            gc.collect()
            torch.cuda.empty_cache()
    log(f"  {row['kernel']} {row['provider']}: {timing.median_ms:.1f} ms, peak {peak / 2**20:.1f} MiB, "
        f"static {static / 2**20:.1f} MiB")
    return dict(row, median_ms=f"{timing.median_ms:.4g}", p20_ms=f"{timing.p20_ms:.4g}",
                p80_ms=f"{timing.p80_ms:.4g}", peak_bytes=peak, status="ok",
                note=f"static_bytes={static}; {what}peak = weights+grads+optimizer+step, "
                     "static = weights+grads+optimizer")


def run(info: DeviceInfo, *, quick: bool, deadline: float | None = None, providers=None,
        configs=CONFIGS, on_row=None) -> list[dict]:
    """Every (step, checkpointing, provider) row; `on_row(row)` is called as each one is done."""
    device = info.device
    gpu = device.startswith("cuda")
    name, config = model_config(quick, gpu)
    dtype = torch.bfloat16 if gpu else torch.float32
    B, T = (8, 1024) if gpu and not quick else ((4, 256) if gpu else (4, 128))
    batch = _batch(B, T, config.vocab_size, device)
    rows = []
    for step_name, ckpt in configs:
        build, make_step = STEPS[step_name]
        for kind in PROVIDERS:
            if providers is not None and kind not in providers:
                continue
            row = _row(info, step_name, kind, ckpt, name, B, T, gpu)
            if deadline is not None and time.monotonic() > deadline:
                rows.append(dict(row, status="skipped: time budget"))
            elif kind == "trl-style" and peers.peer_status("trl.trainer.utils"):
                rows.append(dict(row, status=peers.peer_status("trl.trainer.utils")))
            else:
                rows.append(_run_one(row, lambda: build(kind, config, device, dtype, ckpt=ckpt), make_step,
                                     batch, gpu))
            if on_row is not None:
                on_row(rows[-1])
    return rows
