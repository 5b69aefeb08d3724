"""Trainers on a tiny random Llama (CPU, torch backend): each learns a toy, plus the shared machinery
(config checks, metrics, checkpoints, exact resume, Ctrl-C, memory of the shared base)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import fastrlhf
from fastrlhf.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _torch_backend_one_thread():
    # conftest turns on the (slow) Triton interpreter; trainers are tested on the torch twins.
    # One thread: tiny matmuls on a shared 2-core machine are many times faster without thread contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fastrlhf.use_backend("torch"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_model(tok, roles=("policy",), *, init_seed=0, lm_head_scale=10.0, **kwargs):
    """A tiny random Llama wrapped in a RoleModel. The random lm_head is scaled up so that the frozen
    head can express confident predictions (a random init at std 0.02 caps the logits near 0, and the
    LoRA adapters alone could then hardly lower the loss)."""
    from fastrlhf.roles import RoleModel

    base = tiny_llama(vocab_size=len(tok), hidden_size=32, seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(lm_head_scale)
    torch.manual_seed(init_seed)  # LoRA / head init
    kwargs.setdefault("lora_r", 8)
    return RoleModel(base, roles=roles, **kwargs)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir, key="loss") -> list[float]:
    return [r[key] for r in read_metrics(output_dir) if key in r]


SFT_RECORDS = [
    {"prompt": "say red", "completion": "red red red"},
    {"prompt": "say blue", "completion": "blue cat"},
    {"prompt": "count to three", "completion": "one two three"},
] * 2


def sft_config(tmp_path, **overrides):
    from fastrlhf.trainers.sft import SFTConfig

    options = dict(output_dir=str(tmp_path / "sft"), learning_rate=1e-2, batch_size=6, max_steps=12,
                   lr_schedule="constant", progress=False, backend="torch")
    options.update(overrides)
    return SFTConfig(**options)


# --------------------------------------------------------------------------- SFT + shared machinery


def test_sft_loss_falls_and_writes_metrics_and_model(tok, tmp_path):
    from fastrlhf.trainers.sft import SFTTrainer

    config = sft_config(tmp_path, save_steps=5)
    summary = SFTTrainer(make_model(tok), tok, config, SFT_RECORDS).train()
    losses = train_losses(config.output_dir)
    assert len(losses) == 12  # one line per optimizer step
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    records = read_metrics(config.output_dir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"lr", "grad_norm", "skipped", "epoch", "elapsed_s"} <= set(records[0])
    out = Path(config.output_dir)
    assert (out / "checkpoint-5" / "COMPLETE").is_file() and (out / "checkpoint-10").is_dir()
    assert (out / "role-policy.safetensors").is_file() and (out / "memory_report.json").is_file()
    assert summary["steps"] == 12 and summary["seconds"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["memory_report"]["policy"]["trainable_bytes"] > 0
    assert summary["metrics"]["loss"] == losses[-1]


def test_grad_accumulation_matches_big_batch(tok, tmp_path):
    """batch 6 == batch 2 x 3 accumulation, although micro-batches hold different token counts."""
    from fastrlhf.trainers.sft import SFTTrainer

    finals = []
    for name, bs, accum in (("big", 6, 1), ("accum", 2, 3)):
        model = make_model(tok)
        config = sft_config(tmp_path / name, batch_size=bs, grad_accum_steps=accum, max_steps=3)
        SFTTrainer(model, tok, config, SFT_RECORDS).train()
        finals.append((train_losses(config.output_dir), model.trainable_parameters("policy")))
    (losses_a, params_a), (losses_b, params_b) = finals
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "option, value",
    [("learning_rate", 0.0), ("batch_size", 0), ("lr_schedule", "cosine_restarts"), ("grad_accum_steps", 0),
     ("warmup_ratio", 1.0), ("max_length", 1), ("loss_agg", "sum"), ("bf16", "maybe"), ("backend", "cuda")],
)
def test_bad_config_value_names_the_option(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        sft_config(tmp_path, **{option: value})


def test_bad_data_and_mutated_config_fail_before_training(tok, tmp_path):
    from fastrlhf.trainers.sft import SFTTrainer

    model = make_model(tok)
    with pytest.raises(ValueError, match="empty|no record"):
        SFTTrainer(model, tok, sft_config(tmp_path), [])
    with pytest.raises(ValueError, match="completion"):
        SFTTrainer(model, tok, sft_config(tmp_path), [{"prompt": "hi"}])
    config = sft_config(tmp_path)
    config.learning_rate = -1.0  # changed after construction: still caught by the trainer
    with pytest.raises(ValueError, match="learning_rate"):
        SFTTrainer(model, tok, config, SFT_RECORDS)
    assert not (tmp_path / "sft" / "metrics.jsonl").exists()


def test_ctrl_c_saves_and_resume_matches_uninterrupted_run(tok, tmp_path):
    from fastrlhf.trainers.sft import SFTTrainer

    # cosine schedule + 2 epochs of 3 batches: LR, data order and Adam state must all resume exactly
    common = dict(batch_size=2, max_steps=0, epochs=2, lr_schedule="cosine", warmup_ratio=0.2)
    full = sft_config(tmp_path / "full", **common)
    SFTTrainer(make_model(tok), tok, full, SFT_RECORDS).train()
    expected = train_losses(full.output_dir)
    assert len(expected) == 6

    # 1) a real Ctrl-C (SIGINT) during step 3: the step finishes, checkpoint-3 is saved, then KeyboardInterrupt
    # 2) an interrupt raised inside step 5 (as a second Ctrl-C would): checkpoint-4, the half step discarded
    cut = sft_config(tmp_path / "cut", **common)
    for attempt, (signal_at, raise_at, saved) in enumerate(((2, None, 3), (None, 4, 4))):
        # the same init as the full run; a resumed run gets its adapters from the checkpoint instead
        trainer = SFTTrainer(make_model(tok, init_seed=attempt), tok, cut, SFT_RECORDS)
        original = trainer.training_step

        def step_with_interrupt():
            if trainer.step == signal_at:
                os.kill(os.getpid(), signal.SIGINT)
            if trainer.step == raise_at:
                trainer.next_batches(1)  # consume data, as a real half-done step would
                raise KeyboardInterrupt
            return original()

        trainer.training_step = step_with_interrupt
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        assert (Path(cut.output_dir) / f"checkpoint-{saved}" / "COMPLETE").is_file()
        cut.resume = "auto"

    # adapter weights come from the checkpoint, not from the (different) init
    SFTTrainer(make_model(tok, init_seed=2), tok, cut, SFT_RECORDS).train()
    assert train_losses(cut.output_dir) == expected  # bit-exact on CPU fp32


# --------------------------------------------------------------------------- reward model and DPO

PROMPTS = ["say a word", "answer the question", "what is the sun", "say hello", "count to two", "which city"]
# chosen completions contain "good", rejected ones do not: a rule a reward model / DPO can pick up
PREFERENCE_RECORDS = [
    {"prompt": p, "chosen": f"good {w}", "rejected": f"bad {w}"}
    for p, w in zip(PROMPTS, ["cat", "dog", "sun", "moon", "fish", "bird"])
]


def test_reward_model_learns_preference_and_reports_eval_accuracy(tok, tmp_path):
    from fastrlhf.trainers.rm import RewardConfig, RewardTrainer

    config = RewardConfig(output_dir=str(tmp_path / "rm"), learning_rate=2e-2, batch_size=6, max_steps=15,
                          lr_schedule="constant", progress=False, center_coef=0.01, eval_steps=5)
    model = make_model(tok, roles=("reward",))
    summary = RewardTrainer(model, tok, config, PREFERENCE_RECORDS, eval_records=PREFERENCE_RECORDS[:4]).train()
    records = [r for r in read_metrics(config.output_dir) if "loss" in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[0]["accuracy"] <= 0.7 and records[-1]["accuracy"] == 1.0
    assert summary["eval"]["eval/accuracy"] == 1.0
    evals = [r for r in read_metrics(config.output_dir) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [5, 10, 15]


def test_reward_margin_column_is_used(tok, tmp_path):
    from fastrlhf.trainers.rm import RewardConfig, RewardTrainer

    records = [dict(r, margin=3.0) for r in PREFERENCE_RECORDS]
    config = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=6, progress=False)
    trainer = RewardTrainer(make_model(tok, roles=("reward",)), tok, config, records)
    batch = trainer.collate(trainer.train_examples)
    assert batch["margin"].tolist() == [3.0] * 6
    loss_with, _ = trainer.compute_loss(batch)
    loss_without, _ = trainer.compute_loss({k: v for k, v in batch.items() if k != "margin"})
    assert loss_with > loss_without  # rewards start near 0: a margin of 3 must be paid for


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_raises_reward_accuracy(tok, tmp_path, loss_type):
    from fastrlhf.trainers.dpo import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=1e-2, batch_size=6, max_steps=10,
                       lr_schedule="constant", progress=False, loss_type=loss_type, beta=0.5)
    DPOTrainer(make_model(tok), tok, config, PREFERENCE_RECORDS).train()
    records = read_metrics(config.output_dir)
    assert records[-1]["loss"] < records[0]["loss"]
    if loss_type != "simpo":  # reference-free simpo: rewards are beta * logp, not 0 at the start
        assert records[0]["rewards/accuracies"] == 0.0  # policy == reference at step 1: every margin is 0
    assert records[-1]["rewards/accuracies"] == 1.0 and records[-1]["rewards/margins"] > 0


def test_dpo_without_lora_precomputes_reference_once(tok, tmp_path):
    from fastrlhf.trainers.dpo import DPOConfig, DPOTrainer

    model = make_model(tok, use_lora=False, with_reference=False)  # no reference copy at all
    config = DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=1e-3, batch_size=3, max_steps=4,
                       lr_schedule="constant", progress=False, save_steps=2)
    trainer = DPOTrainer(model, tok, config, PREFERENCE_RECORDS)
    trainer.train()
    assert all("ref_chosen_logps" in e for e in trainer.train_examples)
    records = read_metrics(config.output_dir)
    assert records[-1]["rewards/margins"] > 0
    # the precomputed reference travels with the checkpoint, so a resumed run does not need the reference
    resumed = DPOTrainer(make_model(tok, use_lora=False, with_reference=False), tok,
                         DPOConfig(**{**config.to_dict(), "resume": str(Path(config.output_dir) / "checkpoint-2")}),
                         PREFERENCE_RECORDS)
    resumed.train()
    assert train_losses(config.output_dir) == pytest.approx([r["loss"] for r in records], rel=1e-5)


# --------------------------------------------------------------------------- PPO and GRPO

PROMPT_RECORDS = [{"prompt": p} for p in PROMPTS + ["say yes", "hi"]]


def frequent_token_reward(tok, model, n_tokens=3):
    """reward_fn: +1 per occurrence of a few given token ids in the completion. They are the ones the
    initial policy samples most often, so the signal is there from the first iteration on."""
    from collections import Counter

    from fastrlhf.data import tokenize_prompts
    from fastrlhf.trainers.rollout import HFGenerateEngine

    prompts = [e["input_ids"] for e in tokenize_prompts(PROMPT_RECORDS, tok, max_prompt_length=32)]
    engine = HFGenerateEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        counts = Counter(t for row in engine.generate(prompts * 4) for t in row if t not in tok.all_special_ids)
    words = {tok.convert_ids_to_tokens(t) for t, _ in counts.most_common(n_tokens)}

    def reward_fn(prompts, completions, records):
        assert len(prompts) == len(completions) == len(records) and "prompt" in records[0]
        return [float(sum(w in words for w in text.split())) for text in completions]

    return reward_fn


def pg_options(tmp_path, name, **overrides):
    options = dict(output_dir=str(tmp_path / name), learning_rate=1e-2, batch_size=8, max_steps=12,
                   max_new_tokens=8, lr_schedule="constant", progress=False)
    options.update(overrides)
    return options


def test_ppo_raises_rule_based_reward(tok, tmp_path):
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    model = make_model(tok, roles=("policy", "value"))
    config = PPOConfig(**pg_options(tmp_path, "ppo", ppo_epochs=2, num_minibatches=2, kl_coef=0.01))
    PPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=frequent_token_reward(tok, model)).train()
    records = read_metrics(config.output_dir)
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 1.0, scores
    for key in ("objective/kl", "entropy", "clipfrac", "approx_kl", "completions/mean_length", "vf_loss", "kl_coef"):
        assert key in records[-1]
    assert records[-1]["objective/kl"] > 0  # the policy moved away from the reference


def test_grpo_raises_rule_based_reward(tok, tmp_path):
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer

    model = make_model(tok, roles=("policy",))
    config = GRPOConfig(**pg_options(tmp_path, "grpo", batch_size=4, group_size=4, kl_coef=0.01, ppo_epochs=2, num_minibatches=2))
    summary = GRPOTrainer(model, tok, config, PROMPT_RECORDS, eval_records=PROMPT_RECORDS[:4],
                          reward_fn=frequent_token_reward(tok, model)).train()
    records = [r for r in read_metrics(config.output_dir) if "reward" in r]
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 1.0, rewards
    assert records[-1]["kl"] > 0 and "reward_std" in records[-1]
    assert max(r["approx_kl"] for r in records) > 0  # 2 epochs x 2 minibatches: later steps are off-policy
    assert summary["eval"]["eval/score"] > rewards[0] and summary["eval"]["eval/kl"] > 0


@pytest.mark.parametrize("options", [
    dict(loss_type="gspo"),
    dict(loss_type="cispo", clip_eps=1.0, clip_eps_high=1.0),
    dict(loss_type="sapo"),
    dict(advantage_estimator="rloo"),
    dict(advantage_estimator="dr_grpo", loss_agg="seq-mean-token-sum-norm"),
    dict(advantage_estimator="reinforce_plus_plus"),
    dict(advantage_estimator="reinforce_plus_plus_baseline"),
    dict(is_correction="token_truncate"),
    dict(is_correction="sequence_mask", is_clip_min=0.5, is_clip_max=2.0),
    dict(top_entropy_quantile=0.5),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_grpo_objectives_raise_rule_based_reward(tok, tmp_path, options):
    """Issue 11: every objective, estimator and correction the trainer offers learns the toy task
    (the criterion of test_grpo_raises_rule_based_reward)."""
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer

    model = make_model(tok, roles=("policy",))
    config = GRPOConfig(**pg_options(tmp_path, "grpo", batch_size=4, group_size=4, kl_coef=0.01, ppo_epochs=2,
                                     num_minibatches=2, **options))
    GRPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=frequent_token_reward(tok, model)).train()
    records = [r for r in read_metrics(config.output_dir) if "reward" in r]
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 1.0, rewards
    if "is_correction" in options:
        # HF generate's sampling log-probs vs the trainer's forward: the same policy, a tiny mismatch
        assert 0.9 < records[0]["is_weight_mean"] < 1.1, records[0]
    if "top_entropy_quantile" in options:
        assert 0.3 < records[0]["entropy_kept_frac"] < 0.7, records[0]


def test_ppo_with_gspo_and_tis_raises_rule_based_reward(tok, tmp_path):
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    model = make_model(tok, roles=("policy", "value"))
    config = PPOConfig(**pg_options(tmp_path, "ppo", ppo_epochs=2, num_minibatches=2, kl_coef=0.01, loss_type="gspo",
                                    is_correction="token_truncate"))
    PPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=frequent_token_reward(tok, model)).train()
    records = read_metrics(config.output_dir)
    scores = [r["objective/scores"] for r in records]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 1.0, scores
    assert "is_weight_mean" in records[-1]


def test_is_correction_needs_an_engine_with_logprobs(tok, tmp_path):
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer
    from fastrlhf.trainers.rollout import HFGenerateEngine

    model = make_model(tok, roles=("policy",))
    engine = HFGenerateEngine(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=4)
    config = GRPOConfig(**pg_options(tmp_path, "x", is_correction="token_mask"))
    with pytest.raises(ValueError, match="generate_with_logprobs"):
        GRPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=lambda p, c, r: [0.0] * len(c),
                    rollout_engine=engine)


def test_ppo_with_reward_role_kl_in_loss_and_exact_resume(tok, tmp_path):
    """Reward from the (frozen) reward role, KL in the loss, adaptive KL: a run resumed from its
    checkpoint repeats the uninterrupted run's iterations exactly (sampling RNG, KL state, Adam)."""
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    def run(name, resume=""):
        model = make_model(tok, roles=("policy", "value", "reward"), trainable_roles=("policy", "value"))
        config = PPOConfig(**pg_options(tmp_path, name, batch_size=4, max_steps=4, save_steps=2, kl_in_reward=False,
                                        adaptive_kl=True, kl_target=0.5, kl_horizon=100, resume=resume))
        trainer = PPOTrainer(model, tok, config, PROMPT_RECORDS)
        trainer.train()
        return trainer, read_metrics(config.output_dir)

    trainer, full = run("full")
    assert [r["kl_coef"] for r in full][-1] != pytest.approx(0.05)  # the adaptive controller moved
    assert "kl" in full[-1]  # KL is part of the loss
    state = torch.load(Path(trainer.config.output_dir) / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["kl_controller"]["value"] == pytest.approx(full[2]["kl_coef"])

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil

    shutil.copytree(Path(trainer.config.output_dir) / "checkpoint-2", resumed_dir / "checkpoint-2")
    _, resumed = run("resumed", resume="auto")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == b["loss"] and a["objective/scores"] == b["objective/scores"]


def record_ppo_loss_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every policy loss call, fastrlhf.ppo_loss or the fused head's
    fastrlhf.policy_loss_from_hidden (the real loss still runs)."""
    calls = []

    def recording(real):
        def record(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)
        return record

    for name in ("ppo_loss", "policy_loss_from_hidden"):
        monkeypatch.setattr(fastrlhf, name, recording(getattr(fastrlhf, name)))
    return calls


@pytest.mark.parametrize("clip_eps_high, dual_clip", [(None, None), (0.28, 3.0)])
def test_clip_options_reach_the_policy_loss_as_they_are(tok, tmp_path, monkeypatch, clip_eps_high, dual_clip):
    """None in the config is None in the loss (its own default: clip_eps_high = clip_eps, no dual clip)."""
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer

    calls = record_ppo_loss_calls(monkeypatch)
    model = make_model(tok)
    config = GRPOConfig(**pg_options(tmp_path, "grpo", batch_size=2, group_size=2, max_steps=1, max_new_tokens=4,
                                     clip_eps_high=clip_eps_high, dual_clip=dual_clip))
    GRPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=lambda p, c, r: [float(len(x)) for x in c]).train()
    assert calls and all(c["clip_eps_high"] == clip_eps_high and c["dual_clip"] == dual_clip for c in calls)
    assert ("dual_clipfrac" in read_metrics(config.output_dir)[0]) == (dual_clip is not None)


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_ppo_kl_coefficient_of_the_loss_is_the_controllers(tok, tmp_path, monkeypatch, kl_in_reward):
    """One holder of the KL coefficient: with kl_in_reward the loss gets no KL term; without, each
    iteration's loss weight is the (adaptive) coefficient that iteration logs as kl_coef."""
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    calls = record_ppo_loss_calls(monkeypatch)
    model = make_model(tok, roles=("policy", "value"))
    config = PPOConfig(**pg_options(tmp_path, "ppo", batch_size=2, max_steps=3, max_new_tokens=4, ppo_epochs=1,
                                    kl_in_reward=kl_in_reward, adaptive_kl=True, kl_target=0.01, kl_horizon=10.0))
    PPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=lambda p, c, r: [float(len(x)) for x in c]).train()
    logged = [r["kl_coef"] for r in read_metrics(config.output_dir)]
    assert len(calls) == len(logged) == 3 and len(set(logged)) == 3  # one update per iteration; beta moved
    for call, beta in zip(calls, logged):
        if kl_in_reward:
            assert call["kl_coef"] == 0.0 and call["ref_logps"] is None
        else:
            assert call["kl_coef"] == pytest.approx(beta, rel=1e-6) and call["ref_logps"] is not None


def test_ppo_shares_one_base_across_four_roles(tok, tmp_path):
    """Policy, reference, value and reward all run on ONE copy of the base weights; params + optimizer
    state of the 4-role PPO model stay below 1.5x of the policy alone (4 separate models: ~4x)."""
    from fastrlhf.roles import RoleModel
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    # hidden 128 with LoRA r=2: each role's adapter is ~3% of the base, about what r=16 is on SmolLM2-135M
    base = tiny_llama(vocab_size=len(tok), hidden_size=128, intermediate_size=256)
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    model = RoleModel(base, roles=("policy", "value", "reward"), trainable_roles=("policy", "value"), lora_r=2)
    config = PPOConfig(**pg_options(tmp_path, "mem", batch_size=2, max_steps=1, max_new_tokens=4))
    summary = PPOTrainer(model, tok, config, PROMPT_RECORDS).train()

    params = list(model.parameters())
    frozen_base = [p for p in params if p.data_ptr() in base_ptrs]
    assert {p.data_ptr() for p in frozen_base} == base_ptrs  # the HF model's own tensors, not copies
    assert all(not p.requires_grad for p in frozen_base)
    others = [p for p in params if p.data_ptr() not in base_ptrs]
    base_bytes = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in frozen_base}.values())
    assert sum(p.numel() * p.element_size() for p in others) < 0.1 * base_bytes  # 3 adapters + 2 heads only

    report = summary["memory_report"]
    assert report["reference"]["params_bytes"] == 0 and report["base"]["params_bytes"] == base_bytes
    assert report["policy"]["optimizer_bytes"] > 0 and report["value"]["optimizer_bytes"] > 0
    policy_alone = report["base"]["params_bytes"] + report["policy"]["params_bytes"] + report["policy"]["optimizer_bytes"]
    four_separate = 4 * report["base"]["params_bytes"]
    assert report["total_bytes"] < 1.5 * policy_alone < four_separate


def test_policy_gradient_config_and_reward_checks(tok, tmp_path):
    from fastrlhf.trainers.grpo import GRPOConfig, GRPOTrainer
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    for option, value in (("group_size", 1), ("temperature", 0.0), ("kl_estimator", "k4"), ("top_p", 1.5)):
        with pytest.raises(ValueError, match=option):
            GRPOConfig(**pg_options(tmp_path, "x", **{option: value}))
    with pytest.raises(ValueError, match="lam"):
        PPOConfig(**pg_options(tmp_path, "x", lam=1.5))
    with pytest.raises(ValueError, match="reward"):  # neither reward_fn nor a reward role
        GRPOTrainer(make_model(tok), tok, GRPOConfig(**pg_options(tmp_path, "x")), PROMPT_RECORDS)
    with pytest.raises(ValueError, match="value"):  # PPO needs the value role
        PPOTrainer(make_model(tok), tok, PPOConfig(**pg_options(tmp_path, "x")), PROMPT_RECORDS,
                   reward_fn=lambda p, c, r: [0.0] * len(c))
    trainer = GRPOTrainer(make_model(tok), tok, GRPOConfig(**pg_options(tmp_path, "x", max_steps=1)),
                          PROMPT_RECORDS, reward_fn=lambda p, c, r: [1.0])
    with pytest.raises(ValueError, match="reward_fn must return"):
        trainer.train()


def test_ppo_full_finetuning_without_lora(tok, tmp_path):
    """--no-lora: the policy trains the whole base, the value head rides on its trunk (one forward for
    both), the reference is a frozen copy; the optimizer holds each shared parameter once."""
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer

    model = make_model(tok, roles=("policy", "value"), use_lora=False)
    reference_before = [p.clone() for p in model.reference_copy.parameters()]
    config = PPOConfig(**pg_options(tmp_path, "full", batch_size=4, max_steps=2, learning_rate=1e-3))
    trainer = PPOTrainer(model, tok, config, PROMPT_RECORDS, reward_fn=frequent_token_reward(tok, model))
    assert len({id(p) for p in trainer.params}) == len(trainer.params)
    trainer.train()
    assert read_metrics(config.output_dir)[-1]["objective/kl"] > 0
    for before, after in zip(reference_before, model.reference_copy.parameters()):
        assert torch.equal(before, after)  # the reference never trains
