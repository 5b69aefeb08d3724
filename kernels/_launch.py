"""Launch-size policy shared by the kernel launchers (block sizes, index-width limits).

Real GPUs get sizes chosen for an H100 (132 SMs). The CPU interpreter pays per program and per
loop iteration, so on CPU tensors the launchers take the widest blocks instead. Setting
`GPU_SIZES_EVERYWHERE = True` makes CPU launches use the GPU sizes; `tests/gpu_compile.py` does
that to record, on a machine without a GPU, exactly the kernel variants a GPU would compile.
"""
from __future__ import annotations

import torch

GPU_SIZES_EVERYWHERE = False

# Programs wanted per launch before blocks grow past the minimum: 4 per SM of an H100 (132 SMs),
# so a [B, T] batch of 64k tokens runs on every SM instead of on 64 of them.
_TARGET_PROGRAMS = 4 * 132
_MIN_ELEMENTWISE_BLOCK = 256
_MAX_ELEMENTWISE_BLOCK = 1024

# Elementwise kernels index with int32 (pid * BLOCK + arange): cheaper than int64, and a [B, T]
# tensor of 2**31 tokens (8 GiB per fp32 input) is far beyond any RL batch.
MAX_INT32_ELEMENTS = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. Plain Python: in recent Triton `triton.cdiv` is a constexpr function
    whose host-side call costs microseconds, which the small losses' launchers cannot afford."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); plain Python, see `cdiv`."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def gpu_sizes(device: torch.device) -> bool:
    """Whether launches on `device` use the GPU block sizes."""
    return device.type == "cuda" or GPU_SIZES_EVERYWHERE


def elementwise_block(n: int, device: torch.device) -> int:
    """Elements per program for a one-pass kernel over `n` elements (a power of two).

    GPU: 1024 once there are enough programs to keep every SM busy, smaller blocks (down to 256)
    before that. CPU interpreter: always 1024 (fewer programs run faster there).
    """
    if not gpu_sizes(device):
        return _MAX_ELEMENTWISE_BLOCK
    per_program = next_power_of_2(max(cdiv(n, _TARGET_PROGRAMS), 1))
    return min(max(per_program, _MIN_ELEMENTWISE_BLOCK), _MAX_ELEMENTWISE_BLOCK)


def check_int32_indexable(name: str, n: int) -> None:
    """ValueError for a tensor too big for int32 element offsets (instead of silent wrap-around)."""
    if n > MAX_INT32_ELEMENTS:
        raise ValueError(f"{name} must have at most 2**31 - 1 elements for this kernel, got {n}")
