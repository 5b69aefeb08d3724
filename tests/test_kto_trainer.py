"""KTO trainer on a tiny random Llama (CPU, torch backend): unpaired data and its checks, the KL rows
built as TRL builds them, the loss equal to TRL's on a real batch, a toy task on which KTO raises a
gold preference the data never states as a pair, --no-lora with precomputed reference log-probs,
exact resume, and `python -m fastrlhf.train kto`."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_kto import trl_kto
from test_trainers import make_model, read_metrics, train_losses

import fastrlhf
from fastrlhf.testing import tiny_tokenizer


@pytest.fixture(autouse=True)
def _torch_backend_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with fastrlhf.use_backend("torch"):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


PROMPTS = ["say a word", "answer the question", "what is the sun", "say hello", "count to two", "which city"]
WORDS = ["cat", "dog", "sun", "moon", "fish", "bird"]
# Unpaired: each prompt has ONE labelled completion; desirable ones start with "good", undesirable
# ones with "bad". The gold preference (good x over bad x, for any prompt and word) is never shown as a pair.
UNPAIRED = ([{"prompt": p, "completion": f"good {w}", "label": True} for p, w in zip(PROMPTS[::2], WORDS[::2])]
            + [{"prompt": p, "completion": f"bad {w}", "label": False} for p, w in zip(PROMPTS[1::2], WORDS[1::2])]
            + [{"prompt": p, "completion": f"good {w}", "label": True} for p, w in zip(PROMPTS[1::2], WORDS[::2])]
            + [{"prompt": p, "completion": f"bad {w}", "label": False} for p, w in zip(PROMPTS[::2], WORDS[1::2])])


def kto_config(tmp_path, name="kto", **overrides):
    from fastrlhf.trainers.kto import KTOConfig

    options = dict(output_dir=str(tmp_path / name), learning_rate=1e-2, batch_size=6, max_steps=10,
                   lr_schedule="constant", progress=False, beta=0.5)
    options.update(overrides)
    return KTOConfig(**options)


@torch.no_grad()
def gold_preference(model, tok, role="policy"):
    """(accuracy, mean margin) over every prompt x word: how often, and by how much, `role` gives
    "good <word>" a higher log-prob than "bad <word>" (36 pairs, 30 of them never in the data)."""
    from fastrlhf.data import collate_preferences, tokenize_preferences

    records = [{"prompt": p, "chosen": f"good {w}", "rejected": f"bad {w}"} for p in PROMPTS for w in WORDS]
    batch = collate_preferences(tokenize_preferences(records, tok, max_length=64), tok.pad_token_id)
    logps = model.token_logprobs(role, batch["input_ids"], batch["attention_mask"])
    chosen, rejected = fastrlhf.sequence_logps(logps, batch["loss_mask"][:, 1:]).chunk(2)
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "p", "completion": "c"}], r"record 0 has no column 'label'"),
    ([{"prompt": "p", "completion": "c", "label": 1}], r"record 0, column 'label' must be true .* got 1"),
    ([{"prompt": "p", "completion": "c", "label": "true"}], r"column 'label' must be true"),
    ([{"prompt": "p", "label": True}], r"has no column 'completion'.*'prompt', 'completion' and 'label'"),
    ([{"prompt": "p", "completion": 3, "label": True}], r"column 'completion' must be a string or a list"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}], r"has no column 'completion'"),
])
def test_unpaired_data_errors_name_record_and_column(records, message):
    from fastrlhf.data import validate_records

    with pytest.raises(ValueError, match=message):
        validate_records(records, "unpaired", source="data.jsonl")


def test_kl_rows_rotate_completions_within_each_batch_as_trl(tok, tmp_path):
    """TRL's add_kl_completion_ids: within each batch-sized group, (x_i, y_i) -> KL row (x_i, y_{i-1}),
    the first taking the last; a group of one takes the completion before it. The groups are the
    training batches, so every batch's KL completions are its own completions."""
    from fastrlhf.data import _encode, add_kl_rows, tokenize_unpaired
    from fastrlhf.trainers.kto import KTOTrainer

    records = UNPAIRED[:7]
    examples = tokenize_unpaired(records, tok, max_length=64)
    assert all("kl_input_ids" not in e for e in examples)
    add_kl_rows(examples, tok, group_size=3, max_length=64)
    expected_partner = [2, 0, 1, 5, 3, 4, 5]  # groups [0 1 2] [3 4 5] [6]
    for i, (example, partner) in enumerate(zip(examples, expected_partner)):
        ids, mask = _encode(tok, records[i]["prompt"], records[i]["completion"])
        assert example["input_ids"] == ids and example["loss_mask"] == mask
        assert example["label"] is records[i]["label"]
        kl_ids, kl_mask = _encode(tok, records[i]["prompt"], records[partner]["completion"])
        assert example["kl_input_ids"] == kl_ids and example["kl_loss_mask"] == kl_mask
    with pytest.raises(ValueError, match="at least 2 examples"):
        add_kl_rows(tokenize_unpaired(records[:1], tok, max_length=64), tok, group_size=3, max_length=64)

    trainer = KTOTrainer(make_model(tok), tok, kto_config(tmp_path, batch_size=3, max_steps=0, epochs=2,
                                                           eval_batch_size=2), records, eval_records=records[:4])
    assert trainer.total_steps == 6  # 3 batches per epoch
    # training groups of batch_size, evaluation groups of eval_batch_size
    assert trainer.train_examples[0]["kl_input_ids"] == _encode(tok, records[0]["prompt"], records[2]["completion"])[0]
    assert trainer.eval_examples[0]["kl_input_ids"] == _encode(tok, records[0]["prompt"], records[1]["completion"])[0]
    trainer.data.start()
    seen = []
    def completion(ids, mask):
        return tuple(t for t, m in zip(ids, mask) if m)

    for batch in trainer.next_batches(6):
        completions = sorted(completion(e["input_ids"], e["loss_mask"]) for e in batch)
        kl_completions = sorted(completion(e["kl_input_ids"], e["kl_loss_mask"]) for e in batch)
        assert completions == kl_completions or len(batch) == 1
        seen.append(tuple(id(e) for e in batch))
    assert sorted(seen[:3]) == sorted(seen[3:])  # the same groups in both epochs ...
    assert seen[:3] != seen[3:]  # ... in a new order


def test_trainer_loss_equals_trl_on_a_real_batch(tok, tmp_path):
    """compute_loss on a collated batch == TRL's formula on the same sequence log-probs (the matched
    rows, their reference, and the KL rows under policy and reference)."""
    from fastrlhf.trainers.kto import KTOTrainer

    model = make_model(tok)
    config = kto_config(tmp_path, desirable_weight=1.3, undesirable_weight=0.8)
    trainer = KTOTrainer(model, tok, config, UNPAIRED)
    batch = trainer.collate(trainer.train_examples[:6])
    # Move the policy off the reference, towards the batch's texts: every term is then non-trivial and
    # the KL rows' mean log-ratio positive (z0 > 0, the clamp inactive; tests/test_kto.py covers it).
    optimizer = torch.optim.Adam(model.trainable_parameters("policy"), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        (-trainer.sequence_logps("policy", batch).sum()).backward()
        optimizer.step()
    assert batch["input_ids"].shape[0] == 12 and batch["label"].tolist() == [e["label"] for e in UNPAIRED[:6]]
    loss, metrics = trainer.compute_loss(batch)

    with torch.no_grad():
        logps = {role: fastrlhf.sequence_logps(model.token_logprobs(role, batch["input_ids"], batch["attention_mask"]),
                                               batch["loss_mask"][:, 1:]) for role in ("policy", "reference")}
    trl_loss, trl_metrics = trl_kto(logps["policy"][:6], logps["reference"][:6], batch["label"], logps["policy"][6:],
                                    logps["reference"][6:], beta=0.5, desirable_weight=1.3, undesirable_weight=0.8,
                                    loss_type="kto")
    assert trl_metrics["kl"] > 0
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for name, value in trl_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


# --------------------------------------------------------------------------- training


def test_kto_raises_the_gold_preference(tok, tmp_path):
    """The toy task: KTO on unpaired labels makes the policy prefer "good <word>" to "bad <word>" on
    every prompt x word (30 of the 36 pairs never appear in the data), which the reference does not."""
    from fastrlhf.trainers.kto import KTOTrainer

    model = make_model(tok)
    ref_accuracy, ref_margin = gold_preference(model, tok, "reference")
    config = kto_config(tmp_path, eval_steps=5)
    summary = KTOTrainer(model, tok, config, UNPAIRED, eval_records=UNPAIRED[:6]).train()
    records = [r for r in read_metrics(config.output_dir) if "loss" in r]
    accuracy, margin = gold_preference(model, tok, "policy")
    assert ref_accuracy < 0.75 and accuracy == 1.0
    assert margin > ref_margin + 1.0, (ref_margin, margin)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    assert records[0]["rewards/margins"] == 0.0 and records[0]["kl"] == 0.0  # step 1: policy == reference
    assert records[-1]["rewards/chosen"] > 0 > records[-1]["rewards/rejected"]
    assert max(r["kl"] for r in records) > 0  # z0 moved off 0 once the policy did
    assert records[0]["count/chosen"] + records[0]["count/rejected"] == 6
    assert "eval/kl" in summary["eval"] and summary["eval"]["eval/rewards/margins"] > 0


def test_apo_zero_unpaired_has_no_kl_rows_and_learns(tok, tmp_path):
    from fastrlhf.trainers.kto import KTOTrainer

    model = make_model(tok)
    config = kto_config(tmp_path, loss_type="apo_zero_unpaired", batch_size=1, max_steps=12)  # batch 1 is fine here
    trainer = KTOTrainer(model, tok, config, UNPAIRED)
    assert "kl_input_ids" not in trainer.train_examples[0]
    assert trainer.collate(trainer.train_examples[:3])["input_ids"].shape[0] == 3
    trainer.train()
    records = read_metrics(config.output_dir)
    assert all(r["kl"] == 0.0 for r in records)
    assert gold_preference(model, tok)[0] > gold_preference(model, tok, "reference")[0]


def test_without_lora_precomputes_reference_once_and_resumes_from_it(tok, tmp_path):
    """--no-lora: no reference copy at all; the matched and KL rows' reference log-probs are computed
    from the untrained policy before step 1 and travel with the checkpoints (a resumed run could not
    compute them again: its policy is trained, and _precompute raises then)."""
    from fastrlhf.trainers.kto import KTOTrainer

    config = kto_config(tmp_path, learning_rate=1e-3, batch_size=3, max_steps=4, save_steps=2)
    trainer = KTOTrainer(make_model(tok, use_lora=False, with_reference=False), tok, config, UNPAIRED)
    trainer.train()
    assert all("ref_logps" in e and "ref_kl_logps" in e for e in trainer.train_examples)
    records = read_metrics(config.output_dir)
    assert records[0]["kl"] == 0.0 and records[-1]["rewards/margins"] > 0
    state = torch.load(Path(config.output_dir) / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["kto_ref_logps"] == [[e["ref_logps"], e["ref_kl_logps"]] for e in trainer.train_examples]

    resumed = KTOTrainer(make_model(tok, use_lora=False, with_reference=False), tok,
                         type(config)(**{**config.to_dict(), "resume": str(Path(config.output_dir) / "checkpoint-2")}),
                         UNPAIRED)
    resumed.train()
    assert train_losses(config.output_dir) == pytest.approx([r["loss"] for r in records], rel=1e-5)


def test_resume_mid_epoch_repeats_the_uninterrupted_run(tok, tmp_path):
    """LoRA, reference role every step, 2 epochs of shuffled batch groups: resumed from checkpoint-4
    (inside epoch 2) the run repeats steps 5 and 6 exactly (data position, RNG, Adam)."""
    from fastrlhf.trainers.kto import KTOTrainer

    common = dict(batch_size=3, max_steps=0, epochs=2, save_steps=2)
    full = kto_config(tmp_path, "full", **common)
    KTOTrainer(make_model(tok), tok, full, UNPAIRED[:7]).train()
    expected = read_metrics(full.output_dir)
    assert len(expected) == 6

    cut = kto_config(tmp_path, "cut", **common, resume="auto")
    Path(cut.output_dir).mkdir()
    shutil.copytree(Path(full.output_dir) / "checkpoint-4", Path(cut.output_dir) / "checkpoint-4")
    KTOTrainer(make_model(tok, init_seed=1), tok, cut, UNPAIRED[:7]).train()
    resumed = read_metrics(cut.output_dir)
    assert [r["step"] for r in resumed] == [5, 6]
    for a, b in zip(expected[4:], resumed):
        assert a["loss"] == b["loss"] and a["kl"] == b["kl"]

    # another batch size would make other groups (and KL rows): refused, naming the saved batch size
    from fastrlhf.trainers.data_stream import DataPositionError

    other = kto_config(tmp_path, "other", **dict(common, batch_size=2), resume="auto")
    Path(other.output_dir).mkdir()
    shutil.copytree(Path(full.output_dir) / "checkpoint-4", Path(other.output_dir) / "checkpoint-4")
    with pytest.raises(DataPositionError, match="batch_size=3"):
        KTOTrainer(make_model(tok), tok, other, UNPAIRED[:7]).train()


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("option, value, message", [
    ("beta", 0.0, "beta"), ("loss_type", "sigmoid", "loss_type"), ("desirable_weight", -1.0, "desirable_weight"),
    ("undesirable_weight", float("inf"), "undesirable_weight"), ("batch_size", 1, "batch_size must be >= 2"),
])
def test_bad_options_name_the_option(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        kto_config(tmp_path, **{option: value})


def test_unbalanced_classes_warn_with_the_papers_weight_range(tok, tmp_path):
    from fastrlhf.trainers.kto import KTOTrainer

    records = UNPAIRED[:6] + [r for r in UNPAIRED[6:] if r["label"]]  # 6 desirable, 3 undesirable
    with pytest.warns(UserWarning, match=r"eq. 8.*desirable_weight = 0.5"):
        KTOTrainer(make_model(tok), tok, kto_config(tmp_path), records)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        KTOTrainer(make_model(tok), tok, kto_config(tmp_path, desirable_weight=0.6), records)  # 6 x 0.6 / 3 = 1.2


# --------------------------------------------------------------------------- command line


def test_kto_from_the_command_line(tmp_path, capsys):
    from fastrlhf.testing import save_tiny_model
    from fastrlhf.train import main

    save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in UNPAIRED))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")

    def run(*argv):
        try:
            return main([str(a) for a in argv])
        except SystemExit as exit_:
            return exit_.code

    common = ["--model", tmp_path / "tiny", "--batch-size", 2, "--max-steps", 2, "--no-progress"]
    assert run("kto", "--data", data, "--output-dir", tmp_path / "out", "--desirable-weight", 1.2, *common) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["trainer"] == "KTOTrainer" and summary["steps"] == 2 and "kl" in summary["metrics"]
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert run("kto", "--data", pairs, "--output-dir", tmp_path / "bad", *common) == 2
    assert "--data:" in capsys.readouterr().err
    assert run("kto", "--data", data, "--loss-type", "ipo", *common) == 2
    assert "--loss-type: loss_type must be one of ('kto', 'apo_zero_unpaired')" in capsys.readouterr().err
    assert run("kto", "--help") == 0
    out = capsys.readouterr().out
    assert '"label": true | false' in out and "python -m fastrlhf.train kto" in out


# --------------------------------------------------------------------------- two processes

HERE = Path(__file__).resolve()


def test_two_processes_share_one_reference_point(tmp_path):
    """2 gloo ranks, each its own batch group: z0 is the clamped mean over BOTH ranks' KL rows (the
    same value on both ranks), not each rank's own. The policy starts nudged towards the data's texts,
    so the KL rows' log-ratios are positive and the clamp does not hide a wrong mean."""
    from test_distributed import child_output, run_torchrun

    result = run_torchrun([str(HERE), str(tmp_path)], timeout=300)
    assert result.returncode == 0, child_output(result)
    ranks = [json.loads((tmp_path / f"kl-rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # one kto_kl call per step
    for a, b in zip(*ranks):
        assert a["n"] == b["n"] == 3 and a["sum"] != b["sum"]  # different KL rows on each rank
        assert a["kl"] == b["kl"] > 0
        assert a["kl"] == pytest.approx((a["sum"] + b["sum"]) / 6, rel=1e-5)


def _scenario_two_ranks(out: str) -> None:
    from fastrlhf.distributed import DistContext
    from fastrlhf.trainers.kto import KTOConfig, KTOTrainer

    ctx = DistContext.from_env()
    tok = tiny_tokenizer()
    model = make_model(tok)
    config = KTOConfig(output_dir=out, learning_rate=1e-2, batch_size=3, max_steps=2, lr_schedule="constant",
                       progress=False, backend="torch", save_final=False)
    trainer = KTOTrainer(model, tok, config, UNPAIRED, ctx=ctx)
    batch = trainer.collate(trainer.train_examples)  # every example on both ranks: the same nudge
    optimizer = torch.optim.Adam(model.trainable_parameters("policy"), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        (-trainer.sequence_logps("policy", batch).sum()).backward()
        optimizer.step()
    optimizer.zero_grad()
    calls, real = [], fastrlhf.kto_kl

    def recording(policy_kl, ref_kl, **kwargs):
        kl = real(policy_kl, ref_kl, **kwargs)
        calls.append({"sum": (policy_kl - ref_kl).sum().item(), "n": policy_kl.shape[0], "kl": kl.item()})
        return kl

    fastrlhf.kto_kl = recording
    trainer.train()
    Path(out, f"kl-rank{ctx.rank}.json").write_text(json.dumps(calls))
    del trainer, model, optimizer, batch
    ctx.close()


if __name__ == "__main__":
    import sys

    _scenario_two_ranks(sys.argv[1])
