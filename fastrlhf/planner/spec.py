"""What a simulated step is (`StepSpec`, `StepResult`) and the pieces every setup builds it from:
models of a config, batches of the planned shape, the optimizer choice. Shared by the fastrlhf
setups (`fastrlhf.planner.steps`) and the TRL-style ones (`fastrlhf.planner.trl_style`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastrlhf._checks import check_int
from fastrlhf.planner.counter import Snapshot

STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
SETUPS = ("shared-lora", "full", "separate", "trl-peft")
FASTRLHF_SETUPS = ("shared-lora", "full")
TRL_STAGES = ("ppo", "dpo")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
PAD_ID = 0


@dataclass
class StepSpec:
    """What one step looks like. Rows per micro-batch: SFT `batch_size` sequences, RM / DPO
    `batch_size` pairs (2 x batch_size rows), PPO `batch_size` prompts, GRPO `batch_size` prompts x
    `group_size` samples; PPO/GRPO rollout scoring runs on all of them, each optimizer step on
    rows / (num_minibatches x grad_accum_steps) per micro-batch."""

    stage: str
    setup: str = "shared-lora"
    batch_size: int = 8
    seq_len: int = 512              # SFT / RM / DPO: tokens per sequence; PPO / GRPO: prompt + response
    prompt_len: int = 256           # PPO / GRPO: the prompt part of seq_len
    checkpointing: bool = False
    dtype: str = "bf16"
    grad_accum_steps: int = 1
    num_minibatches: int = 1
    ppo_epochs: int = 1
    group_size: int = 4
    reward_model: bool = True       # PPO / GRPO: a reward role / model (True) or a reward function
    kl_coef: float | None = None    # None: the trainer's default
    entropy_coef: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: tuple | None = None
    reference_device: str | None = None
    legacy_peft_upcast: bool = False  # LoRA as before 6828f2e: peft's fp32 input upcast, no autocast
    reference_copy: bool | None = None  # full fine-tuning: keep a frozen reference copy (None: as fastrlhf.train)
    fused_adamw: bool = False       # AdamW(fused=True) instead of the for-each default (TRL-style setups;
                                    # fastrlhf's trainers are fused on CUDA anyway)
    fused_head: bool = True         # the trainers' final loss by the fused RL head (False: token_logprobs + loss)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.setup not in SETUPS:
            raise ValueError(f"setup must be one of {SETUPS}, got {self.setup!r}")
        if self.setup not in FASTRLHF_SETUPS and self.stage not in TRL_STAGES:
            raise ValueError(f"setup {self.setup!r} is simulated for {TRL_STAGES} only, got stage {self.stage!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum_steps", "num_minibatches", "ppo_epochs", "lora_r"):
            check_int(name, getattr(self, name), 1)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.stage in ("ppo", "grpo") and not 1 <= self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in [1, seq_len) for {self.stage}, got {self.prompt_len} "
                             f"(seq_len {self.seq_len})")
        if self.stage == "grpo" and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def rollout_rows(self) -> int:
        return self.batch_size * (self.group_size if self.stage == "grpo" else 1)

    @property
    def micro_rows(self) -> int:
        """Rows of one forward/backward micro-batch."""
        if self.stage in ("ppo", "grpo"):
            return max(1, self.rollout_rows // (self.num_minibatches * self.grad_accum_steps))
        return self.batch_size * (2 if self.stage in ("rm", "dpo") else 1)



@dataclass
class StepResult:
    """Peaks of one measured step (a `MemoryCounter`'s), and how it ran."""

    n_layers: int
    peak: Snapshot
    phase_peaks: dict[str, Snapshot]
    region_peaks: dict[tuple, Snapshot]
    static_bytes: dict[str, int] = field(default_factory=dict)  # category -> bytes before the step
    seconds: float = 0.0
    profiler_peak: int | None = None  # real runs with profile=True: the same peak from torch.profiler
    notes: list[str] = field(default_factory=list)



def build_causal_lm(config, dtype: torch.dtype, *, fake: bool, kind: str = "causal-lm", seed: int = 0):
    """A causal LM (or a 1-label sequence classifier) from `config`: on the meta device when `fake`
    (fakeified later), else real random weights on the CPU."""
    from fastrlhf.planner.fake import build_causal_lm as build

    return build(config, dtype, device="meta" if fake else "cpu", kind=kind, seed=seed)



def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)



def _lengths(rows: int, length: int, g: torch.Generator) -> list[int]:
    """Row 0 at full length, the others a little shorter: the batch has padding (so attention runs
    with a padding mask, as in training) and its width is `length`."""
    short = torch.randint(max(2, length - max(1, length // 8)), length + 1, (rows,), generator=g).tolist()
    short[0] = length
    return short



def sft_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from fastrlhf.data import collate_sft

    g = _rng(seed)
    examples = []
    for n in _lengths(rows, length, g):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 4)
        examples.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (n - prompt)})
    return collate_sft(examples, PAD_ID)



def preference_batch(pairs: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from fastrlhf.data import collate_preferences

    g = _rng(seed)
    examples = []
    for chosen_n, rejected_n in zip(_lengths(pairs, length, g), _lengths(pairs, length, g)):
        example = {}
        for side, n in (("chosen", chosen_n), ("rejected", rejected_n)):
            prompt = max(1, n // 4)
            example[f"{side}_input_ids"] = torch.randint(1, vocab, (n,), generator=g).tolist()
            example[f"{side}_loss_mask"] = [0] * prompt + [1] * (n - prompt)
        examples.append(example)
    return collate_preferences(examples, PAD_ID)



def rollout_batch(rows: int, prompt_len: int, length: int, vocab: int, eos_id: int, seed: int = 0) -> dict:
    """What `PolicyGradientTrainer.rollout` returns for `rows` completions: prompt_len prompt tokens
    and up to length - prompt_len generated ones (row 0 the longest)."""
    from fastrlhf.trainers.rollout import build_rollout_batch

    g = _rng(seed)
    prompts, completions = [], []
    for n in _lengths(rows, length, g):
        prompts.append(torch.randint(1, vocab, (prompt_len,), generator=g).tolist())
        completion = torch.randint(1, vocab, (max(1, n - prompt_len),), generator=g).tolist()
        completion[-1] = eos_id
        completions.append(completion)
    batch = build_rollout_batch(prompts, completions, pad_token_id=PAD_ID)
    batch["has_eos"] = torch.ones(rows, dtype=torch.bool)
    batch["completion_ids"] = completions
    return batch



@dataclass
class _Run:
    """Everything one step needs, set up by a setup builder."""

    modules: list                      # every nn.Module holding weights (fakeified in fake mode)
    owner: dict[int, str]              # id(tensor) -> role, for parameters and buffers
    optimizer: torch.optim.Optimizer | None = None
    params: list = field(default_factory=list)
    step: object = None                # callable(counter, inputs) running the measured step
    inputs: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # decoder layer lists to watch
    notes: list = field(default_factory=list)



def use_fused_adamw(optimizer) -> None:
    """Switch an AdamW to its fused implementation (one kernel, no [all parameters] temporaries)."""
    for group in [optimizer.defaults, *optimizer.param_groups]:
        group["fused"], group["foreach"] = True, False
