"""Test setup. Runs the Triton kernels under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before the kernel
modules import, so it is set here at the very top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _interpreter_setting_unchanged():
    """A test that changes TRITON_INTERPRET in this process would silently switch every later test's
    backend (CI once saw 503 failures downstream of one import): fail the test that changed it."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    after = os.environ.get("TRITON_INTERPRET")
    if after != before:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
        pytest.fail(f"the test changed TRITON_INTERPRET from {before!r} to {after!r} (restored)")
