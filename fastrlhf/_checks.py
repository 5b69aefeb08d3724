"""Argument checks shared by the public losses: each raises ValueError naming the argument.

They look at shapes, dtypes and Python scalars only, never at tensor values, so they cost no
host-device sync.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """`tensor` must be a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` (None skipped) must have the shape of `reference`."""
    for name, tensor in others.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != reference.shape:
            raise ValueError(
                f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                f"got {tuple(tensor.shape)}"
            )


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    """`tensor` must have `ndim` dimensions; `layout` (e.g. "[B, T]") is quoted in the error."""
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {layout} ({ndim}-D), got shape {tuple(tensor.shape)}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) > 1:
        listed = ", ".join(f"{n}: {t.device}" for n, t in tensors.items() if t is not None)
        raise ValueError(f"all tensors must be on one device, got {listed}")


def as_float_mask(name: str, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Accept a bool / integer / float mask shaped like `like`; return it as float32 (1 = counts)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or float, got {mask.dtype}")
    return mask.to(torch.float32)


