"""Models without weights: built on the meta device from a config, then given fake tensors.

peft's `.to()` cannot move fake parameters (it swaps tensors, and a fake tensor refuses the weak
reference that needs), so everything is built and wrapped on the meta device first (peft adapters,
RoleModel heads, reference copies), and only then is every parameter and buffer replaced, in
place, by a `FakeTensor` on the CPU device (`fakeify`). Tied weights stay tied: a parameter shared
by two modules becomes one fake parameter. Small real tensors that a wrapper created on the CPU
(peft builds its adapters there) are converted too.

The fake device is "cpu", not "cuda": this PyTorch may be a CPU build, where autograd refuses
tensors of a device type without a registered device guard. `fastrlhf.planner.cuda` makes the code
under simulation take its CUDA decisions instead.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode


def new_fake_mode() -> FakeTensorMode:
    # Real inputs (a learning rate tensor, a constant) are converted on the fly.
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_causal_lm(config, dtype: torch.dtype, *, device: str = "meta", kind: str = "causal-lm", seed: int = 0):
    """`AutoModelForCausalLM` (or `AutoModelForSequenceClassification` with one label for
    kind="classifier", the value / reward model of TRL-style code) from `config`, in `dtype`, with
    sdpa attention, in eval mode: on the meta device (no memory), or real random weights (seeded)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "classifier":
        values = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        config = type(config).from_dict({**values, "num_labels": 1})
    with _default_dtype(dtype), torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
        model = cls.from_config(config, attn_implementation="sdpa")
    model.to(dtype)
    generation = getattr(model, "generation_config", None) if kind != "classifier" else None
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = 0
    return model.eval()


def build_meta_causal_lm(config, dtype: torch.dtype, *, kind: str = "causal-lm"):
    return build_causal_lm(config, dtype, device="meta", kind=kind)


def _to_fake(mode: FakeTensorMode, tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, FakeTensor):
        return tensor
    if tensor.is_meta:
        return FakeTensor(mode, tensor, torch.device("cpu"))
    return mode.from_tensor(tensor)


def fakeify(modules, mode: FakeTensorMode) -> dict[int, torch.Tensor]:
    """Replace every parameter and buffer of `modules` (and their submodules), in place, by a fake
    CPU tensor of the same shape, dtype and requires_grad; shared tensors stay shared.
    Returns {id(old tensor): new tensor}, to update lists that held the old parameters."""
    memo: dict[int, torch.Tensor] = {}
    for root in modules:
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(_to_fake(mode, param.data), requires_grad=param.requires_grad)
                module._parameters[name] = memo[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is None:
                    continue
                if id(buffer) not in memo:
                    memo[id(buffer)] = _to_fake(mode, buffer)
                module._buffers[name] = memo[id(buffer)]
    return memo


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers (the repeated blocks) inside a causal LM / classifier / peft model."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not candidates:
        raise ValueError(f"no decoder layer list found in {type(model).__name__}")
    # the ModuleList named "layers" (or "h") with the most parameters
    return list(max(candidates, key=lambda m: sum(p.numel() for p in m.parameters())))
