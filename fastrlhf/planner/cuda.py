"""Make code running on fake CPU tensors take the decisions it would take on an H100/H200.

The simulated tensors live on the CPU device (see `fastrlhf.planner.fake`), so everything that
looks at the device would pick its CPU path. `cuda_semantics()` switches, for the duration of a
simulation only, each decision that changes memory:

- fastrlhf's kernels: `backend="auto"` resolves to Triton (as for CUDA tensors); the Python code
  around each kernel runs (output buffers, chunking, vocab tiles), the launches themselves are
  no-ops (`KernelInterface.__getitem__`). Fake tensors answer `is_cuda` True, so the fp32-output
  GEMM branches are taken; logits chunks get the CUDA budget (`CHUNK_BYTES_CUDA`, 256 MiB instead
  of 32 MiB; the fused RL head's `FUSED_CHUNK_BYTES_CUDA`, 1.25 GiB) and launchers the GPU block sizes.
- attention: `F.scaled_dot_product_attention` picks the kernel PyTorch picks on sm90 for bf16/fp16:
  flash attention without a mask (causal), memory-efficient attention with a mask (the boolean
  mask is turned into an additive one of the query dtype, as ATen does, and padded to a multiple
  of 16 keys when needed); the math path for fp32. The ATen ops are the CUDA ones, run through
  their meta kernels, so the tensors they save for backward are the CUDA ones.
- autocast: the trainers' bf16 autocast (`torch.autocast("cuda")`) becomes CPU autocast in bf16,
  which acts on these tensors. Its casting lists cover the same matmul-type ops; the ops where the
  two lists differ (CUDA runs pow / rsqrt / exp / softmax / sum in fp32) receive fp32 inputs in
  these models anyway (RMSNorm and the rotary embedding upcast explicitly).
- AdamW: an AdamW built without an explicit choice gets the for-each implementation (torch's
  default on CUDA), with its [all parameters] temporaries; fastrlhf's trainers ask for the fused one
  on CUDA (`trainers.build.make_optimizer`), which fake tensors reporting `is_cuda` also get.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor


def _no_launch(*args, **kwargs):
    return None


@contextlib.contextmanager
def _patched(obj, name: str, value):
    if not hasattr(obj, name):
        yield
        return
    had_own = name in vars(obj) if isinstance(obj, type) else True
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def _kernel_modules():
    """fastrlhf's modules whose globals decide CUDA vs CPU paths (those that exist in this version)."""
    import importlib

    found = {}
    for name in ("fastrlhf._dispatch", "fastrlhf.losses.logprobs", "fastrlhf.reference.logprobs",
                 "fastrlhf.twins.logprobs", "fastrlhf.losses.fused_head", "fastrlhf.kernels._launch"):
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            continue
    return found


def sdpa_like_cuda(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """`F.scaled_dot_product_attention` with the kernel choice of PyTorch on an sm90 GPU."""
    if query.dtype not in (torch.bfloat16, torch.float16) or dropout_p:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernels read repeated heads
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    if attn_mask is None and query.shape[-1] <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                 scale=scale)
        return out[0]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(~attn_mask, -math.inf)
        else:
            bias = attn_mask.to(query.dtype)
        keys = key.shape[-2]
        if keys % 16:
            padded = torch.zeros(*bias.shape[:-1], keys + 16 - keys % 16, dtype=bias.dtype, device=bias.device)
            padded[..., :keys] = bias
            bias = padded[..., :keys]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], keys)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0,
                                                                 is_causal and bias is None, scale=scale)
    return out[0]


_ORIGINAL_SDPA = F.scaled_dot_product_attention


def _foreach_like_cuda(params, differentiable, use_fused=False):
    """torch.optim's implementation choice for CUDA parameters: for-each unless differentiable."""
    return False, not differentiable


@contextlib.contextmanager
def cuda_semantics():
    """Context for a simulation of a CUDA run on fake CPU tensors (see the module docstring)."""
    import triton.runtime.jit as jit

    modules = _kernel_modules()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(jit.KernelInterface, "__getitem__", lambda self, grid: _no_launch))
        stack.enter_context(_patched(FakeTensor, "is_cuda", property(lambda self: True)))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", sdpa_like_cuda))
        stack.enter_context(_patched(importlib.import_module("torch.optim.adam"), "_default_to_fused_or_foreach",
                                     _foreach_like_cuda))
        dispatch = modules.get("fastrlhf._dispatch")
        if dispatch is not None:
            stack.enter_context(_patched(dispatch, "interpreter_enabled", lambda: True))
        for name in ("fastrlhf.losses.logprobs", "fastrlhf.reference.logprobs", "fastrlhf.twins.logprobs"):
            module = modules.get(name)
            if module is not None and hasattr(module, "CHUNK_BYTES_CUDA"):
                stack.enter_context(_patched(module, "CHUNK_BYTES_CPU", module.CHUNK_BYTES_CUDA))
        fused = modules.get("fastrlhf.losses.fused_head")
        if fused is not None and hasattr(fused, "FUSED_CHUNK_BYTES_CUDA"):  # the fused head's own CUDA budget
            stack.enter_context(_patched(fused, "CHUNK_BYTES_CPU", fused.FUSED_CHUNK_BYTES_CUDA))
        launch = modules.get("fastrlhf.kernels._launch")
        if launch is not None:
            stack.enter_context(_patched(launch, "GPU_SIZES_EVERYWHERE", True))
        yield


def bf16_autocast():
    """The trainers' CUDA bf16 autocast, as CPU autocast acting on the fake CPU tensors."""
    return torch.autocast("cpu", dtype=torch.bfloat16)
