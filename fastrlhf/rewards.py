"""Rewards from anywhere, for PPO and GRPO: Python functions with TRL's calling convention, Hugging
Face sequence-classification reward models with their own tokenizer, several of them weighted.

    reward = RewardFunctions([correctness, "path/to/hf-reward-model"], weights=[1.0, 0.5])
    reward.dry_run(train_records)            # fails here, before the policy model loads
    scores = reward(prompts, completions, records)   # what the trainers call (fastrlhf's reward_fn)

A function is called as TRL calls it:

    f(prompts=[...], completions=[...], **columns) -> list[float | None]

prompts are the records' "prompt" values as they are (message lists for conversational data),
completions the decoded completions (for conversational prompts, `[{"role": "assistant",
"content": text}]` each), and every other column of the records comes as a keyword with one value
per completion. A function without `**kwargs` gets only the columns it names. None means "no
opinion" for that completion (TRL's convention): the weighted sum skips it.

A fastrlhf-style function (a parameter named `records`) keeps its positional call
`f(prompts, completions, records)`; so does `reward_fn=` of the trainers.

A reward model is a directory (or a loaded `PreTrainedModel`) of an
`AutoModelForSequenceClassification` with one label; its texts are re-tokenised with its own
tokenizer (a chat template for conversational prompts when it has one, prompt + completion
otherwise, as TRL), so its vocabulary need not be the policy's.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from typing import Any, Callable, Sequence

import torch

FAKE_COMPLETION = "a short sample answer"


def is_hf_reward_model_dir(path: str) -> bool:
    """A directory whose config.json names a ...ForSequenceClassification architecture."""
    config = os.path.join(str(path), "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def takes_records(fn: Callable) -> bool:
    """Whether `fn` is a fastrlhf-style reward function `fn(prompts, completions, records)`."""
    try:
        return "records" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def source_name(source: Any) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, torch.nn.Module):
        return f"reward model {getattr(source.config, '_name_or_path', '') or type(source).__name__}"
    return getattr(source, "__name__", type(source).__name__)


class SequenceClassifierReward:
    """A Hugging Face sequence-classification model as a reward function (logit 0 of each text).

    model: a directory or a loaded model; tokenizer: its tokenizer (default: from the directory).
    The model runs without grad in eval mode, on `device` (moved there on the first call)."""

    def __init__(self, model, tokenizer=None, *, device: torch.device | str | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            if not os.path.isdir(path):
                raise ValueError(f"reward model {path!r} is not a directory")
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        if tokenizer is None:
            name = getattr(model.config, "_name_or_path", "")
            if not (name and os.path.isdir(name)):
                raise ValueError("a loaded reward model needs its tokenizer: pass reward_processing_classes=[tokenizer]")
            tokenizer = AutoTokenizer.from_pretrained(name)
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model must have one label (num_labels=1), got {model.config.num_labels}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.device = torch.device(device) if device is not None else None
        self.__name__ = source_name(model)

    def texts(self, prompts: Sequence, completions: Sequence) -> list[str]:
        out = []
        for prompt, completion in zip(prompts, completions):
            if isinstance(prompt, list):  # conversational: prompt messages + the assistant turn
                messages = prompt + (completion if isinstance(completion, list) else
                                     [{"role": "assistant", "content": completion}])
                if getattr(self.tokenizer, "chat_template", None):
                    out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    out.append("\n".join(m["content"] for m in messages))
            else:
                out.append(prompt + (completion[0]["content"] if isinstance(completion, list) else completion))
        return out

    @torch.no_grad()
    def __call__(self, prompts, completions, **_: Any) -> list[float]:
        if self.device is not None and self.model.device != self.device:
            self.model.to(self.device)
        inputs = self.tokenizer(self.texts(prompts, completions), return_tensors="pt", padding=True,
                                padding_side="right", add_special_tokens=False)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        return self.model(**inputs).logits[:, 0].float().tolist()


class RewardFunctions:
    """Several reward sources, weighted: score = sum_i w_i f_i (completions where f_i returned None
    are skipped in that sum). Called as fastrlhf's `reward_fn(prompts, completions, records)`.

    sources: callables (TRL's keyword convention, or fastrlhf's with a `records` parameter),
        reward-model directories, or loaded `AutoModelForSequenceClassification` models.
    weights: one per source (default 1.0 each).
    processing_classes: tokenizers of the reward models, aligned with `sources` (None entries:
        loaded from the model's directory), as TRL's reward_processing_classes.
    """

    def __init__(self, sources, *, weights: Sequence[float] | None = None, processing_classes=None,
                 device: torch.device | str | None = None) -> None:
        sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        if not sources:
            raise ValueError("reward_funcs must name at least one reward function or model")
        if weights is not None and len(weights) != len(sources):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(sources)} reward functions; give one each")
        tokenizers = list(processing_classes) if processing_classes is not None else [None] * len(sources)
        if len(tokenizers) != len(sources):
            raise ValueError(f"reward_processing_classes has {len(tokenizers)} entries for {len(sources)} reward functions")
        self.functions: list[Callable] = []
        self.names: list[str] = []
        for i, (source, tokenizer) in enumerate(zip(sources, tokenizers)):
            self.names.append(source_name(source))
            if isinstance(source, (str, os.PathLike)) or isinstance(source, torch.nn.Module):
                if isinstance(source, (str, os.PathLike)) and not is_hf_reward_model_dir(source):
                    raise ValueError(f"reward_funcs[{i}]: {str(source)!r} is not a Hugging Face sequence-classification "
                                     "model directory (config.json with a ...ForSequenceClassification architecture)")
                self.functions.append(SequenceClassifierReward(source, tokenizer, device=device))
            elif callable(source):
                self.functions.append(source)
            else:
                raise ValueError(f"reward_funcs[{i}] must be a function, a reward-model directory or a model, "
                                 f"got {type(source).__name__}")
        self.weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        self.__name__ = "+".join(self.names)
        self.metric_names = _metric_names(self.names)
        self.last_scores: list[list[float]] | None = None  # the table of the last call (per-function metrics)

    def to(self, device) -> "RewardFunctions":
        for fn in self.functions:
            if isinstance(fn, SequenceClassifierReward):
                fn.device = torch.device(device)
        return self

    # ------------------------------------------------------------------ calling
    def _call_one(self, index: int, prompts, completions, records) -> list:
        fn = self.functions[index]
        if takes_records(fn):
            return fn(prompts, completions, records)
        trl_prompts = [r.get("prompt", p) for p, r in zip(prompts, records)]
        trl_completions = [[{"role": "assistant", "content": c}] if isinstance(tp, list) else c
                           for tp, c in zip(trl_prompts, completions)]
        columns = {key: [r.get(key) for r in records] for key in (records[0] if records else {})
                   if key not in ("prompt", "completion")}
        if not _takes_var_keywords(fn):
            accepted = inspect.signature(fn).parameters
            columns = {k: v for k, v in columns.items() if k in accepted}
        return fn(prompts=trl_prompts, completions=trl_completions, **columns)

    def scores_per_function(self, prompts, completions, records) -> list[list[float]]:
        """[function][completion] floats (NaN for None)."""
        table = []
        for i in range(len(self.functions)):
            values = self._call_one(i, prompts, completions, records)
            table.append(_as_floats(values, len(completions), self.names[i]))
        return table

    def __call__(self, prompts, completions, records) -> list[float]:
        table = self.scores_per_function(prompts, completions, records)
        self.last_scores = table
        totals = []
        for j in range(len(completions)):
            terms = [w * column[j] for w, column in zip(self.weights, table) if not math.isnan(column[j])]
            if not terms:
                warnings.warn(f"every reward function returned None for completion {j}; its reward is 0", stacklevel=2)
            totals.append(float(sum(terms)))
        return totals

    # ------------------------------------------------------------------ the check before training
    def dry_run(self, records: Sequence[dict], tokenizer=None) -> None:
        """Call every source on a fake batch built from the first (at most 2) records: their prompts,
        a fixed sample completion, their columns. Raises ValueError naming the source and what it was
        called with, so a wrong signature or column fails before any model loads."""
        batch = list(records[:2])
        if not batch:
            raise ValueError("no records to check the reward functions on")
        prompts = [r["prompt"] if isinstance(r.get("prompt"), str) else _render(r.get("prompt"), tokenizer) for r in batch]
        completions = [FAKE_COMPLETION] * len(batch)
        for i, name in enumerate(self.names):
            try:
                values = self._call_one(i, prompts, completions, batch)
                _as_floats(values, len(batch), name)
            except Exception as error:  # noqa: BLE001 - reported with the call that failed
                columns = sorted(k for k in batch[0] if k not in ("prompt", "completion"))
                style = ("f(prompts, completions, records)" if takes_records(self.functions[i]) else
                         f"f(prompts=..., completions=..., {', '.join(f'{c}=...' for c in columns)})")
                raise ValueError(f"reward function {name!r} failed on a dry call {style} with {len(batch)} "
                                 f"records of the training data and the completion {FAKE_COMPLETION!r}: "
                                 f"{type(error).__name__}: {error}") from error


def _metric_names(names: Sequence[str]) -> list[str]:
    """Short, unique names for the per-function metrics `rewards/<name>/mean` (TRL's keys): a function's
    __name__, the last path component of a reward model; a repeated name gets _2, _3, ..."""
    short = [name.rstrip("/").rsplit("/", 1)[-1].removeprefix("reward model ") for name in names]
    seen: dict[str, int] = {}
    unique = []
    for name in short:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def _takes_var_keywords(fn: Callable) -> bool:
    try:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True


def _render(prompt, tokenizer) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else str(prompt)


def _as_floats(values, n: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"reward function {name!r} must return a list of {n} floats (or None), got {values!r:.200}")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name!r} returned {v!r:.80}, not a number or None") from None
        if not math.isfinite(out[-1]):
            raise ValueError(f"reward function {name!r} returned a non-finite reward {v!r}")
    return out
