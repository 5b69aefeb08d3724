"""fp32 LoRA adapters over a bf16 base (fastrlhf._mixed_precision): no fp32 activation copies.

peft's default casts every LoRA layer's input to fp32 (a saved full-size copy per adapted linear);
RoleModel runs such forwards under bf16 autocast with that upcast off. Compared here against peft's
default path on the same model: the bytes autograd saves, the outputs and the adapter gradients.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import torch

from fastrlhf.roles import RoleModel
from fastrlhf.testing import tiny_llama


def _bf16_roles() -> RoleModel:
    base = tiny_llama(vocab_size=256, hidden_size=64, intermediate_size=256).to(torch.bfloat16)
    model = RoleModel(base, roles=("policy", "value"), lora_r=4)
    with torch.no_grad():  # lora_B starts at 0: make the adapters contribute
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def _policy_and_value_step(model: RoleModel, ids, mask):
    """Saved-tensor bytes by dtype, outputs and adapter gradients of one policy+value backward."""
    saved, seen = Counter(), set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            saved[t.dtype] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, values = model.token_logprobs_and_values(ids, mask)
    (logps.sum() + values.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.peft_model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return saved, logps.detach(), values.detach(), grads


def test_bf16_base_fp32_adapters_save_no_fp32_activation_copies():
    model = _bf16_roles()
    assert {p.dtype for n, p in model.peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(5, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding

    new = _policy_and_value_step(model, ids, mask)
    model._low_precision_forward = contextlib.nullcontext  # peft's default: upcast inside each layer
    old = _policy_and_value_step(model, ids, mask)

    # Measured here: 42.3 -> 27.7 MiB saved at hidden 128 (fp32 part 25.8 -> 4.6 MiB); the fp32
    # that stays is RMSNorm's own upcast, which does not depend on the adapters.
    assert sum(new[0].values()) < 0.8 * sum(old[0].values())
    assert new[0][torch.float32] < 0.4 * old[0][torch.float32]
    # Same function up to bf16 rounding of the LoRA branch.
    torch.testing.assert_close(new[1], old[1], atol=0.05, rtol=0.02)
    torch.testing.assert_close(new[2], old[2], atol=0.05, rtol=0.02)
    assert set(new[3]) == set(old[3]) and new[3]
    for name, grad in new[3].items():
        assert grad.dtype == torch.float32, name  # master weights and their gradients stay fp32
        assert (grad - old[3][name]).norm() <= 0.05 * old[3][name].norm() + 1e-6, name


def test_peft_flags_restored_and_generate_runs_on_a_bf16_base():
    model = _bf16_roles()
    ids = torch.randint(5, 250, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    model.token_logprobs("policy", ids, mask)
    assert all(layer.cast_input_dtype_enabled for layer in model._tuner_layers)
    assert not torch.is_autocast_enabled("cpu")
    out = model.generate(ids, mask, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 11)


def test_fp32_base_is_left_alone():
    model = RoleModel(tiny_llama(), roles=("policy",), lora_r=4)
    with model._low_precision_forward():
        assert not torch.is_autocast_enabled("cpu")
        assert all(layer.cast_input_dtype_enabled for layer in model._tuner_layers)
