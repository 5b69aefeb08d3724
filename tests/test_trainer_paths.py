"""The trainers' loss path and memory options on a tiny random Llama (CPU): the fused RL head against
the recompute path (`token_logprobs` + the loss), activation checkpointing in every trainer (PPO/GRPO
included, which run in eval mode), gradient accumulation with whole-step totals, the optimizer
choice, and the reference copy under FSDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastrlhf
from fastrlhf.testing import tiny_llama, tiny_tokenizer

SFT_RECORDS = [
    {"prompt": "say red", "completion": "red red red"},
    {"prompt": "say blue", "completion": "blue cat"},
    {"prompt": "count to three", "completion": "one two three four five"},
    {"prompt": "hi", "completion": "hello"},
] * 2
PREFERENCE_RECORDS = [
    {"prompt": "what color is the sun", "chosen": "yellow and big", "rejected": "blue"},
    {"prompt": "say yes", "chosen": "yes", "rejected": "no no no"},
    {"prompt": "count to two", "chosen": "one two", "rejected": "three"},
] * 2
PROMPT_RECORDS = [{"prompt": p} for p in ("say yes", "hi", "count to three", "what color is the sun", "say red",
                                          "answer with one word")]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_model(tok, roles=("policy",), *, lm_head_scale=10.0, **kwargs):
    from fastrlhf.roles import RoleModel

    base = tiny_llama(vocab_size=len(tok), hidden_size=32, seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(lm_head_scale)
    torch.manual_seed(0)
    kwargs.setdefault("lora_r", 8)
    return RoleModel(base, roles=roles, **kwargs)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def length_reward(prompts, completions, records):
    return [float(len(c) % 7) for c in completions]  # varies between samples: non-zero advantages


def _run(stage, tok, tmp_path, name, *, backend, model_kwargs=None, **options):
    from fastrlhf import trainers

    trainer_name, config_name = trainers.TRAINERS[stage]
    trainer_class, config_class = getattr(trainers, trainer_name), getattr(trainers, config_name)
    roles = {"sft": ("policy",), "dpo": ("policy",), "ppo": ("policy", "value"), "grpo": ("policy",)}[stage]
    records = {"sft": SFT_RECORDS, "dpo": PREFERENCE_RECORDS}.get(stage, PROMPT_RECORDS)
    base = dict(output_dir=str(tmp_path / name), learning_rate=1e-2, batch_size=4, max_steps=3,
                lr_schedule="constant", progress=False, backend=backend, save_final=False)
    if stage in ("ppo", "grpo"):
        base.update(max_new_tokens=6, ppo_epochs=2, num_minibatches=2)
    base.update(options)
    model = make_model(tok, roles=roles, **(model_kwargs or {}))
    reward_fn = length_reward if stage in ("ppo", "grpo") else None
    trainer = trainer_class(model, tok, config_class(**base), records, reward_fn=reward_fn)
    trainer.train()
    return read_metrics(base["output_dir"]), model


def assert_same_metrics(fused, recompute, *, rel, abs_):
    assert len(fused) == len(recompute) > 0
    for a, b in zip(fused, recompute):
        keys = set(a) - {"elapsed_s"}
        assert keys == set(b) - {"elapsed_s"}
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), (key, a[key], b[key])


# --------------------------------------------------------------------------- 1. the fused RL head

FUSED_CASES = [
    ("sft", {}),
    ("sft", {"loss_agg": "seq-mean-token-mean"}),
    ("dpo", {}),
    ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "simpo", "simpo_gamma": 0.5}),
    ("ppo", {"kl_in_reward": False, "entropy_coef": 0.01}),
    ("ppo", {"loss_agg": "seq-mean-token-sum-norm", "dual_clip": 3.0, "clip_eps_high": 0.28}),
    ("grpo", {}),
    ("grpo", {"loss_type": "gspo", "is_correction": "sequence_truncate"}),
    ("grpo", {"loss_type": "cispo", "is_correction": "token_mask", "is_clip_min": 0.5}),
    ("grpo", {"loss_type": "sapo", "top_entropy_quantile": 0.5, "loss_agg": "seq-mean-token-mean"}),
    ("grpo", {"ppo_epochs": 1, "num_minibatches": 1, "entropy_coef": 0.01}),  # on-policy: no old_logps
]


@pytest.mark.parametrize("stage,options", FUSED_CASES,
                         ids=[f"{s}-" + "-".join(f"{k}={v}" for k, v in o.items()) for s, o in FUSED_CASES])
def test_fused_head_trains_like_the_recompute_path_torch(tok, tmp_path, stage, options):
    """A few steps of each trainer with the fused RL head and with token_logprobs + the loss: the same
    losses and metrics (float rounding apart) at every step, on the torch backend."""
    fused, _ = _run(stage, tok, tmp_path, "fused", backend="torch", fused_head=True, **options)
    recompute, _ = _run(stage, tok, tmp_path, "recompute", backend="torch", fused_head=False, **options)
    assert_same_metrics(fused, recompute, rel=1e-4, abs_=1e-5)


TRITON_CASES = [("sft", {}), ("dpo", {}), ("ppo", {"kl_in_reward": False, "entropy_coef": 0.01}),
                ("grpo", {"loss_type": "gspo"})]


@pytest.mark.parametrize("stage,options", TRITON_CASES, ids=[s for s, _ in TRITON_CASES])
def test_fused_head_trains_like_the_recompute_path_triton(tok, tmp_path, stage, options):
    """The same on the Triton backend (the interpreter on CPU): the fused kernels, not their twins."""
    short = dict(max_steps=2) if stage in ("ppo", "grpo") else {}
    fused, _ = _run(stage, tok, tmp_path, "fused", backend="triton", fused_head=True, **short, **options)
    recompute, _ = _run(stage, tok, tmp_path, "recompute", backend="triton", fused_head=False, **short, **options)
    assert_same_metrics(fused, recompute, rel=1e-4, abs_=1e-5)


def test_head_inputs_are_the_policy_hidden_states_targets_and_head(tok):
    """RoleModel.head_inputs: hidden[:, :-1] of the policy, next-token targets with -100 outside the
    attention and loss masks, the LM head and the model's soft-cap; a fused loss on them equals
    token_logprobs + the loss (the soft-cap applied by both)."""
    from fastrlhf.roles import RoleModel

    base = tiny_llama(vocab_size=len(tok), hidden_size=32, seed=0)
    base.config.final_logit_softcapping = 5.0
    with torch.no_grad():
        base.lm_head.weight.mul_(100.0)  # logits of order 10: the cap changes them
    roles = RoleModel(base, roles=("policy",), lora_r=4)
    assert roles.logit_softcap == 5.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 4:] = 1
    head = roles.head_inputs(ids, am, loss_mask=loss_mask)
    torch.testing.assert_close(head.hidden, roles.hidden_states("policy", ids, am)[:, :-1])
    keep = (am[:, 1:] * loss_mask[:, 1:]).bool()
    assert torch.equal(head.targets, ids[:, 1:].masked_fill(~keep, -100))
    assert head.weight is roles.lm_head_weight and head.bias is None and head.softcap == 5.0
    with fastrlhf.use_backend("torch"):
        loss, _ = fastrlhf.sft_loss_from_hidden(head.hidden, head.weight, head.targets, **head.head_kwargs())
        logps = roles.token_logprobs("policy", ids, am)
    expected = -(logps * keep).sum() / keep.sum()
    torch.testing.assert_close(loss, expected)
    uncapped, _ = fastrlhf.sft_loss_from_hidden(head.hidden, head.weight, head.targets, backend="torch")
    assert not torch.allclose(uncapped, expected)  # the cap matters at these logits


# --------------------------------------------------------------------------- 2. activation checkpointing


def _count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("use_lora", [True, False])
def test_checkpointing_works_in_eval_mode_with_eval_outputs(tok, use_lora):
    """PPO/GRPO update in eval mode: with checkpointing on, each decoder layer is recomputed in
    backward (its attention runs twice), while the log-probs, values and gradients are those of eval
    mode without checkpointing (LoRA dropout 0.5 stays off)."""
    results = {}
    for checkpointing in (False, True):
        model = make_model(tok, roles=("policy", "value"), use_lora=use_lora, lora_dropout=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.eval()
        assert not model.training
        assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
        attention = model.causal_lm.get_decoder().layers[0].self_attn
        calls = _count_calls(attention)
        ids = torch.randint(5, len(tok), (3, 10), generator=torch.Generator().manual_seed(0))
        am = torch.ones_like(ids)
        am[0, 7:] = 0
        logps, values = model.token_logprobs_and_values(ids, am)
        forward_calls = len(calls)
        (logps.sum() + values.sum()).backward()
        grads = [p.grad.clone() for p in model.trainable_parameters()]
        results[checkpointing] = (logps.detach(), values.detach(), grads, forward_calls, len(calls))
        if checkpointing:  # training mode again: every module trains, dropout included
            model.train()
            assert all(m.training for m in model.modules())
            model.eval()
            assert model.causal_lm.get_decoder().layers[0].training and not attention.training
    (logps0, values0, grads0, fwd0, total0), (logps1, values1, grads1, fwd1, total1) = results[False], results[True]
    torch.testing.assert_close(logps1, logps0)
    torch.testing.assert_close(values1, values0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b)
    assert total0 == fwd0 and total1 == 2 * fwd1  # recomputed in backward only with checkpointing


@pytest.mark.parametrize("stage", ["sft", "ppo", "grpo"])
def test_gradient_checkpointing_option_leaves_the_training_unchanged(tok, tmp_path, stage):
    """`gradient_checkpointing=True` (--gradient-checkpointing): the same metrics as without."""
    options = dict(kl_in_reward=False) if stage == "ppo" else {}
    with_ckpt, model = _run(stage, tok, tmp_path, "ckpt", backend="torch", gradient_checkpointing=True, **options)
    without, _ = _run(stage, tok, tmp_path, "plain", backend="torch", **options)
    assert model.is_gradient_checkpointing
    assert_same_metrics(with_ckpt, without, rel=1e-5, abs_=1e-6)


def test_checkpointing_lowers_the_ppo_peak_in_real_and_simulated_runs():
    """The PPO trainer's own step (eval mode) with checkpointing: a real CPU run counted byte by byte
    holds less at its peak, the fake run predicts exactly the real bytes, and at Qwen2.5-7B (B=8,
    T=2048) the prediction drops from ~114 GiB to ~25 GiB (with checkpointing silently off in eval
    mode, as before, it was ~211 GiB with the value pass's activations on top)."""
    from fastrlhf.planner.configs import load_config
    from fastrlhf.planner.simulate import simulate
    from fastrlhf.planner.steps import StepSpec, run_step

    config = tiny_llama(vocab_size=len(tiny_tokenizer()), hidden_size=64, tie=True).config
    config.num_hidden_layers = 4
    peaks = {}
    for checkpointing in (False, True):
        spec = StepSpec("ppo", batch_size=4, seq_len=96, prompt_len=32, dtype="fp32", checkpointing=checkpointing)
        real = run_step(spec, config, fake=False, target="cpu")
        assert simulate(spec, config, target="cpu").peak_bytes == real.peak.total
        peaks[checkpointing] = real.peak.by(0)
    assert peaks[True]["activations"] < 0.5 * peaks[False]["activations"]
    assert sum(peaks[True].values()) < sum(peaks[False].values())

    big, _ = load_config("Qwen2.5-7B")
    spec = dict(batch_size=8, seq_len=2048, prompt_len=1024)
    off = simulate(StepSpec("ppo", **spec), big).peak_bytes / 2**30
    on = simulate(StepSpec("ppo", checkpointing=True, **spec), big).peak_bytes / 2**30
    assert off > 100 and on < 30, (off, on)


# --------------------------------------------------------------------------- 3. whole-step totals


def _ragged_experience(trainer, prompts):
    """A real PPO/GRPO experience with ragged rows: completions cut to different lengths (so
    `select_rows` gives micro-batches of different widths), one row with no counted token at all."""
    with torch.no_grad():
        trainer.model.eval()
        experience, _ = trainer.make_experience(prompts)
    am, mask = experience["attention_mask"].clone(), experience["mask"].clone()
    rows, width = am.shape
    for row in range(rows):
        cut = width - 1 - (row * 3) % 5  # real tokens kept in this row
        am[row, cut:] = 0
        mask[row, cut - 1:] = 0
    mask[1] = 0  # a row whose tokens all sit outside the loss (an empty completion)
    experience.update(attention_mask=am, mask=mask)
    for key in ("advantages", "old_logps", "ref_logps", "values", "returns", "rollout_logps"):
        if key in experience:
            experience[key] = experience[key] * mask
    return experience


def _step_gradients(trainer, experience, grad_accum_steps):
    """One optimizer step's gradients and logged metrics of `update` (the optimizer does not move the
    weights, so each call starts from the same ones)."""
    captured = {}

    def capture():
        captured["grads"] = [None if p.grad is None else p.grad.clone() for p in trainer.params]

    trainer.optimizer.step = capture
    trainer.config.grad_accum_steps = grad_accum_steps
    torch.manual_seed(0)  # the same row order
    metrics = trainer.update(experience)
    return captured["grads"], {k: float(v) for k, v in metrics.items()}


ACCUMULATION_CASES = [(stage, agg, "torch") for stage in ("ppo", "grpo")
                      for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")]
ACCUMULATION_CASES += [("ppo", "seq-mean-token-sum-norm", "triton"), ("grpo", "seq-mean-token-mean", "triton")]


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("stage,loss_agg,backend", ACCUMULATION_CASES, ids=["-".join(c) for c in ACCUMULATION_CASES])
def test_gradient_accumulation_equals_one_big_batch_for_every_loss_agg(tok, tmp_path, stage, loss_agg, backend):
    """One optimizer step over 6 ragged rows (different lengths, a row with no counted token), as one
    micro-batch or as 2 or 3 accumulated ones: the same gradients, loss, pg_loss and vf_loss. Each
    micro-batch's loss is normalised by the step's totals (tokens, counted sequences, width); the
    former re-weighting by micro-batch rows/tokens was off for seq-mean-* whenever micro-batches
    differed in counted rows or width."""
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    common = dict(output_dir=str(tmp_path / "run"), batch_size=6 if stage == "ppo" else 3, max_new_tokens=8,
                  max_grad_norm=0.0, progress=False, backend=backend, loss_agg=loss_agg, entropy_coef=0.01,
                  kl_coef=0.1)
    if stage == "ppo":
        trainer = PPOTrainer(make_model(tok, roles=("policy", "value")), tok,
                             PPOConfig(**common, kl_in_reward=False), PROMPT_RECORDS, reward_fn=length_reward)
    else:
        trainer = GRPOTrainer(make_model(tok), tok, GRPOConfig(**common, group_size=2), PROMPT_RECORDS,
                              reward_fn=length_reward)
    with fastrlhf.use_backend(backend):
        experience = _ragged_experience(trainer, trainer.train_examples[:common["batch_size"]])
        grads_big, metrics_big = _step_gradients(trainer, experience, 1)
        for accum in (2, 3):
            grads, metrics = _step_gradients(trainer, experience, accum)
            for a, b in zip(grads, grads_big):
                if b is None:
                    assert a is None
                else:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            for key in ("loss", "pg_loss", "vf_loss", "kl"):
                if key in metrics_big:
                    assert metrics[key] == pytest.approx(metrics_big[key], rel=1e-5, abs=1e-7), (key, accum)
    assert any(g is not None and g.abs().sum() > 0 for g in grads_big)



@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_ppo_value_pass_first_gives_the_joint_gradients(tok, tmp_path, monkeypatch):
    """PPO with LoRA runs the value role's pass (forward and backward) before the policy's, to free its
    activations first: the same gradients and metrics as one backward of policy + vf_coef * value loss."""
    from fastrlhf.trainers._policy_gradient import PolicyGradientTrainer
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    config = PPOConfig(output_dir=str(tmp_path / "run"), batch_size=6, max_new_tokens=8, max_grad_norm=0.0,
                       progress=False, backend="torch", kl_in_reward=False, kl_coef=0.1, vf_coef=0.5)
    trainer = PPOTrainer(make_model(tok, roles=("policy", "value")), tok, config, PROMPT_RECORDS,
                         reward_fn=length_reward)
    experience = _ragged_experience(trainer, trainer.train_examples[:6])
    first, metrics_first = _step_gradients(trainer, experience, 2)
    monkeypatch.setattr(PPOTrainer, "policy_loss", PolicyGradientTrainer.policy_loss)
    joint, metrics_joint = _step_gradients(trainer, experience, 2)
    assert len(first) == len(joint) and sum(g is not None for g in first) > 0
    for a, b in zip(first, joint):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key in ("loss", "pg_loss", "vf_loss", "vf_clipfrac", "clipfrac", "entropy"):
        assert metrics_first[key] == pytest.approx(metrics_joint[key], rel=1e-6, abs=1e-8), key


def test_ppo_value_pass_first_lowers_the_real_peak(monkeypatch):
    """The PPO trainer's own step on the CPU, counted byte by byte (tiny Llama, LoRA, checkpointing):
    the value pass first holds fewer activations at the peak than the joint loss."""
    from fastrlhf.planner.steps import StepSpec, run_step
    from fastrlhf.trainers._policy_gradient import PolicyGradientTrainer
    from fastrlhf.trainers.ppo import PPOTrainer

    config = tiny_llama(vocab_size=len(tiny_tokenizer()), hidden_size=64, tie=True).config
    config.num_hidden_layers = 4
    spec = StepSpec("ppo", batch_size=4, seq_len=96, prompt_len=32, dtype="fp32", checkpointing=True)
    first = run_step(spec, config, fake=False, target="cpu").peak
    monkeypatch.setattr(PPOTrainer, "policy_loss", PolicyGradientTrainer.policy_loss)
    joint = run_step(spec, config, fake=False, target="cpu").peak
    assert first.by(0)["activations"] < joint.by(0)["activations"] and first.total < joint.total

@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("fused_head", [True, False])
def test_sft_gradient_accumulation_equals_one_big_batch(tok, tmp_path, loss_agg, fused_head):
    """SFT: 8 sequences of different lengths as one batch or 4 micro-batches of 2: the same losses
    and weights after 3 steps, for both aggregations and both loss paths."""
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    finals = []
    for name, batch_size, accum in (("big", 8, 1), ("accum", 2, 4)):
        model = make_model(tok)
        config = SFTConfig(output_dir=str(tmp_path / name), learning_rate=1e-2, batch_size=batch_size,
                           grad_accum_steps=accum, max_steps=3, lr_schedule="constant", progress=False,
                           backend="torch", loss_agg=loss_agg, fused_head=fused_head, save_final=False)
        SFTTrainer(model, tok, config, SFT_RECORDS).train()
        finals.append(([r["loss"] for r in read_metrics(config.output_dir)], model.trainable_parameters("policy")))
    (losses_a, params_a), (losses_b, params_b) = finals
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 2 ranks == 1 process

PG_RANKS_ROWS, PG_RANKS_WIDTH = 8, 14


def _pg_step_on_fixed_rows(opt: dict, ctx=None) -> tuple[dict, dict]:
    """One PPO optimizer step (grad_accum_steps micro-batches) over this rank's share of 8 fixed
    ragged rows: (full gradients by parameter name, logged metrics). The experience is computed by
    the model itself (old and reference log-probs, values), so a sharded reference is exercised."""
    from fastrlhf.distributed import DistContext
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    ctx = ctx or DistContext.from_env()
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = make_model(tok, roles=("policy", "value"), use_lora=opt["use_lora"])
    config = PPOConfig(output_dir=opt["output_dir"], batch_size=PG_RANKS_ROWS // ctx.world_size, max_new_tokens=8,
                       grad_accum_steps=opt["grad_accum_steps"], max_grad_norm=0.0, progress=False, backend="torch",
                       loss_agg=opt["loss_agg"], kl_in_reward=False, kl_coef=0.1, entropy_coef=0.01,
                       fsdp=opt["fsdp"], save_final=False, learning_rate=1e-3)
    trainer = PPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=length_reward, ctx=ctx)
    # before any forward: FSDP2 then lists the sharded parameters (an unsharded root lists its gathered ones)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (PG_RANKS_ROWS, PG_RANKS_WIDTH), generator=g)
    am = torch.ones_like(ids)
    mask = torch.zeros(PG_RANKS_ROWS, PG_RANKS_WIDTH - 1)
    for row in range(PG_RANKS_ROWS):
        length = PG_RANKS_WIDTH - (row * 3) % 5
        am[row, length:] = 0
        ids[row, length:] = tok.pad_token_id
        mask[row, 5:length - 1] = 1
    mask[1] = 0
    advantages = torch.randn(mask.shape, generator=g) * mask
    returns = torch.randn(mask.shape, generator=g) * mask
    rows = torch.arange(ctx.rank, PG_RANKS_ROWS, ctx.world_size)
    ids, am, mask, advantages, returns = (t[rows].to(ctx.device) for t in (ids, am, mask, advantages, returns))
    trainer.model.eval()
    with torch.no_grad():
        old_logps, values = trainer.model.token_logprobs_and_values(ids, am)
        ref_logps = trainer.model.token_logprobs("reference", ids, am)
    experience = dict(input_ids=ids, attention_mask=am, mask=mask, advantages=advantages, returns=returns,
                      old_logps=(old_logps + 0.05) * mask, ref_logps=ref_logps * mask,
                      values=values[:, :-1] * mask)
    captured, params = {}, trainer.params

    def capture():
        captured.update({names[id(p)]: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                         for p in params if p.grad is not None})

    trainer.optimizer.step = capture
    torch.manual_seed(0)
    metrics = trainer.metrics_log.to_floats(trainer.update(experience))
    metrics["reference_bytes"] = model.memory_report()["reference"]["params_bytes"]  # this rank's
    metrics["reference_sharded"] = float(model.memory_report()["reference"]["sharded"])
    del trainer, model
    return captured, metrics


def _scenario_pg_step(options_json: str):
    from fastrlhf.distributed import DistContext

    opt = json.loads(options_json)
    ctx = DistContext.from_env()
    grads, metrics = _pg_step_on_fixed_rows(opt, ctx)
    if ctx.is_main:
        torch.save({"grads": grads, "metrics": metrics}, Path(opt["output_dir"]) / "step.pt")
    from test_distributed import close_and_check

    close_and_check(ctx)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("fsdp,use_lora,loss_agg", [(False, True, "seq-mean-token-sum-norm"),
                                                    (True, True, "seq-mean-token-mean"),
                                                    (True, False, "token-mean")],
                         ids=["ddp-lora", "fsdp2-lora", "fsdp2-full"])
def test_two_ranks_with_accumulation_equal_one_process(tmp_path, fsdp, use_lora, loss_agg):
    """PPO: 2 gloo ranks x 2 accumulated micro-batches over the halves of 8 ragged rows == one process
    with all 8 rows in one micro-batch: the same gradients (policy and value), loss, pg_loss and
    vf_loss. FSDP2 without LoRA also shards the frozen reference copy (each rank holds half of it),
    which computes the reference log-probs (hence the KL term) here."""
    from test_distributed import child_output, run_torchrun

    single, single_metrics = _pg_step_on_fixed_rows(dict(output_dir=str(tmp_path / "one"), use_lora=use_lora,
                                                         grad_accum_steps=1, loss_agg=loss_agg, fsdp=False))
    options = dict(output_dir=str(tmp_path), use_lora=use_lora, grad_accum_steps=2, loss_agg=loss_agg, fsdp=fsdp)
    result = run_torchrun([__file__, "pg_step", json.dumps(options)], timeout=300)
    assert result.returncode == 0, child_output(result)
    ranks = torch.load(tmp_path / "step.pt")
    assert sorted(ranks["grads"]) == sorted(single) and single
    for name, grad in single.items():
        torch.testing.assert_close(ranks["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key in ("loss", "pg_loss", "vf_loss", "kl"):
        assert ranks["metrics"][key] == pytest.approx(single_metrics[key], rel=1e-5, abs=1e-7), key
    if not use_lora:  # each rank holds half of the reference copy (sharded like the policy)
        assert ranks["metrics"]["reference_sharded"] == 1.0 and single_metrics["reference_sharded"] == 0.0
        assert ranks["metrics"]["reference_bytes"] <= 0.55 * single_metrics["reference_bytes"]



# --------------------------------------------------------------------------- 4. peak reductions


def test_adamw_is_fused_on_cuda_and_its_step_holds_no_copy_of_the_parameters(tok, tmp_path, monkeypatch):
    """On CUDA the trainers' AdamW is fused: its step makes no temporaries of the trained parameters'
    size (for-each AdamW, torch's CUDA default, made one full copy: full fine-tuning's peak). Checked
    on the simulated CUDA step of full fine-tuning, against the same step with for-each AdamW; on
    the CPU the default implementation stays."""
    import fastrlhf.trainers.base as base
    from fastrlhf.planner.simulate import simulate
    from fastrlhf.planner.steps import StepSpec
    from fastrlhf.trainers.sft import SFTConfig, SFTTrainer

    trainer = SFTTrainer(make_model(tok), tok, SFTConfig(output_dir=str(tmp_path), progress=False), SFT_RECORDS)
    assert not trainer.optimizer.defaults.get("fused")
    config = tiny_llama(vocab_size=len(tok), hidden_size=64, tie=True).config
    spec = StepSpec("sft", setup="full", batch_size=2, seq_len=32, dtype="bf16")

    def made_in_optimizer_step():
        prediction = simulate(spec, config)
        step = prediction.phase_peaks()["optimizer step"]
        return prediction.static["parameters"], sum(
            v for (category, _, phase), v in step.parts.items() if category == "temporaries" and phase == "optimizer step")

    parameters, fused = made_in_optimizer_step()
    monkeypatch.setattr(base, "make_optimizer", lambda params, **kw: torch.optim.AdamW(params, **kw))
    _, for_each = made_in_optimizer_step()
    assert for_each >= 0.9 * parameters and fused < 0.1 * for_each, (parameters, fused, for_each)


def test_planner_counts_the_fsdp_reference_copy_as_sharded_unless_on_the_cpu():
    """--fsdp --no-lora shards the reference copy (`RoleModel.shard_reference_copy`; the two-rank
    test above checks the real bytes), so the planner divides it by the FSDP degree, except for a
    copy kept on the CPU (`reference_device="cpu"`), which stays whole."""
    from fastrlhf.planner.simulate import Prediction
    from fastrlhf.planner.steps import StepSpec

    part = ("parameters", "reference", "step setup")
    assert Prediction(StepSpec("ppo", setup="full"), "m", 2, "cuda")._sharded(part)
    assert not Prediction(StepSpec("ppo", setup="full", reference_device="cpu"), "m", 2, "cuda")._sharded(part)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    {"pg_step": _scenario_pg_step}[sys.argv[1]](*sys.argv[2:])
