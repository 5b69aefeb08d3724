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
