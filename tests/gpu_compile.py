"""Compile the kernel variants a GPU would launch to sm_80 / sm_90 cubins, on a machine without a GPU.

The CPU interpreter runs kernels as plain Python, so it accepts code that the real compiler
rejects (e.g. a non-constexpr global read inside @triton.jit), and it says nothing about
registers or spills. `triton.compile` with an explicit GPUTarget goes all the way to a cubin with
the ptxas bundled in the triton wheel and needs no driver.

Which variants: `recorded_launches()` replaces every `*_kernel` in the kernel modules by a
recorder while the public functions run on CPU tensors (kernels are NOT executed: outputs are
garbage inside the block). Each launch is turned into what `JITFunction.run` would compile on a
GPU: the same argument types, constexprs, the value-1 integer specialisation, the divisible-by-16
hints ("tt.divisibility") and num_warps / num_stages, with the launchers' GPU block sizes
(`fastrlhf.kernels._launch.GPU_SIZES_EVERYWHERE`). Hand-written signatures would drift from the
launchers; recorded ones cannot.

`compile_for_cuda(launches, tmp_path, arch=90)` compiles them in a subprocess (the test process has
TRITON_INTERPRET=1, under which @triton.jit functions cannot be compiled) and returns, per
variant, the resource usage that `cuobjdump --dump-resource-usage` reads from the cubin:
registers per thread, local memory (spills), shared memory.

`python tests/gpu_compile.py` prints that table for every variant the tests record.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest

KERNEL_MODULES = (
    "fastrlhf.kernels.logprobs", "fastrlhf.kernels.kl", "fastrlhf.kernels.ppo", "fastrlhf.kernels.aggregate",
    "fastrlhf.kernels.gae", "fastrlhf.kernels.advantages", "fastrlhf.kernels.preference", "fastrlhf.kernels.fused_head",
)
# Compute capabilities the kernels are compiled for: sm_80 (A100) and sm_90 (H100 / H200).
ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compiled variant: what `JITFunction.run` would hand to `triton.compile` on a GPU."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]  # (parameter, type) in order; "constexpr" for constants
    constexprs: tuple[tuple[str, Any], ...]
    divisible_by_16: tuple[str, ...]  # parameters that get the tt.divisibility=16 hint
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        pointers = ",".join(t[1:] for _, t in self.signature if t.startswith("*"))
        return f"{self.kernel}[{consts}] ptrs({pointers}) warps={self.num_warps}"


def _specialize(value) -> tuple[str, Any]:
    """(type, attribute) exactly as the CUDA backend's JIT specialises a runtime argument."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


class _Recorder:
    def __init__(self, module: str, name: str, kernel, sink: dict):
        self.module, self.name, self.sink = module, name, sink
        self.fn = getattr(kernel, "fn", kernel)  # InterpretedFunction / JITFunction wrap the def

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, num_warps: int = 4, num_stages: int = 3, **kwargs):
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        params = inspect.signature(self.fn).parameters
        signature, constexprs, divisible = [], [], []
        for name, value in bound.arguments.items():
            if "constexpr" in str(params[name].annotation):
                signature.append((name, "constexpr"))
                constexprs.append((name, value))
                continue
            kind, attr = _specialize(value)
            signature.append((name, kind))
            if kind == "constexpr":  # the JIT turns integer 1 (and None) into a constant
                constexprs.append((name, attr))
            elif attr == "D":
                divisible.append(name)
        launch = Launch(self.module, self.name, tuple(signature), tuple(constexprs), tuple(divisible),
                        num_warps, num_stages)
        self.sink[launch] = self.sink.get(launch, 0) + 1


@contextlib.contextmanager
def recorded_launches(modules=KERNEL_MODULES) -> Iterator[dict]:
    """Record (instead of running) every kernel launch made inside the block, with GPU sizes.
    Yields a dict {Launch: number of launches}, filled as the block runs."""
    from fastrlhf.kernels import _launch

    sink: dict = {}
    originals = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                originals.append((module, name, obj))
                setattr(module, name, _Recorder(module_name, name, obj, sink))
    previous, _launch.GPU_SIZES_EVERYWHERE = _launch.GPU_SIZES_EVERYWHERE, True
    try:
        yield sink
    finally:
        _launch.GPU_SIZES_EVERYWHERE = previous
        for module, name, obj in originals:
            setattr(module, name, obj)


_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
arch = int(sys.argv[3])
for module, kernel, signature, constexprs, divisible, num_warps, num_stages in json.load(open(sys.argv[1])):
    fn = getattr(importlib.import_module(module), kernel)
    names = [name for name, _ in signature]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin); f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1]))
    results.append({k.lower(): int(v) for k, v in fields.items()})
json.dump(results, open(sys.argv[2], "w"))
"""


def compile_for_cuda(launches, tmp_path, arch: int = 90) -> list[dict]:
    """Compile every `Launch` for sm_`arch`; returns per launch {"reg", "stack", "shared", "local"}
    (registers per thread, bytes of stack / shared / local memory). Fails the test with the
    compiler's message if a variant does not compile; skips without an NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia")
    launches = list(launches)
    specs_path, results_path = tmp_path / "launches.json", tmp_path / "usage.json"
    specs_path.write_text(json.dumps([
        (l.module, l.kernel, l.signature, l.constexprs, l.divisible_by_16, l.num_warps, l.num_stages)
        for l in launches
    ]))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton-cache-sm{arch}")  # compile for real, not from cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(specs_path), str(results_path), str(arch)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(results_path.read_text())
