"""The built-in demo task: short answers under instruction-following constraints, with a gold reward.

Every prompt asks for one sentence about a topic plus 3-4 checkable constraints, e.g.

    Write one sentence about coffee. Use at most 8 words. End your answer with the word "gold".

The gold reward (`gold_reward`) is the fraction of the prompt's constraints the answer meets; an
answer that does not mention the topic, or has fewer than three words, scores 0. The constraints are
parsed back from the prompt text, so the reward needs nothing but (prompt, completion).

The SFT demonstrations are templated answers that meet each constraint only about half of the time
(a capital letter, a comma aside, a long tail, a wrong last word, a missing word): SFT learns the
format and the mix, which leaves a decent but imperfect policy whose mistakes RL and DPO can remove.
Train and held-out prompts use disjoint topics.
"""
from __future__ import annotations

import random
import re
from typing import Any, Iterable, Sequence

# Topics are lower-case words; an answer is "on topic" when it contains the word (its stem for plurals).
TRAIN_TOPICS = (
    "coffee", "winter", "forests", "the moon", "bicycles", "music", "rain", "cats", "bread", "cities",
    "mountains", "the sun", "books", "gardens", "trains", "snow", "tea", "rivers", "birds", "autumn",
    "deserts", "libraries", "friendship", "stars", "apples", "football", "the wind", "lighthouses",
    "honey", "dogs", "chess", "islands", "clouds", "summer", "cheese", "bridges", "volcanoes", "flowers",
    "robots", "castles",
)
EVAL_TOPICS = (
    "the ocean", "oranges", "storms", "painting", "mornings", "bees", "boats", "soup", "kites", "horses",
    "candles", "maps",
)
WORDS = (
    "blue", "light", "home", "again", "today", "gold", "peace", "water", "stone", "green", "joy",
    "silver", "warm", "quiet", "bright", "slowly", "dream", "fire", "sky", "time",
)

# Constraint phrasings: generated and parsed by the same table, so the two cannot drift apart.
_MAX_WORDS = "Use at most {n} words."
_END_WORD = 'End your answer with the word "{w}".'
_INCLUDE_WORD = 'Include the word "{w}".'
_LOWERCASE = "Write only in lowercase letters."
_NO_COMMAS = "Do not use any commas."
CONSTRAINT_KINDS = ("max_words", "end_word", "include_word", "lowercase", "no_commas")

_STARTS = (
    "I love {t}", "I often think about {t}", "there is something calm about {t}", "my friend talks about {t}",
    "we read a story about {t}", "nothing beats {t}", "I dream of {t}", "everyone enjoys {t}",
)
_ASIDES = (", you know", ", of course", ", honestly", ", in a way", ", for sure")
_LONG_TAILS = (
    " more than anything else",
    " whenever I have free time",
    " because it reminds me of home",
    " on every single day",
)
_WRONG_ENDINGS = (" every day", " too", " in my opinion", " a lot")

_WORD_RE = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _topic_stem(topic: str) -> str:
    word = topic.split()[-1]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def make_prompt(topic: str, constraints: Sequence[tuple[str, Any]]) -> str:
    """The prompt text for `topic` and a list of (kind, value) constraints."""
    parts = [f"Write one sentence about {topic}."]
    for kind, value in constraints:
        if kind == "max_words":
            parts.append(_MAX_WORDS.format(n=value))
        elif kind == "end_word":
            parts.append(_END_WORD.format(w=value))
        elif kind == "include_word":
            parts.append(_INCLUDE_WORD.format(w=value))
        elif kind == "lowercase":
            parts.append(_LOWERCASE)
        elif kind == "no_commas":
            parts.append(_NO_COMMAS)
        else:
            raise ValueError(f"unknown constraint kind {kind!r}; expected one of {CONSTRAINT_KINDS}")
    return " ".join(parts)


def parse_prompt(prompt: str | list) -> tuple[str | None, list[tuple[str, Any]]]:
    """Inverse of `make_prompt`: (topic or None, constraints) found in a prompt (text or messages)."""
    prompt = prompt_text(prompt)
    topic = re.search(r"Write one sentence about (.+?)\.", prompt)
    constraints: list[tuple[str, Any]] = []
    for match in re.finditer(r"Use at most (\d+) words\.", prompt):
        constraints.append(("max_words", int(match.group(1))))
    for match in re.finditer(r'End your answer with the word "([^"]+)"\.', prompt):
        constraints.append(("end_word", match.group(1)))
    for match in re.finditer(r'Include the word "([^"]+)"\.', prompt):
        constraints.append(("include_word", match.group(1)))
    if _LOWERCASE in prompt:
        constraints.append(("lowercase", True))
    if _NO_COMMAS in prompt:
        constraints.append(("no_commas", True))
    return (topic.group(1) if topic else None), constraints


def constraint_met(kind: str, value: Any, answer: str) -> bool:
    words = _words(answer)
    if kind == "max_words":
        return len(words) <= int(value)
    if kind == "end_word":
        return bool(words) and words[-1].lower() == str(value).lower()
    if kind == "include_word":
        return str(value).lower() in (w.lower() for w in words)
    if kind == "lowercase":
        return answer == answer.lower()
    if kind == "no_commas":
        return "," not in answer
    raise ValueError(f"unknown constraint kind {kind!r}; expected one of {CONSTRAINT_KINDS}")


def gold_reward(prompt: str | list, completion: str) -> float:
    """Fraction of the prompt's constraints that `completion` meets, in [0, 1].

    0 when the answer is off topic (does not contain the topic word) or shorter than three words, so
    that an empty or degenerate answer cannot collect the "at most N words" / "no commas" points.
    """
    topic, constraints = parse_prompt(prompt_text(prompt))
    answer = completion.strip()
    if len(_words(answer)) < 3:
        return 0.0
    if topic is not None and _topic_stem(topic).lower() not in answer.lower():
        return 0.0
    if not constraints:
        return 1.0
    return sum(constraint_met(kind, value, answer) for kind, value in constraints) / len(constraints)


def gold_reward_fn(prompts: Sequence[Any], completions: Sequence[str], records: Any = None, **_: Any) -> list[float]:
    """Batch form for `--reward-fn fastrlhf.demo:gold_reward_fn`: fn(prompts, completions, records).

    `prompts` may be plain prompts, chat-rendered prompt texts or message lists (the constraints are
    found by pattern anywhere in the text).
    """
    return [gold_reward(p, c) for p, c in zip(prompts, completions)]


def prompt_text(prompt: Any) -> str:
    """The text of a prompt given as a string, a message dict or a list of chat messages (the last
    user message)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return str(prompt.get("content", prompt.get("prompt", "")))
    users = [m["content"] for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def constraint_rates(prompts: Iterable[str | list], completions: Iterable[str]) -> dict[str, float]:
    """Per constraint kind: the fraction of the answers whose prompt asked for it that meet it."""
    met: dict[str, list[bool]] = {}
    for prompt, completion in zip(prompts, completions):
        for kind, value in parse_prompt(prompt)[1]:
            met.setdefault(kind, []).append(constraint_met(kind, value, completion.strip()))
    return {kind: mean(float(x) for x in met[kind]) for kind in CONSTRAINT_KINDS if kind in met}


def _sample_constraints(rng: random.Random) -> list[tuple[str, Any]]:
    kinds = rng.sample(CONSTRAINT_KINDS, rng.choice((3, 4)))
    end_word, include_word = rng.sample(WORDS, 2)
    values = {"max_words": rng.randint(7, 12), "end_word": end_word, "include_word": include_word,
              "lowercase": True, "no_commas": True}
    return [(kind, values[kind]) for kind in kinds]


def prompts(n: int, *, split: str = "train", seed: int = 0, system: str | None = None) -> list[dict]:
    """`n` prompt records; split "train" or "eval" (disjoint topics).

    {"prompt": str}, or with `system` the conversational form {"prompt": [system message, user message]}
    (a short system message also replaces a chat template's long default one: shorter sequences).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    topics = TRAIN_TOPICS if split == "train" else EVAL_TOPICS
    rng = random.Random(f"{split}-{seed}")
    texts = [make_prompt(rng.choice(topics), _sample_constraints(rng)) for _ in range(n)]
    if system is None:
        return [{"prompt": text} for text in texts]
    return [{"prompt": [{"role": "system", "content": system}, {"role": "user", "content": text}]} for text in texts]


def demonstration(prompt: str | list, rng: random.Random, *, p_follow: float = 0.5) -> str:
    """A templated answer to a demo prompt that follows each style rule with probability `p_follow`.

    The choices are made whether or not the prompt asks for them, so the SFT model learns the styles
    but not when to use them: that is what RL / DPO have to add.
    """
    topic, constraints = parse_prompt(prompt)
    asked = dict(constraints)
    follow = lambda: rng.random() < p_follow  # noqa: E731
    text = rng.choice(_STARTS).format(t=topic or "it")
    if "include_word" in asked and follow():
        text += f" and {asked['include_word']}"
    if not follow():
        text += rng.choice(_ASIDES)
    if not follow():
        text += rng.choice(_LONG_TAILS)
    if "end_word" in asked:
        text += f" like {asked['end_word']}"
        if not follow():
            text += rng.choice(_WRONG_ENDINGS)
    text += "."
    return text.lower() if follow() else text[0].upper() + text[1:]


def demonstrations(n: int, *, seed: int = 0, p_follow: float = 0.5, system: str | None = None) -> list[dict]:
    """`n` SFT records {"prompt", "completion"} on the train topics (prompt form as in `prompts`)."""
    rng = random.Random(f"demo-{seed}")
    return [{"prompt": r["prompt"], "completion": demonstration(r["prompt"], rng, p_follow=p_follow)}
            for r in prompts(n, split="train", seed=seed, system=system)]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
