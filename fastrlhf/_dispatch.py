"""Choosing between a Triton kernel and its PyTorch twin.

`backend="auto"` (the default) picks Triton when the tensors live on a CUDA device, or anywhere when
`TRITON_INTERPRET=1` (Triton's CPU interpreter, used by the tests), and PyTorch otherwise.
The process-wide default can be changed with `set_default_backend`, `use_backend(...)` or the
environment variable `FASTRLHF_BACKEND`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

_default_backend = os.environ.get("FASTRLHF_BACKEND", "auto")


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_check_backend_name(_default_backend)


def set_default_backend(backend: str) -> None:
    """Set what `backend="auto"` means for the whole process ("auto", "triton" or "torch")."""
    global _default_backend
    _check_backend_name(backend)
    _default_backend = backend


def get_default_backend() -> str:
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Context manager: `with use_backend("torch"): ...` runs every loss inside on that backend."""
    previous = _default_backend
    set_default_backend(backend)
    try:
        yield
    finally:
        set_default_backend(previous)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "torch" for a call on `tensors` (None entries are ignored)."""
    _check_backend_name(backend)
    if backend == "auto":
        backend = _default_backend
    if backend == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    runnable = triton_available() and (on_cuda or interpreter_enabled())
    if backend == "triton" and not runnable:
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not installed (pip install triton)")
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU; "
            "use backend='torch' or backend='auto' here"
        )
    return "triton" if runnable else "torch"
