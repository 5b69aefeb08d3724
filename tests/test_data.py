"""fastrlhf.data: loading TRL-format records, validation errors, chat-template tokenisation with
completion-only loss masks, truncation warnings, collators. Offline tiny tokenizer (fastrlhf.testing);
one slow test uses the real SmolLM2 tokenizer (its template injects a default system prompt)."""
import json

import pytest
import torch

from fastrlhf.data import (
    eos_token_ids,
    collate_preferences,
    collate_prompts,
    collate_sft,
    load_records,
    pack_examples,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    validate_records,
)
from fastrlhf.testing import tiny_tokenizer

SFT = [
    {"prompt": "what is the capital of france?", "completion": "paris"},
    {"prompt": "say yes", "completion": "yes yes"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def trained_tokens(tokenizer, example, prefix=""):
    ids, mask = example[f"{prefix}input_ids"], example[f"{prefix}loss_mask"]
    assert len(ids) == len(mask)
    return tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m])


# --------------------------------------------------------------------------- loading


def test_load_records_from_every_file_type(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in SFT) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(SFT))
    (tmp_path / "c.json").write_text(json.dumps({"prompt": [r["prompt"] for r in SFT],
                                                 "completion": [r["completion"] for r in SFT]}))
    datasets.Dataset.from_list(SFT).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT)}).save_to_disk(str(tmp_path / "e"))
    for name in ("a.jsonl", "b.json", "c.json", "d.parquet", "e"):
        assert load_records(str(tmp_path / name)) == SFT, name
    assert load_records(SFT) == SFT and load_records(SFT) is not SFT


def test_load_records_errors_name_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_records(str(bad))
    (tmp_path / "x.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match=r"x.csv: unsupported file type '.csv'"):
        load_records(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="record 1 must be a dict"):
        load_records([{"prompt": "a"}, "b"])
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"Could not load dataset 'org/name'.*Couldn't reach the Hub"):
        load_records("org/name")


def test_non_utf8_bytes_are_reported_with_file_line_and_column(tmp_path):
    """Issue 13, case 11: the error named a position inside an internal read chunk, no file or line."""
    good = json.dumps(SFT[0]).encode()
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl: line 3, column 16: not UTF-8 \(byte 0xe9\)"):
        load_records(str(jsonl))
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[\n" + good + b",\n" + b'{"prompt": "\xff", "completion": "x"}\n]')
    with pytest.raises(ValueError, match=r"latin1.json: line 3, column 13: not UTF-8 \(byte 0xff\)"):
        load_records(str(array))


def test_json_syntax_errors_name_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]')
    with pytest.raises(ValueError, match=r"bad.json: line 3, column 14: not valid JSON \(Expecting value\)"):
        load_records(str(bad))
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "completion": "b"}\n["not", "a", "record"]\n')
    with pytest.raises(ValueError, match=r"list.jsonl: line 2 is a JSON list, not an object"):
        load_records(str(tmp_path / "list.jsonl"))


def test_validation_errors_of_a_jsonl_file_name_its_line(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(SFT[0]) + "\n\n\n" + json.dumps({"prompt": "x"}) + "\n")
    records = load_records(str(path))
    with pytest.raises(ValueError, match=r"gaps.jsonl: line 4 \(record 1\) has no column 'completion'"):
        validate_records(records, "sft", source=str(path))


def test_a_directory_that_is_not_a_dataset_is_refused_without_writing_a_cache(tmp_path, monkeypatch):
    """Issue 13, case 11: a directory holding no dataset ended in a `datasets` traceback (or was
    read as a text dataset), and `datasets` wrote a cache under the home directory."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "hf" / "datasets"))
    for name, files in (("empty", {}), ("notes", {"README.txt": "hello", "model.bin": "x"})):
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: not a dataset directory: no datasets.save_to_disk files "
                                             r"\(dataset_info.json / dataset_dict.json\) and no .jsonl, .json or "
                                             r".parquet file"):
            load_records(str(folder))
    # a folder of data files is read by fastrlhf itself: by split name, else every file is "train"
    split = tmp_path / "split"
    (split / "data").mkdir(parents=True)
    (split / "data" / "train.jsonl").write_text(json.dumps(SFT[0]) + "\n")
    (split / "data" / "test.jsonl").write_text(json.dumps(SFT[1]) + "\n")
    assert load_records(str(split)) == [SFT[0]]
    assert load_records(str(split), split="test") == [SFT[1]]
    with pytest.raises(ValueError, match=r"no 'validation' split \(files for: test, train\)"):
        load_records(str(split), split="validation")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.jsonl").write_text(json.dumps(SFT[0]) + "\n")
    (plain / "b.jsonl").write_text(json.dumps(SFT[1]) + "\n")
    assert load_records(str(plain)) == SFT
    assert not home.exists()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kind, records, message",
    [
        ("sft", [], r"data.jsonl: the dataset is empty"),
        ("sft", [SFT[0], {"prompt": "x"}], r"data.jsonl: record 1 has no column 'completion'"),
        ("sft", [{"body": "x"}], r"no column 'prompt'.*'prompt' and 'completion', or 'messages', or 'text'"),
        ("sft", [{"text": ""}], r"record 0, column 'text' must be a non-empty string"),
        ("sft", [{"messages": [{"role": "user", "content": "x"}]}], r"record 0, column 'messages': no assistant"),
        ("sft", [{"messages": [{"role": "user"}]}], r"column 'messages': message 0 must be a dict"),
        ("sft", [{"prompt": 3, "completion": "x"}], r"column 'prompt' must be a string or a list of messages"),
        ("preference", [{"prompt": "p", "chosen": "a"}], r"record 0 has no column 'rejected'"),
        ("preference", [{"chosen": "a", "rejected": "b"}], r"record 0 has no column 'prompt'"),
        ("prompt", [{"question": "q"}], r"record 0 has no column 'prompt'"),
        ("dpo", SFT, r"kind must be one of"),
    ],
)
def test_validation_errors_name_source_record_and_column(kind, records, message):
    with pytest.raises(ValueError, match=message):
        validate_records(records, kind, source="data.jsonl")


# --------------------------------------------------------------------------- tokenisation


def test_sft_loss_mask_covers_exactly_the_completion(tok):
    examples = tokenize_sft(SFT, tok, max_length=64)
    assert trained_tokens(tok, examples[0]) == ["paris", "<|im_end|>"]
    assert trained_tokens(tok, examples[1]) == ["yes", "yes", "<|im_end|>"]
    # the untrained part is exactly the prompt rendered with the generation prompt
    prompt_ids = tokenize_prompts([SFT[0]], tok, max_prompt_length=64)[0]["input_ids"]
    n = len(prompt_ids)
    assert examples[0]["input_ids"][:n] == prompt_ids and not any(examples[0]["loss_mask"][:n])


def test_sft_messages_train_every_assistant_turn_only(tok):
    record = {"messages": [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "count to three"},
        {"role": "assistant", "content": "one two three"},
    ]}
    (example,) = tokenize_sft([record], tok, max_length=64)
    assert trained_tokens(tok, example) == ["hi", "<|im_end|>", "one", "two", "three", "<|im_end|>"]
    full = tok.apply_chat_template(record["messages"], tokenize=False)
    assert example["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]


def test_conversational_prompt_completion_and_no_template_fallback(tok):
    record = {"prompt": [{"role": "user", "content": "say yes"}], "completion": [{"role": "assistant", "content": "yes"}]}
    (example,) = tokenize_sft([record], tok, max_length=64)
    assert trained_tokens(tok, example) == ["yes", "<|im_end|>"]
    plain = tiny_tokenizer(chat_template=False)
    (example,) = tokenize_sft([SFT[0]], plain, max_length=64)
    assert plain.convert_ids_to_tokens(example["input_ids"]) == ["what", "is", "the", "capital", "of", "france", "?",
                                                                 "paris", "<|im_end|>"]
    assert example["loss_mask"] == [0] * 7 + [1, 1]
    with pytest.raises(ValueError, match="chat template"):
        tokenize_sft([record], plain, max_length=64)


def test_template_that_is_not_prefix_consistent_falls_back_with_a_warning():
    tokenizer = tiny_tokenizer()
    # the generation prompt says "assistant :" but a rendered assistant turn says "assistant" only
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant :\n' }}"
    )
    import fastrlhf.data as data

    data._prefix_warned = False
    with pytest.warns(UserWarning, match="prefix-consistently"):
        (example,) = tokenize_sft([SFT[0]], tokenizer, max_length=64)
    assert trained_tokens(tokenizer, example) == ["paris", "<|im_end|>"]


def test_truncation_is_counted_warned_and_empty_examples_dropped(tok):
    records = SFT + [{"prompt": "one two three four five six seven eight nine ten", "completion": "ok"}]
    with pytest.warns(UserWarning, match=r"train.jsonl: 2 of 3 sequences were longer than max_length=13 .*"
                                         r"1 had no completion token left and were dropped"):
        examples = tokenize_sft(records, tok, max_length=13, source="train.jsonl")
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 13 for e in examples)
    assert trained_tokens(tok, examples[0]) == ["paris"]  # cut before its <|im_end|>
    with pytest.raises(ValueError, match="no example has a completion token"):
        with pytest.warns(UserWarning):
            tokenize_sft(records[2:], tok, max_length=8)


def test_preferences_explicit_and_implicit_prompt(tok):
    explicit = {"prompt": "say yes", "chosen": "yes", "rejected": "no no"}
    implicit = {
        "chosen": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "no no"}],
    }
    a, b = tokenize_preferences([explicit, implicit], tok, max_length=64)
    assert a == b
    assert trained_tokens(tok, a, "chosen_") == ["yes", "<|im_end|>"]
    assert trained_tokens(tok, a, "rejected_") == ["no", "no", "<|im_end|>"]


def test_identical_chosen_and_rejected_pairs_are_counted_warned_and_dropped_on_request(tok):
    """Issue 13, case 9: pairs with chosen == rejected (loss log 2, zero gradient, coin-flip
    accuracy) were accepted without a word."""
    pairs = [{"prompt": "say yes", "chosen": "yes", "rejected": "no"},
             {"prompt": "say no", "chosen": "no", "rejected": "no"},
             {"prompt": "the cat is", "chosen": "big . the dog", "rejected": "big . the cat"}]
    with pytest.warns(UserWarning, match=r"pairs.jsonl: 1 of 3 pairs have chosen == rejected .*drop_identical_pairs"):
        kept = tokenize_preferences(pairs, tok, max_length=64, source="pairs.jsonl")
    assert len(kept) == 3
    with pytest.warns(UserWarning, match=r"pairs.jsonl: 1 of 3 pairs have chosen == rejected .*dropped"):
        kept = tokenize_preferences(pairs, tok, max_length=64, source="pairs.jsonl", drop_identical=True)
    assert [trained_tokens(tok, e, "chosen_")[0] for e in kept] == ["yes", "big"]
    # equal only after truncation to max_length: the same zero gradient
    with pytest.warns(UserWarning, match=r"2 of 3 pairs have chosen == rejected "
                                         r"\(identical tokens after truncation to max_length=11"):
        tokenize_preferences(pairs, tok, max_length=11, source="pairs.jsonl")


def test_prompts_keep_fields_and_the_generation_prompt_when_truncated(tok):
    records = [{"prompt": "say yes", "target": "yes"}, {"prompt": "one two three four five six seven eight nine"}]
    with pytest.warns(UserWarning, match=r"1 of 2 prompts were longer than max_prompt_length=8"):
        short, long = tokenize_prompts(records, tok, max_prompt_length=8)
    assert short["target"] == "yes" and short["prompt"] == "say yes"
    assert short["prompt_text"].endswith("<|im_start|>assistant\n")
    assert len(long["input_ids"]) == 8
    assert tok.convert_ids_to_tokens(long["input_ids"][-2:]) == ["<|im_start|>", "assistant"]


# --------------------------------------------------------------------------- collators


def test_eos_ids_join_the_tokenizer_and_the_generation_config():
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(eos_token_id=2)
    assert eos_token_ids(tokenizer) == [2]
    assert eos_token_ids(tokenizer, SimpleNamespace(eos_token_id=[7, 2])) == [2, 7]  # a list, one id twice
    assert eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=5)) == [5]
    with pytest.raises(ValueError, match="no eos_token"):
        eos_token_ids(SimpleNamespace(eos_token_id=None), SimpleNamespace(eos_token_id=None))


def test_collators_pad_on_the_right_side(tok):
    sft = collate_sft(tokenize_sft(SFT, tok, max_length=64), tok.pad_token_id)
    assert set(sft) == {"input_ids", "attention_mask", "loss_mask"}
    assert sft["input_ids"].dtype == torch.long and sft["input_ids"].shape == sft["loss_mask"].shape
    lengths = sft["attention_mask"].sum(1)
    assert (sft["attention_mask"][0, : lengths[0]] == 1).all() and (sft["attention_mask"][0, lengths[0]:] == 0).all()
    assert (sft["loss_mask"] <= sft["attention_mask"]).all()
    assert (sft["input_ids"][sft["attention_mask"] == 0] == tok.pad_token_id).all()

    pairs = tokenize_preferences([{"prompt": "say yes", "chosen": "yes", "rejected": "no no no"},
                                  {"prompt": "hi", "chosen": "hello", "rejected": "bye"}], tok, max_length=64)
    pref = collate_preferences(pairs, tok.pad_token_id)
    assert pref["input_ids"].shape[0] == 4
    for i, pair in enumerate(pairs):
        for row, side in ((i, "chosen"), (i + 2, "rejected")):
            n = len(pair[f"{side}_input_ids"])
            assert pref["input_ids"][row, :n].tolist() == pair[f"{side}_input_ids"]
            assert pref["loss_mask"][row, :n].tolist() == pair[f"{side}_loss_mask"]

    prompts = collate_prompts(tokenize_prompts(SFT, tok, max_prompt_length=64), tok.pad_token_id)
    assert set(prompts) == {"input_ids", "attention_mask"}
    assert (prompts["attention_mask"][:, -1] == 1).all()  # left-padded: every row ends with a real token
    assert prompts["attention_mask"][1, 0] == 0


@pytest.mark.slow
def test_real_smollm2_template_masks_only_the_answer():
    from fastrlhf.models import default_model_source

    try:
        directory, gguf = default_model_source()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    record = {"prompt": "What is the capital of France?", "completion": "Paris."}
    (example,) = tokenize_sft([record], tokenizer, max_length=256)
    trained = tokenizer.decode([i for i, m in zip(example["input_ids"], example["loss_mask"]) if m])
    assert trained.startswith("Paris.<|im_end|>")
    assert "You are a helpful AI assistant" in tokenizer.decode(example["input_ids"])  # default system prompt


# --------------------------------------------------------------------------- issue 12: TRL's {"text"}, packing, max_prompt_length


def test_text_records_train_every_token_and_end_with_eos(tok):
    (example,) = tokenize_sft([{"text": "the cat is big"}], tok, max_length=32)
    ids = tok("the cat is big")["input_ids"]
    assert example["input_ids"] == ids + [tok.eos_token_id]
    assert example["loss_mask"] == [1] * (len(ids) + 1)


def test_packing_concatenates_examples_into_full_rows(tok):
    examples = tokenize_sft([{"text": "the cat is big"}, {"text": "say yes or no ."}] * 3, tok, max_length=64)
    stream = [t for e in examples for t in e["input_ids"]]
    mask = [m for e in examples for m in e["loss_mask"]]
    rows = pack_examples(examples, 8)
    assert all(len(r["input_ids"]) == 8 for r in rows[:-1])
    assert [t for r in rows for t in r["input_ids"]] == stream[: sum(len(r["input_ids"]) for r in rows)]
    assert [m for r in rows for m in r["loss_mask"]] == mask[: len([m for r in rows for m in r["loss_mask"]])]
    assert len(stream) - sum(len(r["input_ids"]) for r in rows) < 2  # only a 1-token tail (nothing to predict) is left
    prompt_only = tokenize_sft([SFT[0]], tok, max_length=64)
    rows = pack_examples(prompt_only, 2)  # rows of prompt tokens only train nothing: dropped
    assert rows and all(any(r["loss_mask"][1:]) for r in rows)


@pytest.mark.parametrize("chat", [True, False])
def test_a_long_prompt_keeps_its_pair_and_its_end(chat):
    tok = tiny_tokenizer(chat_template=chat)
    long_prompt = " ".join(["the cat is big ."] * 20)  # 100 words, far over max_length
    record = {"prompt": long_prompt + " say yes", "chosen": "yes", "rejected": "no"}
    with pytest.warns(UserWarning, match="prompts were longer"):
        (pair,) = tokenize_preferences([record], tok, max_length=16)
    for side, answer in (("chosen", "yes"), ("rejected", "no")):
        ids, mask = pair[f"{side}_input_ids"], pair[f"{side}_loss_mask"]
        assert len(ids) <= 16 and any(mask)
        completion = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
        assert completion.strip() == answer
        assert "say" in tok.decode(ids)  # the END of the prompt is kept
    # an explicit max_prompt_length cuts every longer prompt (TRL's keep_end), even when the pair fits
    short = {"prompt": "the cat is big . say yes", "chosen": "yes", "rejected": "no"}
    (full,) = tokenize_preferences([short], tok, max_length=64)
    with pytest.warns(UserWarning, match="max_prompt_length=3"):
        (cut,) = tokenize_preferences([short], tok, max_length=64, max_prompt_length=3)
    prompt_len = cut["chosen_loss_mask"].index(1)
    assert prompt_len == 3 and cut["chosen_input_ids"] == full["chosen_input_ids"][full["chosen_loss_mask"].index(1) - 3:]
