"""RoleModel's module tree under both trunk strategies (fastrlhf.role_trunks).

Checkpoints, FSDP2 sharding (`apply_fsdp` shards the RoleModel's own submodules) and saved role files
all depend on these names, so they are compared with an independently built peft model / plain base:
the strategy object must stay outside the tree, and so must the no-LoRA reference copy.
"""
import pytest
import torch

from fastrlhf.role_trunks import FullTrunks, LoraTrunks
from fastrlhf.roles import RoleModel
from fastrlhf.testing import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ROLES = ("policy", "value", "reward")
# the reward head has no bias (like transformers' sequence-classification `score`: it exports as one)
HEAD_KEYS = ["heads.value.weight", "heads.value.bias", "heads.reward.weight"]


def test_lora_tree_is_the_heads_then_one_peft_model():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = RoleModel(tiny_llama(), roles=ROLES, lora_r=4)
    assert isinstance(model._trunks, LoraTrunks)
    assert [name for name, _ in model.named_children()] == ["heads", "peft_model"]

    config = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    plain = get_peft_model(tiny_llama(), config, adapter_name="policy")
    for role in ROLES[1:]:
        plain.add_adapter(role, config)
    assert list(model.state_dict()) == HEAD_KEYS + [f"peft_model.{k}" for k in plain.state_dict()]
    assert [n for n, _ in model.named_parameters()] == HEAD_KEYS + [
        f"peft_model.{n}" for n, _ in plain.named_parameters()]
    assert "peft_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.value.weight" in model.state_dict()
    # role files: peft's role-neutral adapter keys + the head
    adapter = {f"adapter.{k}" for k in get_peft_model_state_dict(plain, adapter_name="value")}
    assert set(model.role_state_dict("value")) == adapter | {"head.weight", "head.bias"}
    assert set(model.role_state_dict("policy")) == adapter


def test_full_tree_is_the_heads_then_the_trunks_and_never_the_reference():
    base = tiny_llama()
    keys, names = list(base.state_dict()), [n for n, _ in base.named_parameters()]
    model = RoleModel(base, roles=ROLES, use_lora=False)
    assert isinstance(model._trunks, FullTrunks)
    assert [name for name, _ in model.named_children()] == ["heads", "policy_lm", "reward_lm"]
    assert list(model.state_dict()) == HEAD_KEYS + [f"{t}.{k}" for t in ("policy_lm", "reward_lm") for k in keys]
    assert [n for n, _ in model.named_parameters()] == HEAD_KEYS + [
        f"{t}.{n}" for t in ("policy_lm", "reward_lm") for n in names]
    assert set(model.role_state_dict("policy")) == {f"trunk.{k}" for k in keys}
    assert set(model.role_state_dict("value")) == {"head.weight", "head.bias"}  # rides on the policy trunk
    assert set(model.role_state_dict("reward")) == {f"trunk.{k}" for k in keys} | {"head.weight"}

    reference = model.reference_copy
    assert reference is not None and not any(m is reference for m in model.modules())
    model.to(torch.float64)  # .to() of the RoleModel leaves the reference copy where it is
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
