"""The PPO and DPO steps of TRL-style code, for the memory comparison (setups "separate", "trl-peft").

This is not TRL (which is not a dependency); it is a step with the memory behaviour of TRL's
trainers, written from their structure (trl/trainer/ppo_trainer.py, dpo_trainer.py, utils.py, TRL
>= 0.12), so that the simulator can run it next to fastrlhf's:

PPO ("separate": policy, reference, value and reward are four full models; "trl-peft": the policy
is a LoRA PeftModel whose base, adapters off, is the reference; value and reward stay full models):
    rollout scoring, no grad, one model at a time: policy and reference forwards with the full
        [B, T, V] logits (the response part, / temperature) -> `selective_log_softmax` (TRL's row
        loop); value and reward models: their backbone with output_hidden_states=True (every
        layer's hidden states kept until the call returns, as TRL's `get_reward` does), the score
        head on the last one.
    update (one micro-batch): value backbone + score head, then the policy forward (full logits),
        `selective_log_softmax`, clipped policy and value losses, backward, AdamW step over policy
        and value, zero_grad; then, under no_grad, the entropy of the full logits (softmax,
        logsumexp, sum of p * logits), as TRL's PPO trainer logs it after each step.
    Generation is not simulated (nor is it for fastrlhf): TRL's old log-probs come from the
    generation logits; here a no-grad policy forward computes them.
DPO: chosen and rejected rows in one forward (`concatenated_forward`): full logits, labels rolled
    by one, `selective_log_softmax`, masked sums, the mean chosen / rejected logits metrics; then the
    reference log-probs under no_grad (a reference model, or the policy with adapters disabled for
    peft), sigmoid loss, backward, AdamW step.
Models are loaded in the training dtype (bf16) and trained with AdamW in that dtype, with bf16
autocast around the forwards (accelerate's mixed precision), as fastrlhf's full fine-tuning is.
The optimizer is fused AdamW on CUDA, the default of transformers' Trainer (optim="adamw_torch_fused"
with torch >= 2.8) that TRL's trainers build on; fastrlhf's trainers use torch's default (for-each).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from fastrlhf.planner.spec import (
    PAD_ID,
    StepSpec,
    _Run,
    build_causal_lm,
    preference_batch,
    rollout_batch,
    use_fused_adamw,
)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] the way TRL computes it: fp32 logits by a gather and a row-wise
    logsumexp; bf16/fp16 logits by a log_softmax of one row of the batch at a time."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        normaliser = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - normaliser
    rows = []
    for row_logits, row_index in zip(logits, index):
        row = F.log_softmax(row_logits, dim=-1)
        rows.append(row.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.cumsum(1) - attention_mask.long()


def _forward(model, ids, mask):
    """TRL's `forward`: padding ids zeroed, positions from the mask, all hidden states returned."""
    ids = torch.masked_fill(ids, ~mask.bool(), 0)
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), return_dict=True,
                 output_hidden_states=True)


def _backbone_scores(model, ids, mask):
    """TRL's `get_reward`: the backbone with all hidden states, the score head on the last one -> [B, T]."""
    backbone = getattr(model, model.base_model_prefix)
    ids = torch.masked_fill(ids, ~mask.bool(), 0)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), return_dict=True,
                   output_hidden_states=True, use_cache=False)
    return model.score(out.hidden_states[-1]).squeeze(-1)


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    return mask.long().sum(-1) - 1


# ---------------------------------------------------------------------------- building


def _enable_checkpointing(model) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build(spec: StepSpec, config, *, fake: bool, target: str, seed: int, prepare) -> _Run:
    from fastrlhf.planner.fake import decoder_layers

    dtype = spec.torch_dtype
    peft = spec.setup == "trl-peft"
    policy = build_causal_lm(config, dtype, fake=fake, seed=seed)
    reference = None if peft else copy.deepcopy(policy).requires_grad_(False)
    if peft:
        from peft import LoraConfig, get_peft_model

        targets = list(spec.lora_target_modules) if spec.lora_target_modules else "all-linear"
        policy = get_peft_model(policy, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                                   target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    value = reward = None
    if spec.stage == "ppo":
        value = build_causal_lm(config, dtype, fake=fake, kind="classifier", seed=seed + 1)
        reward = build_causal_lm(config, dtype, fake=fake, kind="classifier", seed=seed + 2).requires_grad_(False)
    named = {"policy": policy, "reference": reference, "value": value, "reward": reward}
    modules = [m for m in named.values() if m is not None]
    prepare(modules)
    owner: dict[int, str] = {}
    for role, model in named.items():
        if model is None:
            continue
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            owner.setdefault(id(t), ("policy" if "lora_" in name else "base") if peft and role == "policy" else role)
    trained = [policy] + ([value] if value is not None else [])
    if spec.checkpointing:
        for model in trained:
            _enable_checkpointing(model)
    for model in trained:
        model.train()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    if spec.fused_adamw or target == "cuda":  # TRL's trainers: transformers' default optim, adamw_torch_fused
        use_fused_adamw(optimizer)
    autocast = contextlib.nullcontext
    if target == "cuda" and dtype != torch.float32:
        from fastrlhf.planner.cuda import bf16_autocast

        autocast = bf16_autocast
    vocab = config.vocab_size
    if spec.stage == "ppo":
        inputs = rollout_batch(spec.rollout_rows, spec.prompt_len, spec.seq_len, vocab, 1, seed)
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        step = _ppo_step(spec, named, peft, optimizer, params, autocast)
    else:
        inputs = preference_batch(spec.batch_size, spec.seq_len, vocab, seed)
        step = _dpo_step(spec, named, peft, optimizer, autocast)
    return _Run(modules=modules, owner=owner, optimizer=optimizer, params=params, step=step, inputs=inputs,
                layers=[decoder_layers(m) for m in modules])


def _reference_context(policy, peft: bool):
    return policy.disable_adapter() if peft else contextlib.nullcontext()


# ---------------------------------------------------------------------------- PPO


def _ppo_step(spec: StepSpec, named: dict, peft: bool, optimizer, params, autocast):
    policy, value, reward = named["policy"], named["value"], named["reward"]
    reference = policy if peft else named["reference"]
    context = spec.prompt_len
    temperature = 1.0 + 1e-7

    def logprobs(model, ids, mask, response):
        output = _forward(model, ids, mask)
        logits = output.logits[:, context - 1 : -1]
        logits /= temperature
        return selective_log_softmax(logits, response)

    def step(counter, batch) -> None:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        response = ids[:, context:]
        response_mask = batch["response_mask"][:, context - 1 :]
        with counter.label(phase="rollout scoring"), torch.no_grad(), autocast():
            with counter.label(role="policy"):
                old_logprobs = logprobs(policy, ids, mask, response)
            with counter.label(role="reference"), _reference_context(policy, peft):
                ref_logprobs = logprobs(reference, ids, mask, response)
            with counter.label(role="value"):
                values = _backbone_scores(value, ids, mask)[:, context - 1 : -1].float()
            with counter.label(role="reward"):
                scores = _backbone_scores(reward, ids, mask)
                scores = scores[torch.arange(ids.shape[0]), _last_index(mask)].float()
            kl = (old_logprobs - ref_logprobs) * response_mask
            rewards = -0.05 * kl
            rewards[:, -1] += scores
            advantages = rewards - values  # one-step advantages: [B, R], same size as TRL's GAE output
            returns = advantages + values
        rows = spec.micro_rows
        mb = slice(0, rows)
        counter.phase = "forward"
        with autocast():
            with counter.label(role="value"):
                vpred = _backbone_scores(value, ids[mb], mask[mb])[:, context - 1 : -1].float()
            with counter.label(role="policy"):
                output = _forward(policy, ids[mb], mask[mb])
                logits = output.logits[:, context - 1 : -1]
                logits /= temperature
                new_logprobs = selective_log_softmax(logits, response[mb])
        m = response_mask[mb]
        vclipped = values[mb] + (vpred - values[mb]).clamp(-0.2, 0.2)
        vf_loss = 0.5 * (torch.max((vpred - returns[mb]) ** 2, (vclipped - returns[mb]) ** 2) * m).sum() / m.sum()
        ratio = torch.exp(new_logprobs - old_logprobs[mb])
        pg_losses = torch.max(-advantages[mb] * ratio, -advantages[mb] * ratio.clamp(0.8, 1.2))
        loss = (pg_losses * m).sum() / m.sum() + 0.1 * vf_loss
        loss.backward()
        counter.phase = "optimizer step"
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            prob_dist = torch.nn.functional.softmax(logits, dim=-1)
            entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
            del prob_dist, entropy
        del output, logits
    return step


# ---------------------------------------------------------------------------- DPO


def _concatenated_logps(model, batch, pairs: int):
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = torch.roll(ids, shifts=-1, dims=1)
    rolled_mask = torch.roll(loss_mask, shifts=-1, dims=1).bool()
    labels = labels.masked_fill(~rolled_mask, 0)
    per_token = selective_log_softmax(logits, labels)
    per_token = per_token.masked_fill(~rolled_mask, 0)
    per_token = torch.roll(per_token, shifts=1, dims=1)
    logps = per_token.sum(-1)
    with torch.no_grad():  # TRL's mean_chosen_logits / mean_rejected_logits: a masked copy of the logits
        metrics = [(logits[part].masked_fill(~rolled_mask[part, :, None], 0)).float().mean()
                   for part in (slice(0, pairs), slice(pairs, None))]
    return logps[:pairs], logps[pairs:], metrics


def _dpo_step(spec: StepSpec, named: dict, peft: bool, optimizer, autocast):
    policy = named["policy"]
    reference = policy if peft else named["reference"]
    pairs = spec.batch_size

    def step(counter, batch) -> None:
        counter.phase = "forward"
        with autocast():
            with counter.label(role="policy"):
                chosen, rejected, metrics = _concatenated_logps(policy, batch, pairs)
            with counter.label(role="reference"), torch.no_grad(), _reference_context(policy, peft):
                ref_chosen, ref_rejected, _ = _concatenated_logps(reference, batch, pairs)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(0.1 * margin.float()).mean()
        loss.backward()
        counter.phase = "optimizer step"
        optimizer.step()
        optimizer.zero_grad()
    return step


__all__ = ["selective_log_softmax", "build", "PAD_ID"]
