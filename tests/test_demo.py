"""The built-in demo task: prompts parse back to their constraints, the gold reward scores exactly the
fraction of constraints met, and the demonstrations leave room for improvement."""
from __future__ import annotations

import random

import pytest

from fastrlhf import demo


def test_prompt_round_trip():
    constraints = [("max_words", 9), ("end_word", "blue"), ("include_word", "gold"), ("lowercase", True),
                   ("no_commas", True)]
    prompt = demo.make_prompt("coffee", constraints)
    topic, parsed = demo.parse_prompt(prompt)
    assert topic == "coffee"
    assert sorted(parsed) == sorted(constraints)


@pytest.mark.parametrize("answer, expected", [
    ("i love coffee and gold like blue.", 1.0),                      # all five met (7 words)
    ("I love coffee and gold like blue.", 0.8),                      # capital letter
    ("i love coffee, and gold like blue.", 0.8),                     # comma
    ("i love coffee and gold like blue every day.", 0.8),            # last word is not "blue"
    ("i love coffee and gold like blue and more and more.", 0.6),    # too long (11 words) and wrong end
    ("i love coffee like blue.", 0.8),                               # "gold" missing
    ("i love tea and gold like blue.", 0.0),                         # off topic
    ("coffee blue", 0.0),                                            # fewer than three words
    ("", 0.0),
])
def test_gold_reward_is_the_fraction_of_constraints_met(answer, expected):
    prompt = demo.make_prompt("coffee", [("max_words", 9), ("end_word", "blue"), ("include_word", "gold"),
                                         ("lowercase", True), ("no_commas", True)])
    assert demo.gold_reward(prompt, answer) == pytest.approx(expected)


def test_gold_reward_fn_batch_signature_and_chat_prompts():
    prompt = demo.make_prompt("the moon", [("lowercase", True), ("max_words", 8)])
    chat = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "hi"}, {"role": "user", "content": prompt}]
    answers = ["the moon is bright tonight.", "The moon is bright tonight and every night after that."]
    assert demo.gold_reward_fn([prompt, prompt], answers, [{}, {}]) == [1.0, 0.0]
    assert demo.gold_reward_fn([chat, messages], answers) == [1.0, 0.0]


def test_prompts_are_reproducible_and_splits_disjoint():
    assert demo.prompts(20, seed=3) == demo.prompts(20, seed=3)
    assert demo.prompts(20, seed=3) != demo.prompts(20, seed=4)
    train = {demo.parse_prompt(r["prompt"])[0] for r in demo.prompts(300, split="train")}
    held_out = {demo.parse_prompt(r["prompt"])[0] for r in demo.prompts(300, split="eval")}
    assert train and held_out and not train & held_out
    for record in demo.prompts(50):
        assert 3 <= len(demo.parse_prompt(record["prompt"])[1]) <= 4
    with pytest.raises(ValueError, match="split"):
        demo.prompts(2, split="test")


def test_demonstrations_are_on_topic_and_half_right():
    records = demo.demonstrations(400, seed=0)
    gold = [demo.gold_reward(r["prompt"], r["completion"]) for r in records]
    assert all(demo._topic_stem(demo.parse_prompt(r["prompt"])[0]) in r["completion"].lower() for r in records)
    assert 0.35 < demo.mean(gold) < 0.65          # decent but imperfect: room for RL / DPO
    assert sum(g == 1.0 for g in gold) > 40       # and the good behaviour is in the data
    rates = demo.constraint_rates([r["prompt"] for r in records], [r["completion"] for r in records])
    assert set(rates) == set(demo.CONSTRAINT_KINDS)
    assert all(0.2 < rate < 0.8 for rate in rates.values()), rates
    # p_follow=1 gives answers that meet every constraint
    rng = random.Random(0)
    perfect = [demo.demonstration(r["prompt"], rng, p_follow=1.0) for r in demo.prompts(100)]
    assert demo.mean(demo.gold_reward(r["prompt"], a) for r, a in zip(demo.prompts(100), perfect)) > 0.9


def test_conversational_prompts_keep_the_same_task():
    plain = demo.prompts(5, seed=1)
    chat = demo.prompts(5, seed=1, system="Be brief.")
    assert chat[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert [demo.prompt_text(r["prompt"]) for r in chat] == [r["prompt"] for r in plain]
    answer = "i love maps and gold like blue."
    assert all(demo.gold_reward(c["prompt"], answer) == demo.gold_reward(p["prompt"], answer) for c, p in zip(chat, plain))
    demos = demo.demonstrations(3, seed=2, system="Be brief.")
    assert demos[0]["prompt"][1]["role"] == "user" and isinstance(demos[0]["completion"], str)
