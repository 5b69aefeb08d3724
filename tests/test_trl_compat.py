"""Issue 12: a TRL user's code and habits work. TRL-shaped trainer construction (model path, plain HF
model), TRL's config and option names, reward functions with TRL's calling convention and weights,
a Hugging Face reward model on another tokenizer, PEFT / transformers outputs loadable by peft and
transformers with equal outputs, merged models in the base dtype, callbacks, report_to, sample
completions, generation progress and the Ctrl-C message. Tiny models, CPU, torch backend."""
from __future__ import annotations

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

import fastrlhf
from fastrlhf.testing import save_tiny_model, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True)
def _torch_backend_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fastrlhf.use_backend("torch"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


SFT = [{"prompt": "say yes", "completion": "yes"}, {"prompt": "what is the sun ?", "completion": "the sun is big ."}]
PAIRS = [{"prompt": "say yes", "chosen": "yes", "rejected": "no no"},
         {"prompt": "the cat is", "chosen": "small .", "rejected": "the dog"}]
UNPAIRED = [{"prompt": "say yes", "completion": "yes", "label": True},
            {"prompt": "say yes", "completion": "no no", "label": False},
            {"prompt": "say no", "completion": "no", "label": True},
            {"prompt": "say no", "completion": "yes yes", "label": False}]
PROMPTS = [{"prompt": "say yes", "answer": "yes"}, {"prompt": "say no", "answer": "no"},
           {"prompt": "what is the sun ?", "answer": "big"}, {"prompt": "the cat is", "answer": "small"}]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def text_of(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]  # conversational


def count_words(completions, **kwargs):
    return [float(len(text_of(c).split())) for c in completions]


def says_answer(prompts, completions, answer, **kwargs):
    return [float(a in text_of(c).split()) for c, a in zip(completions, answer)]


# --------------------------------------------------------------------------- configs: TRL's names


def test_configs_take_trl_field_names_and_values():
    from fastrlhf.trainers import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

    dpo = DPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=3.0, max_steps=-1,
                    lr_scheduler_type="constant_with_warmup", bf16=True, report_to="none",
                    precompute_ref_log_probs=True, max_prompt_length=64)
    assert (dpo.batch_size, dpo.grad_accum_steps, dpo.epochs, dpo.max_steps) == (4, 2, 3, 0)
    assert (dpo.lr_schedule, dpo.bf16, dpo.report_to, dpo.precompute_ref_logps) == ("constant", "true", "none", True)
    grpo = GRPOConfig(num_generations=8, beta=0.0, max_completion_length=32, epsilon=0.3, epsilon_high=0.28,
                      num_iterations=2, loss_type="dr_grpo", importance_sampling_level="token",
                      reward_weights=[1, 0.5], log_completions=True, scale_rewards="none")
    assert (grpo.group_size, grpo.kl_coef, grpo.max_new_tokens, grpo.clip_eps, grpo.clip_eps_high, grpo.ppo_epochs) == \
        (8, 0.0, 32, 0.3, 0.28, 2)
    assert (grpo.loss_type, grpo.loss_agg, grpo.reward_weights, grpo.log_completions_steps, grpo.scale_rewards) == \
        ("ppo", "seq-mean-token-sum-norm", [1.0, 0.5], 1, False)
    assert GRPOConfig(importance_sampling_level="sequence").loss_type == "gspo"
    ppo = PPOConfig(num_ppo_epochs=2, num_mini_batches=2, cliprange=0.1, cliprange_value=0.3, response_length=16)
    assert (ppo.ppo_epochs, ppo.num_minibatches, ppo.clip_eps, ppo.value_clip_eps, ppo.max_new_tokens) == (2, 2, 0.1, 0.3, 16)
    assert RewardConfig(center_rewards_coefficient=0.01).center_coef == 0.01
    assert SFTConfig(max_seq_length=64, disable_tqdm=True).max_length == 64
    with pytest.raises(TypeError, match="optim.*AdamW"):
        SFTConfig(optim="adamw_torch_fused")
    with pytest.raises(TypeError, match="num_generations.*group_size"):
        GRPOConfig(num_generations=4, group_size=4)
    with pytest.raises(ValueError, match="report_to"):
        SFTConfig(report_to="mlflow")
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOConfig(reward_weights=["x"])


def test_report_to_wandb_without_the_package_fails_at_the_config(monkeypatch):
    import importlib.util

    from fastrlhf.trainers import SFTConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        SFTConfig(report_to=["wandb"])
    assert SFTConfig(report_to="all").report_to == "tensorboard"  # all = the installed ones


def test_readme_mapping_table_is_generated_from_the_code():
    from fastrlhf.trl_compat import mapping_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert mapping_table() in readme


# --------------------------------------------------------------------------- CLI: TRL's option names


def parse(argv):
    from fastrlhf.cli import build_parser, parse_args
    from fastrlhf.train import commands

    return parse_args(build_parser(commands()), argv, default_command="pipeline")


def test_cli_takes_trl_option_names_underscores_and_flags(tmp_path):
    from fastrlhf.trainers import DPOConfig, GRPOConfig

    _, options = parse(["grpo", "--per_device_train_batch_size", "2", "--num-generations", "4", "--beta", "0.02",
                        "--max-completion-length", "16", "--num-train-epochs", "2", "--bf16", "--report-to", "none",
                        "--gradient-accumulation-steps", "2", "--reward-weights", "1", "0.5"])
    cfg = options[GRPOConfig]
    assert (cfg.batch_size, cfg.group_size, cfg.kl_coef, cfg.max_new_tokens, cfg.epochs, cfg.bf16, cfg.report_to,
            cfg.grad_accum_steps, cfg.reward_weights) == (1, 4, 0.02, 16, 2, "true", "none", 2, [1.0, 0.5])
    assert cfg.per_device_train_batch_size == 2  # TRL's unit: completions; 2 x 2 accumulated / 4 per prompt = 1 prompt
    _, options = parse(["dpo", "--beta", "0.3", "--max-prompt-length", "32", "--bf16", "false"])
    assert options[DPOConfig].beta == 0.3 and options[DPOConfig].max_prompt_length == 32
    assert options[DPOConfig].bf16 == "false"
    config = tmp_path / "grpo.yaml"
    config.write_text("num_generations: 6\nper_device_train_batch_size: 12\nreward_weights: [2, 1]\n")
    _, options = parse(["grpo", "--config", str(config)])
    assert (options[GRPOConfig].group_size, options[GRPOConfig].batch_size, options[GRPOConfig].reward_weights) == (6, 2, [2.0, 1.0])
    _, options = parse(["sft", "--per-device-train-batch-size", "3"])  # SFT/RM/DPO: a plain rename of batch_size
    from fastrlhf.trainers import SFTConfig

    assert options[SFTConfig].batch_size == 3
    with pytest.raises(ValueError, match="multiple of the 4 samples per prompt"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)


@pytest.mark.parametrize("argv, message", [
    # the two suggestions that pointed at the wrong option (--eval-batch-size, --max-prompt-length)
    (["grpo", "--per-device-train-batchsize", "4"], "did you mean --per-device-train-batch-size?"),
    (["grpo", "--max-completion-lenght", "4"], "did you mean --max-completion-length?"),
    (["sft", "--gradient-accumulation-step", "2"], "did you mean --gradient-accumulation-steps?"),
    (["sft", "--per-device-train-batch-size", "x"], "argument --per-device-train-batch-size: invalid int value: 'x'"),
])
def test_cli_errors_name_what_was_typed(argv, message, capsys):
    from fastrlhf.train import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------- TRL-shaped construction

TRAINERS = {
    "sft": ("SFTTrainer", "SFTConfig", SFT, {}),
    "rm": ("RewardTrainer", "RewardConfig", PAIRS, {}),
    "dpo": ("DPOTrainer", "DPOConfig", PAIRS, {}),
    "kto": ("KTOTrainer", "KTOConfig", UNPAIRED, {}),
    "ppo": ("PPOTrainer", "PPOConfig", PROMPTS, {"reward_funcs": [count_words], "response_length": 4}),
    "grpo": ("GRPOTrainer", "GRPOConfig", PROMPTS, {"reward_funcs": count_words, "num_generations": 2,
                                                     "max_completion_length": 4}),
}


def build(name, model, tmp_path, tok=None, **extra):
    from fastrlhf import trainers

    trainer_name, config_name, data, options = TRAINERS[name]
    options = dict(options)
    reward = {k: options.pop(k) for k in ("reward_funcs",) if k in options}
    args = getattr(trainers, config_name)(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=1,
                                          disable_tqdm=True, report_to="none", **options)
    kwargs = {"processing_class": tok} if tok is not None else {}
    return getattr(trainers, trainer_name)(model=model, args=args, train_dataset=data, **reward, **kwargs, **extra)


@pytest.mark.parametrize("name", list(TRAINERS))
def test_trl_shaped_construction_from_a_path_and_from_a_plain_model(name, tiny, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = build(name, tiny, tmp_path / "path")
    summary = trainer.train()
    assert summary["steps"] == 1
    assert set(trainer.trained_roles) <= set(trainer.model.roles)
    plain = AutoModelForCausalLM.from_pretrained(tiny)
    trainer = build(name, plain, tmp_path / "plain", tok=tok)
    assert trainer.model.causal_lm is plain  # wrapped in place: one copy of the weights
    assert trainer.train()["steps"] == 1


def test_sft_on_text_records_with_packing(tiny, tmp_path):
    from fastrlhf.trainers import SFTConfig, SFTTrainer

    texts = [{"text": "the cat is big . the dog is small ."}, {"text": "say yes or no ."}] * 4
    args = SFTConfig(output_dir=str(tmp_path / "sft"), packing=True, max_length=8, per_device_train_batch_size=2,
                     max_steps=2, disable_tqdm=True, report_to="none")
    trainer = SFTTrainer(model=tiny, args=args, train_dataset=texts)
    assert all(len(e["input_ids"]) == 8 for e in trainer.train_examples[:-1])  # full rows, no padding
    assert sum(len(e["input_ids"]) for e in trainer.train_examples) >= 8 * (len(trainer.train_examples) - 1)
    assert trainer.train()["steps"] == 2


def test_peft_config_and_what_cannot_work(tiny, tok, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trainer = build("sft", tiny, tmp_path, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.model.lora_settings["lora_r"] == 4
    assert trainer.model.lora_settings["lora_target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="DoRA"):
        build("sft", tiny, tmp_path, peft_config=LoraConfig(r=4, use_dora=True))
    with pytest.raises(ValueError, match="ref_model"):
        build("dpo", tiny, tmp_path, ref_model=AutoModelForCausalLM.from_pretrained(tiny))
    with pytest.raises(ValueError, match="RewardTrainer takes a causal LM"):
        build("rm", AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1), tmp_path, tok=tok)
    with pytest.raises(ValueError, match="processing_class"):
        build("sft", tiny_llama(vocab_size=len(tok)), tmp_path)
    with pytest.raises(ValueError, match="fastrlhf's SFTConfig"):
        from fastrlhf.trainers import SFTTrainer

        SFTTrainer(model=tiny, args=types.SimpleNamespace(output_dir="x"), train_dataset=SFT)


# --------------------------------------------------------------------------- rewards


def test_reward_functions_trl_convention_weights_and_conversational_completions():
    from fastrlhf.rewards import RewardFunctions

    seen = {}

    def spy(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, kwargs=kwargs)
        return [None, 2.0]

    rewards = RewardFunctions([count_words, says_answer, spy], weights=[1.0, 0.5, 10.0])
    records = [{"prompt": [{"role": "user", "content": "say yes"}], "answer": "yes", "level": 1},
               {"prompt": [{"role": "user", "content": "say no"}], "answer": "no", "level": 2}]
    scores = rewards(["rendered 1", "rendered 2"], ["yes yes", "maybe"], records)
    assert scores == [2.0 + 0.5 * 1.0, 1.0 + 0.0 + 10.0 * 2.0]  # None is skipped in the sum
    assert seen["prompts"] == [r["prompt"] for r in records]  # the records' prompts, as messages
    assert seen["completions"] == [[{"role": "assistant", "content": "yes yes"}], [{"role": "assistant", "content": "maybe"}]]
    assert seen["answer"] == ["yes", "no"] and seen["kwargs"] == {"level": [1, 2]}
    # per-function metrics: the last call's table under short unique names; None left out of mean/std
    from fastrlhf.trainers._policy_gradient import _reward_term_metrics

    assert rewards.metric_names == ["count_words", "says_answer", "spy"]
    spy_metrics = _reward_term_metrics("spy", torch.tensor(rewards.last_scores[2]))
    assert spy_metrics == {"rewards/spy/mean": 2.0, "rewards/spy/std": 0.0}
    nothing = _reward_term_metrics("x", torch.tensor([float("nan")] * 3))
    assert nothing == {"rewards/x/mean": 0.0, "rewards/x/std": 0.0}
    from fastrlhf.rewards import _metric_names

    names = ["count_words", "count_words", "/models/my-rm/", "reward model org/rm"]
    assert _metric_names(names) == ["count_words", "count_words_2", "my-rm", "rm"]

    def legacy(prompts, completions, records):  # fastrlhf's positional convention still works
        return [float(len(records))] * len(completions)

    assert RewardFunctions(legacy)(["p"], ["c"], [{"prompt": "p"}]) == [1.0]
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2"):
        RewardFunctions([count_words, says_answer], weights=[1.0])


def test_bad_reward_function_fails_before_the_model_loads(tmp_path):
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    def needs_a_missing_column(completions, solution, **kwargs):
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "g"), report_to="none")
    # the model path does not exist: the error must be the reward's, found before any loading
    with pytest.raises(ValueError, match="needs_a_missing_column.*dry call.*solution"):
        GRPOTrainer(model=str(tmp_path / "no-model"), reward_funcs=[count_words, needs_a_missing_column], args=args,
                    train_dataset=PROMPTS)


def test_grpo_with_weighted_reward_functions_logs_the_weighted_sum(tiny, tmp_path):
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=6, max_steps=2, reward_weights=[1.0, 3.0], log_completions=True,
                      num_completions_to_print=4, disable_tqdm=True, report_to="none", temperature=2.0)
    GRPOTrainer(model=tiny, reward_funcs=[count_words, says_answer], args=args, train_dataset=PROMPTS).train()
    logged = read_jsonl(tmp_path / "g" / "metrics.jsonl")
    samples = read_jsonl(tmp_path / "g" / "completions.jsonl")
    assert [s["step"] for s in samples] == [1, 2]
    answers = {r["prompt"]: r["answer"] for r in PROMPTS}
    for entry, metrics in zip(samples, logged):
        expected = [count_words([s["completion"]])[0] + 3.0 * float(answers[s["prompt"]] in s["completion"].split())
                    for s in entry["samples"]]
        assert [s["reward"] for s in entry["samples"]] == pytest.approx(expected)
        assert metrics["reward"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
        # each function's own scores (TRL's keys), unweighted: all 4 completions of the step are in the samples
        words = torch.tensor([float(count_words([s["completion"]])[0]) for s in entry["samples"]])
        said = torch.tensor([float(answers[s["prompt"]] in s["completion"].split()) for s in entry["samples"]])
        for name, column in (("count_words", words), ("says_answer", said)):
            assert metrics[f"rewards/{name}/mean"] == pytest.approx(float(column.mean()), rel=1e-5, abs=1e-7)
            assert metrics[f"rewards/{name}/std"] == pytest.approx(float(column.std()), rel=1e-5, abs=1e-7)


def other_tokenizer():
    """A word-level tokenizer over the same words with other ids (reversed order) and no chat template:
    a reward model's vocabulary that is not the policy's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastrlhf.testing import TINY_WORDS

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in reversed(TINY_WORDS):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def hf_reward_model(tmp_path_factory):
    """A tiny LlamaForSequenceClassification with its own tokenizer, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = other_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("rm") / "hf-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


def test_hf_reward_model_on_another_tokenizer_is_retokenised(hf_reward_model, tiny, tok, tmp_path):
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    path, model, rm_tok = hf_reward_model
    assert rm_tok.convert_tokens_to_ids("yes") != tok.convert_tokens_to_ids("yes")
    args = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=5, max_steps=1, log_completions_steps=1, num_completions_to_print=4,
                      disable_tqdm=True, report_to="none")
    GRPOTrainer(model=tiny, reward_funcs=path, args=args, train_dataset=PROMPTS).train()
    (entry,) = read_jsonl(tmp_path / "g" / "completions.jsonl")
    for sample in entry["samples"]:
        # TRL's text for a string prompt: prompt + completion, in the reward model's own tokens
        ids = rm_tok(sample["prompt"] + sample["completion"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert sample["reward"] == pytest.approx(expected, abs=1e-5)


def test_cli_takes_hf_reward_model_and_several_reward_functions(hf_reward_model, tiny, tmp_path, capsys):
    from fastrlhf.train import main

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (tmp_path / "rewards.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
        "def answer(completions, answer, **kwargs):\n    return [float(a in c) for c, a in zip(completions, answer)]\n")
    fns = f"{tmp_path / 'rewards.py'}:length,{tmp_path / 'rewards.py'}:answer"
    with fastrlhf.use_backend("torch"):
        status = main(["grpo", "--model", tiny, "--data", str(tmp_path / "prompts.jsonl"), "--reward-fn", fns,
                       "--reward-model", hf_reward_model[0], "--reward-weights", "0.1,1,2", "--num-generations", "2",
                       "--max-completion-length", "4", "--per-device-train-batch-size", "2", "--max-steps", "1",
                       "--output-dir", str(tmp_path / "out"), "--no-save-merged", "--no-progress", "--report-to", "none"])
    assert status == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 1
    (tmp_path / "bad.py").write_text("def f(prompts, completions):\n    return [1.0]\n")  # returns one value for two
    with pytest.raises(SystemExit):
        main(["grpo", "--model", str(tmp_path / "not-loaded"), "--data", str(tmp_path / "prompts.jsonl"),
              "--reward-fn", f"{tmp_path / 'bad.py'}:f"])
    assert "--reward-fn: reward function" in capsys.readouterr().err


# --------------------------------------------------------------------------- outputs


def test_saved_adapters_and_reward_model_load_in_peft_and_transformers_with_equal_outputs(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fastrlhf.trainers import PPOConfig, PPOTrainer, RewardConfig, RewardTrainer

    ids = torch.tensor([[2, 40, 41, 42, 43, 44], [2, 50, 51, 52, 0, 0]])
    mask = (ids != 0).long()

    # policy (and value) adapters of a PPO run
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), per_device_train_batch_size=2, max_steps=2, response_length=4,
                     learning_rate=5e-2, disable_tqdm=True, report_to="none")
    trainer = PPOTrainer(model=tiny, reward_funcs=count_words, args=args, train_dataset=PROMPTS)
    trainer.train()
    out = tmp_path / "ppo"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "value_adapter" / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "role-policy.safetensors").is_file()  # fastrlhf's own files stay (resume, --reward-model)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out).eval()
    with torch.no_grad():
        logits = peft(input_ids=ids, attention_mask=mask).logits.float()
        expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
        ours = trainer.model.token_logprobs("policy", ids, mask)
        base = trainer.model.token_logprobs("reference", ids, mask)
    assert (ours - base).abs().max() > 1e-3  # the adapter is trained: the comparison is not base vs base
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    # the reward model as a transformers sequence classifier
    args = RewardConfig(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=2, max_steps=3, learning_rate=5e-2,
                        disable_tqdm=True, report_to="none")
    trainer = RewardTrainer(model=tiny, args=args, train_dataset=PAIRS)
    trainer.train()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        ours = trainer.model.rewards(ids, mask)
        theirs = classifier(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours.float(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "rm" / "reward_adapter" / "adapter_model.safetensors").is_file()


def test_merged_model_is_saved_in_the_base_dtype(tok, tmp_path, capsys):
    from fastrlhf.train import main

    base = tmp_path / "bf16"
    tiny_llama(vocab_size=len(tok), tie=True).to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT))
    with fastrlhf.use_backend("torch"):
        assert main(["sft", "--model", str(base), "--data", str(tmp_path / "sft.jsonl"), "--max-steps", "1",
                     "--output-dir", str(tmp_path / "out"), "--no-progress", "--report-to", "none"]) == 0
    from safetensors import safe_open

    merged = tmp_path / "out" / "merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # trained in fp32 on CPU
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"


def test_reward_adapter_of_another_base_is_refused_with_the_reason(tiny, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastrlhf.roles import RoleModel
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    other = tiny_llama(vocab_size=len(tok), tie=True, seed=5)  # same architecture, other weights
    RoleModel(other, roles=("reward",)).save(str(tmp_path / "rm"))  # fastrlhf's files only, no classifier export
    args = GRPOConfig(output_dir=str(tmp_path / "g"), report_to="none")
    with pytest.raises(ValueError, match="trained on another base model.*only scores correctly"):
        GRPOTrainer(model=tiny, reward_funcs=str(tmp_path / "rm"), args=args, train_dataset=PROMPTS)
    # on its own base it is the reward role
    own = tmp_path / "own"
    RoleModel(AutoModelForCausalLM.from_pretrained(tiny), roles=("reward",)).save(str(own))
    trainer = GRPOTrainer(model=tiny, reward_funcs=str(own), args=args, train_dataset=PROMPTS)
    assert "reward" in trainer.model.roles and trainer.reward_fn is None


# --------------------------------------------------------------------------- logging, callbacks, Ctrl-C


def test_callbacks_report_to_tensorboard_and_sample_completions(tiny, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            written.append(("scalar", key, step))

        def add_text(self, key, text, step):
            written.append(("text", key, step, text))

        def flush(self):
            pass

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))

    class StopAfterTwo(TrainerCallback):
        def __init__(self):
            self.events = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.events.append(("log", state.global_step, logs["step"]))

        def on_step_end(self, args, state, control, **kwargs):
            self.events.append(("step", state.global_step))
            control.should_training_stop = state.global_step >= 2

    callback = StopAfterTwo()
    args = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=4, max_steps=5, log_completions_steps=2, report_to="tensorboard",
                      disable_tqdm=True)
    summary = GRPOTrainer(model=tiny, reward_funcs=count_words, args=args, train_dataset=PROMPTS,
                          callbacks=[callback]).train()
    assert summary["steps"] == 2  # stopped by the callback
    assert callback.events == [("log", 1, 1), ("step", 1), ("log", 2, 2), ("step", 2)]
    assert ("scalar", "reward", 1) in written and ("closed",) in written
    texts = [w for w in written if w[0] == "text"]
    assert [t[2] for t in texts] == [2] and "| prompt | completion | reward |" in texts[0][3]


def test_generation_progress_and_ctrl_c_during_generation_says_what_it_does(tiny, tmp_path, capsys):
    from fastrlhf.trainers import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=6, max_steps=3, disable_tqdm=True, report_to="none")
    trainer = GRPOTrainer(model=tiny, reward_funcs=count_words, args=args, train_dataset=PROMPTS)
    shown = []
    original = trainer._show_generation_progress

    def progress(done, total):
        original(done, total)
        shown.append(trainer.metrics_log.activity())
        if trainer.step == 1 and done == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of generation

    trainer.engine.on_progress = progress
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert "generating 2 completions: 1/6 tokens" in shown
    err = capsys.readouterr().err
    assert "Ctrl-C: finishing this step (now: generating 2 completions: 2/6 tokens)" in err
    assert trainer.step == 2 and (tmp_path / "g" / "checkpoint-2" / "COMPLETE").is_file()
