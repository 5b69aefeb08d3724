"""Compile Triton kernels for a CUDA target (sm_90) on a machine without a GPU.

The CPU interpreter runs kernels as plain Python, so it accepts code that the real compiler
rejects (e.g. a non-constexpr global read inside @triton.jit). `triton.compile` with an explicit
GPUTarget goes all the way to a cubin with the ptxas bundled in the triton wheel and needs no
driver, so tests can catch those errors on CPU. It runs in a subprocess because the test process
has TRITON_INTERPRET=1, under which @triton.jit functions cannot be compiled.

Usage in a test:  compile_for_cuda("fastrlhf.kernels.gae", "_gae_scan_kernel", signature, constexprs)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
specs = json.loads(sys.argv[1])
for module, kernel, signature, constexprs, num_warps in specs:
    fn = getattr(importlib.import_module(module), kernel)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), (kernel, constexprs)
print("compiled", len(specs))
"""


def compile_for_cuda(specs, tmp_path) -> None:
    """`specs`: list of (module, kernel name, signature dict, constexprs dict, num_warps).
    Fails the test with the compiler's message if any variant does not compile; skips when this
    triton has no NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(specs)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
