"""Datasets in the formats TRL users already have, tokenised with the chat template, and collators.

    sft         {"prompt": ..., "completion": ...}  or  {"messages": [{"role", "content"}, ...]}  or
                {"text": ...} (plain language modelling: every token is trained, eos appended)
    preference  {"prompt": ..., "chosen": ..., "rejected": ...}  (strings or message lists; the prompt
                may be left out when chosen/rejected are full conversations sharing their first turns)
    prompt      {"prompt": ...}  (other fields are kept, e.g. what a reward function needs)
    unpaired    {"prompt": ..., "completion": ..., "label": true | false}  (KTO: one completion, desirable
                or not; TRL's unpaired preference format)

With a chat template, a string prompt is the user turn and a string completion the assistant turn.
Without one, the text is prompt + completion + eos. `loss_mask` is 1 exactly on completion (assistant)
tokens: their span is found by rendering the conversation up to the generation prompt and up to the
end of the turn and comparing token prefixes.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import torch

KINDS = {
    "sft": "'prompt' and 'completion', or 'messages', or 'text'",
    "preference": "'prompt', 'chosen' and 'rejected'",
    "prompt": "'prompt'",
    "unpaired": "'prompt', 'completion' and 'label' (true = desirable, false = undesirable)",
}

Messages = list  # [{"role": str, "content": str}, ...]


# --------------------------------------------------------------------------- loading


def load_records(source: str | Sequence[dict], *, split: str = "train") -> list[dict]:
    """Records (a list of dicts) from a list, a .jsonl / .json / .parquet file, a `datasets` directory
    (save_to_disk or data files) or a `datasets` hub name."""
    if not isinstance(source, (str, os.PathLike)):
        records = list(source)
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"<records>: record {i} must be a dict, got {type(record).__name__}")
        return records
    path = os.fspath(source)
    if os.path.isfile(path):
        return _load_file(path)
    if os.path.isdir(path):
        return _load_dataset_dir(path, split)
    if os.path.splitext(path)[1].lower() in _FILE_TYPES or path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    try:
        import datasets

        return datasets.load_dataset(path, split=split).to_list()
    except Exception as error:  # offline hub, unknown name, ...
        raise ValueError(
            f"Could not load dataset {path!r}: it is not a file or directory, and datasets.load_dataset "
            f"failed ({type(error).__name__}: {error}). Give a .jsonl, .json or .parquet file."
        ) from error


_FILE_TYPES = (".jsonl", ".json", ".parquet")
# file and folder names that put a data file into a split (the `datasets` library's conventions)
_SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
                "test": ("test", "testing", "eval", "evaluation")}


class FileRecords(list):
    """The records of a .jsonl file, with `lines[i]`, the line record i was read from, so that
    `validate_records` can name the line."""

    def __init__(self, records, lines):
        super().__init__(records)
        self.lines = list(lines)


def _load_file(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        records, lines = [], []
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = _decode(raw, path, line_no)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_no} is not valid JSON ({error})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}: line {line_no} is a JSON {_json_type(record)}, not an object "
                                     "(one record per line)")
                records.append(record)
                lines.append(line_no)
        return FileRecords(records, lines)
    if ext == ".json":
        with open(path, "rb") as f:
            raw = f.read()
        text = _decode(raw, path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {error.lineno}, column {error.colno}: "
                             f"not valid JSON ({error.msg})") from None
        if isinstance(data, dict):  # {"column": [values...]} -> rows
            columns = list(data)
            lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
            if len(lengths) != 1 or -1 in lengths:
                raise ValueError(f"{path}: a JSON object must map column names to lists of equal length")
            records = [dict(zip(columns, row)) for row in zip(*data.values())]
        else:
            records = data
    elif ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's own error types: a damaged or non-Parquet file
            raise ValueError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    else:
        raise ValueError(f"{path}: unsupported file type {ext!r} (use .jsonl, .json or .parquet)")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of JSON objects (one record each)")
    return records


def _decode(raw: bytes, path: str, line_no: int | None = None) -> str:
    """UTF-8 text of `raw` (a whole file, or line `line_no`); ValueError naming the file, line and
    column (1-based, in bytes) of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start
        if line_no is None:
            line_no = raw.count(b"\n", 0, offset) + 1
            column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
        else:
            column = offset + 1
        raise ValueError(f"{path}: line {line_no}, column {column}: not UTF-8 (byte 0x{raw[offset]:02x}); "
                         "save the file as UTF-8") from None


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _load_dataset_dir(path: str, split: str) -> list[dict]:
    """A `datasets.save_to_disk` directory (read by `datasets.load_from_disk`, which writes no
    cache), or a folder of .jsonl / .json / .parquet files read by fastrlhf itself: the files named
    for `split` (train.jsonl, data/train-00000.parquet, ...), or every file when none is named for
    a split (then they are all "train"). Anything else is not a dataset: ValueError."""
    names = set(os.listdir(path))
    if "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names:
        import datasets

        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path}: no split {split!r} (splits: {sorted(data)})")
            data = data[split]
        return data.to_list()
    files = []
    for root, dirs, filenames in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, f) for f in sorted(filenames)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in _FILE_TYPES]
    if not files:
        raise ValueError(f"{path}: not a dataset directory: no datasets.save_to_disk files (dataset_info.json / "
                         f"dataset_dict.json) and no .jsonl, .json or .parquet file in it")
    by_split: dict[str | None, list[str]] = {}
    for file in files:
        by_split.setdefault(_split_of(os.path.relpath(file, path)), []).append(file)
    named = sorted(k for k in by_split if k is not None)
    chosen = by_split.get(split) if named else (files if split == "train" else None)
    if not chosen:
        found = ", ".join(named) or "train (no file is named for a split)"
        raise ValueError(f"{path}: no {split!r} split (files for: {found})")
    if len(chosen) == 1:
        return _load_file(chosen[0])
    return [record for file in chosen for record in _load_file(file)]


def _split_of(relative_path: str) -> str | None:
    """The split a data file belongs to by its folder or file name, e.g. data/train-00000.parquet."""
    import re

    parts = re.split(r"[^a-z0-9]+", os.path.splitext(relative_path.lower())[0])
    for split, words in _SPLIT_WORDS.items():
        if any(word in parts for word in words):
            return split
    return None


# --------------------------------------------------------------------------- validation


def validate_records(records: Sequence[dict], kind: str, source: str = "<records>") -> None:
    """Raise ValueError naming `source`, the record and the column when records don't fit `kind`
    ("sft", "preference" or "prompt"), or when there are none."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if len(records) == 0:
        raise ValueError(f"{source}: the dataset is empty ({kind} data needs {KINDS[kind]})")
    lines = getattr(records, "lines", None)  # FileRecords: the .jsonl line of each record
    for i, record in enumerate(records):
        where = f"{source}: line {lines[i]} (record {i})" if lines else f"{source}: record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be a dict, got {type(record).__name__}")
        if kind == "sft":
            if "messages" in record:
                _check_messages(record["messages"], f"{where}, column 'messages'")
                if not any(m["role"] == "assistant" for m in record["messages"]):
                    raise ValueError(f"{where}, column 'messages': no assistant message to train on")
                continue
            if "text" in record and "completion" not in record:
                if not isinstance(record["text"], str) or not record["text"]:
                    raise ValueError(f"{where}, column 'text' must be a non-empty string, got {record['text']!r:.80}")
                continue
            required = ("prompt", "completion")
        elif kind == "preference":
            required = ("chosen", "rejected")
            if "prompt" not in record and not (
                isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list)
            ):
                required = ("prompt", "chosen", "rejected")
        elif kind == "unpaired":
            required = ("prompt", "completion", "label")
        else:
            required = ("prompt",)
        missing = [c for c in required if c not in record]
        if missing:
            raise ValueError(
                f"{where} has no column {missing[0]!r} (columns: {sorted(record)}); "
                f"{kind} data needs {KINDS[kind]}"
            )
        for column in ("prompt", *required):
            if column == "label":
                if not isinstance(record[column], bool):
                    raise ValueError(f"{where}, column 'label' must be true (desirable) or false (undesirable), "
                                     f"got {record[column]!r}")
            elif column in record:
                _check_text_or_messages(record[column], f"{where}, column {column!r}")


def _check_text_or_messages(value: Any, where: str) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list):
        _check_messages(value, where)
        return
    raise ValueError(f"{where} must be a string or a list of messages, got {type(value).__name__}")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{'role', 'content'}} messages")
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: message {j} must be a dict with string 'role' and 'content', got {m!r}")


# --------------------------------------------------------------------------- tokenisation


def tokenize_sft(
    records: Sequence[dict], tokenizer, *, max_length: int, source: str = "<records>"
) -> list[dict]:
    """-> [{"input_ids": list[int], "loss_mask": list[int]}], loss_mask 1 on completion / assistant tokens.

    Longer sequences are cut at max_length (one warning with the count); examples left with no
    completion token are dropped.
    """
    validate_records(records, "sft", source)
    counter = _Truncation(max_length)
    examples = []
    for record in records:
        if "messages" in record:
            ids, mask = _encode(tokenizer, [], record["messages"], train_all_assistant=True)
        elif "text" in record and "completion" not in record:
            ids = _text_ids(tokenizer, record["text"])
            mask = [1] * len(ids)
        else:
            ids, mask = _encode(tokenizer, record["prompt"], record["completion"])
        example = counter.cut({"input_ids": ids, "loss_mask": mask})
        if example is not None:
            examples.append(example)
    counter.report(source, len(records))
    return examples


def tokenize_preferences(
    records: Sequence[dict], tokenizer, *, max_length: int, max_prompt_length: int | None = None,
    source: str = "<records>", drop_identical: bool = False
) -> list[dict]:
    """-> [{"chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask"}]
    (lists of ints; loss_mask 1 on the response tokens).

    Prompts keep their LAST max_prompt_length tokens (TRL's keep_end). With max_prompt_length None a
    prompt is cut (to max_length // 2) only where it would leave no completion token within
    max_length: a long prompt never silently drops its pair. Then rows are cut at max_length.

    Pairs whose chosen and rejected tokens are identical (after truncation) are counted and warned
    about: every preference loss gives them log 2 with zero gradient and a coin-flip accuracy.
    drop_identical=True leaves them out."""
    validate_records(records, "preference", source)
    counter = _Truncation(max_length)
    prompts_cut = 0
    examples = []
    identical = 0
    for record in records:
        prompt, chosen, rejected = _split_preference(record)
        encoded = {name: _encode(tokenizer, prompt, completion) for name, completion in (("chosen", chosen), ("rejected", rejected))}
        # the prompt is the part before the first completion token, the same in both rows
        prompt_len = min(mask.index(1) if 1 in mask else len(mask) for _, mask in encoded.values())
        limit = max_prompt_length
        if limit is None and prompt_len >= max_length:  # nothing of the completion would be left
            limit = max_length // 2
        cut = max(prompt_len - limit, 0) if limit is not None else 0
        prompts_cut += cut > 0
        pair = {}
        for name, (ids, mask) in encoded.items():
            pair[name] = counter.cut({"input_ids": ids[cut:], "loss_mask": mask[cut:]})
        if pair["chosen"] is None or pair["rejected"] is None:
            continue
        if pair["chosen"]["input_ids"] == pair["rejected"]["input_ids"]:
            identical += 1
            if drop_identical:
                continue
        examples.append({f"{name}_{key}": value for name, ex in pair.items() for key, value in ex.items()})
    if prompts_cut:
        bound = f"max_prompt_length={max_prompt_length}" if max_prompt_length is not None else \
            f"max_length={max_length} (no room for the completion; kept the last {max_length // 2} prompt tokens)"
        warnings.warn(f"{source}: {prompts_cut} of {len(records)} prompts were longer than {bound}; "
                      f"their beginning was cut", stacklevel=2)
    counter.report(source, 2 * len(records))
    if identical:
        warnings.warn(
            f"{source}: {identical} of {len(records)} pairs have chosen == rejected (identical tokens after "
            f"truncation to max_length={max_length}): their loss is log 2 with zero gradient and their accuracy "
            + ("a coin flip; they were dropped" if drop_identical else
               "a coin flip; drop them with drop_identical_pairs=True (--drop-identical-pairs)"),
            stacklevel=2,
        )
    return examples


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """SFT packing (TRL's "wrapped" strategy): the tokenised examples, in order, concatenated into one
    stream and cut into rows of max_length tokens, so no compute goes to padding. Attention crosses
    example boundaries inside a row (each example ends with eos); loss masks are kept. Rows without
    a trained token are dropped."""
    ids: list[int] = []
    mask: list[int] = []
    for example in examples:
        ids.extend(example["input_ids"])
        mask.extend(example["loss_mask"])
    rows = []
    for start in range(0, len(ids), max_length):
        row = {"input_ids": ids[start : start + max_length], "loss_mask": mask[start : start + max_length]}
        if len(row["input_ids"]) >= 2 and any(row["loss_mask"][1:]):
            rows.append(row)
    return rows


def _text_ids(tokenizer, text: str) -> list[int]:
    """Plain text -> token ids with eos appended (as TRL's SFT does for {"text"} data), so the
    model learns where a document ends."""
    ids = tokenizer(text)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def tokenize_unpaired(
    records: Sequence[dict], tokenizer, *, max_length: int, source: str = "<records>"
) -> list[dict]:
    """-> [{"input_ids", "loss_mask", "label", "prompt", "completion"}]: one row per completion (lists
    of ints, a bool, and the record's prompt and completion for `add_kl_rows`), for KTO.
    Longer sequences are cut at max_length (one warning); examples left with no completion token are dropped."""
    validate_records(records, "unpaired", source)
    counter = _Truncation(max_length)
    examples = []
    for record in records:
        ids, mask = _encode(tokenizer, record["prompt"], record["completion"])
        example = counter.cut({"input_ids": ids, "loss_mask": mask})
        if example is not None:
            examples.append({**example, "label": record["label"], "prompt": record["prompt"],
                             "completion": record["completion"]})
    counter.report(source, len(records))
    return examples


def add_kl_rows(examples: list[dict], tokenizer, *, group_size: int, max_length: int,
                source: str = "<records>") -> None:
    """Give each `tokenize_unpaired` example its KL row {"kl_input_ids", "kl_loss_mask"}: its prompt
    with ANOTHER example's completion, from which KTO estimates its reference point. As TRL builds
    them (`add_kl_completion_ids`): the examples are taken in consecutive groups of group_size (a
    trainer's batches), and within a group the completions are rotated by one, (x_1, y_1) ... (x_n,
    y_n) -> (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}): the KL rows of a batch pair its own
    completions with different prompts. A group of one (the last, when the count does not divide)
    takes the completion of the example before it. A KL row is cut at max_length like any row, and
    kept even when that leaves no completion token (its log-probs are then 0 under policy and
    reference alike)."""
    if len(examples) < 2:
        raise ValueError(f"{source}: KTO's KL estimate pairs each prompt with another example's completion, "
                         f"so it needs at least 2 examples, got {len(examples)}")
    for start in range(0, len(examples), group_size):
        group = examples[start : start + group_size]
        for k, example in enumerate(group):
            other = group[k - 1] if len(group) > 1 else examples[start - 1]
            ids, mask = _encode(tokenizer, example["prompt"], other["completion"])
            example["kl_input_ids"], example["kl_loss_mask"] = ids[:max_length], mask[:max_length]


def tokenize_prompts(
    records: Sequence[dict], tokenizer, *, max_prompt_length: int, source: str = "<records>"
) -> list[dict]:
    """-> [{"input_ids": list[int], "prompt_text": str, **record}]: the prompt rendered with the
    generation prompt (chat template) ready for `generate`; every field of the record is kept.
    Too-long prompts keep their LAST max_prompt_length tokens (the generation prompt), with a warning."""
    validate_records(records, "prompt", source)
    truncated = 0
    examples = []
    for record in records:
        text = _render_prompt(tokenizer, record["prompt"])
        ids = _tokens(tokenizer, text, chat=_has_chat_template(tokenizer))
        if len(ids) > max_prompt_length:
            truncated += 1
            ids = ids[-max_prompt_length:]
        examples.append({**record, "input_ids": ids, "prompt_text": text})
    if truncated:
        warnings.warn(
            f"{source}: {truncated} of {len(records)} prompts were longer than max_prompt_length="
            f"{max_prompt_length} tokens; their beginning was cut.",
            stacklevel=2,
        )
    return examples


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Sorted token ids that end a generation: the tokenizer's `eos_token_id` and the model's
    `generation_config.eos_token_id` (an id or a list: chat models often stop on the end of the turn
    as well as on the end of the text). ValueError when there is none: sampling could never stop
    at EOS, and the completions could not be told apart from those cut at max_new_tokens."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer has no eos_token: generation could never stop at EOS")
    return sorted(ids)


class _Truncation:
    """Cuts examples at max_length and counts it, to warn once per dataset."""

    def __init__(self, max_length: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length, self.truncated, self.dropped = max_length, 0, 0

    def cut(self, example: dict) -> dict | None:
        if len(example["input_ids"]) > self.max_length:
            self.truncated += 1
            example = {k: v[: self.max_length] for k, v in example.items()}
        if not any(example["loss_mask"]):
            self.dropped += 1
            return None
        return example

    def report(self, source: str, total: int) -> None:
        if self.truncated:
            warnings.warn(
                f"{source}: {self.truncated} of {total} sequences were longer than max_length="
                f"{self.max_length} tokens and were truncated"
                + (f"; {self.dropped} had no completion token left and were dropped" if self.dropped else ""),
                stacklevel=3,
            )
        if self.dropped == total:
            raise ValueError(f"{source}: no example has a completion token within max_length={self.max_length}")


def _split_preference(record: dict):
    """(prompt, chosen, rejected); an implicit prompt is the shared first turns of chosen and rejected."""
    if "prompt" in record:
        return record["prompt"], record["chosen"], record["rejected"]
    chosen, rejected = record["chosen"], record["rejected"]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_messages(value, role: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _render_prompt(tokenizer, prompt) -> str:
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_as_messages(prompt, "user"), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("message-list prompts need a tokenizer with a chat template")
    return prompt


def _tokens(tokenizer, text: str, *, chat: bool) -> list[int]:
    # A rendered chat template already contains its special tokens (bos, ...): do not add them twice.
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def _encode(tokenizer, prompt, completion, *, train_all_assistant: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of prompt + completion; loss_mask 1 on the completion's tokens."""
    if not _has_chat_template(tokenizer):
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError("message lists need a tokenizer with a chat template (this one has none)")
        # Tokenised separately so the prompt/completion boundary is exact.
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)

    prompt_messages = _as_messages(prompt, "user") if prompt else []
    messages = prompt_messages + _as_messages(completion, "assistant")
    first_trained = 0 if train_all_assistant else len(prompt_messages)
    ids = _render_ids(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for i in range(first_trained, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], generation_prompt=True) if i else []
        through = _render_ids(tokenizer, messages[: i + 1], generation_prompt=False)
        start, end = _common_prefix(before, ids), _common_prefix(through, ids)
        if start < len(before) or end < len(through):
            # The template renders a turn differently depending on what follows (e.g. strips
            # reasoning): train from where the renderings diverge.
            _warn_prefix_mismatch_once()
        mask[start:end] = [1] * (end - start)
    return ids, mask


def _render_ids(tokenizer, messages: Messages, *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _tokens(tokenizer, text, chat=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


_prefix_warned = False


def _warn_prefix_mismatch_once() -> None:
    global _prefix_warned
    if not _prefix_warned:
        _prefix_warned = True
        warnings.warn(
            "The chat template does not render conversations prefix-consistently; the loss mask starts "
            "where the renderings first differ.",
            stacklevel=3,
        )


# --------------------------------------------------------------------------- collators


def _pad(rows: list[list[int]], value: int, *, left: bool = False, length: int | None = None) -> torch.Tensor:
    length = length or max(len(r) for r in rows)
    padded = [([value] * (length - len(r)) + list(r)) if left else (list(r) + [value] * (length - len(r))) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate_sft(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask", "loss_mask"}: [B, T] long tensors, right-padded."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": _pad(ids, pad_token_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "loss_mask": _pad([e["loss_mask"] for e in examples], 0),
    }


def collate_preferences(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask", "loss_mask"}: [2B, T], rows 0..B-1 chosen, B..2B-1 rejected
    (one forward for both), right-padded."""
    rows = [
        {"input_ids": e[f"{side}_input_ids"], "loss_mask": e[f"{side}_loss_mask"]}
        for side in ("chosen", "rejected")
        for e in examples
    ]
    return collate_sft(rows, pad_token_id)


def collate_prompts(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"}: [B, T] LEFT-padded, ready for `generate`."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": _pad(ids, pad_token_id, left=True),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, left=True),
    }
