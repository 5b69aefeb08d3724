"""Host overhead of the small losses: what one call costs the CPU around its kernels.

    python -m benchmarks.host_overhead [--reps N] [--csv PATH] [--label TEXT]     # any machine
    python -m benchmarks.host_overhead --device cuda [...]                         # a GPU

At B x T = 64k tokens a small loss moves ~1 MB, a few microseconds of GPU time, so its speed is
decided on the host: argument checks, autograd bookkeeping, the torch ops around the kernels (each
one a CUDA launch) and the Triton launches themselves.

CPU mode (default; what the CPU-only machine can measure):
* every Triton kernel of `fastrlhf.kernels` is replaced by a no-op that only counts its launches
  (as `tests/gpu_compile.py` records them), and the public function runs with `backend="triton"`
  on small CPU tensors (TRITON_INTERPRET=1 lets the dispatcher pick the Triton path on CPU);
* `forward_us` / `full_us`: median wall time of the forward call / forward + backward, over many
  repetitions (the smallest median of three rounds), one torch thread. The tensors are tiny (256
  tokens, 64 pairs) so that the torch ops cost their dispatch overhead, not arithmetic: their CPU
  kernels do no real work at that size, and on a GPU the host cost of an op does not depend on its
  size either. Backward is `torch.autograd.grad` with a ready upstream gradient;
* `torch_ops_fwd` / `torch_ops_bwd`: ATen ops that launch work (views, allocations and metadata
  ops excluded), counted with a TorchDispatchMode; on a GPU each is one more kernel launch;
* `triton_launches_fwd` / `triton_launches_bwd`: kernel launches of the call.
It does NOT include the Triton launcher's own host cost per launch (binding the arguments, finding
the compiled kernel, cuLaunchKernel), which needs a GPU driver: add it per counted launch. And it
says nothing about GPU time.

CUDA mode (`--device cuda`): the real kernels at B x T = 64 x 1024 (pairs: 4096), the same
columns, with `forward_us` / `full_us` the host time of a call (no synchronisation: the launches
queue while the timer runs, as in training) and `gpu_us_fwd` / `gpu_us_full` the GPU time per call
(CUDA events around a batch of calls, divided). A call is launch-bound when its GPU time is below
its host time.

The rows of a run are merged into `--csv` keyed by (code, device, function); `code` defaults to the
git commit of the checkout measured (the committed table: benchmarks/results/host-overhead.csv).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__" and "cuda" not in sys.argv:
    # Before the kernel modules import: the Triton path on CPU tensors. Only as the program: the
    # tests import this module, and must not have their interpreter setting changed by it.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

KERNEL_MODULES = ("fastrlhf.kernels.kl", "fastrlhf.kernels.ppo", "fastrlhf.kernels.aggregate",
                  "fastrlhf.kernels.preference", "fastrlhf.kernels.advantages", "fastrlhf.kernels.gae")

# ATen ops that launch no kernel on a GPU: views, metadata, allocation without fill.
_FREE_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "select", "slice", "unbind", "alias", "detach", "t",
    "transpose", "permute", "as_strided", "squeeze", "unsqueeze", "empty", "empty_strided",
    "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "split", "chunk", "_reshape_alias",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "split_with_sizes", "promote_types",
}

COLUMNS = ["code", "device", "function", "forward_us", "full_us", "torch_ops_fwd", "torch_ops_bwd",
           "triton_launches_fwd", "triton_launches_bwd", "gpu_us_fwd", "gpu_us_full"]


class LaunchingOps(TorchDispatchMode):
    """Records the names of the ATen ops run inside it that launch work on a GPU (`.ops`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing but count."""

    def __init__(self, counter: list):
        self.counter = counter

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.counter[0] += 1


class _CountLaunches:
    """Wraps a @triton.jit kernel: launches it and counts the launch (CUDA mode)."""

    def __init__(self, kernel, counter: list):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter[0] += 1
            return launch(*args, **kwargs)

        return counted


def _replace_kernels(counter: list, *, run: bool) -> list:
    replaced = []
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module this checkout does not have
            continue
        for attr, obj in list(vars(module).items()):
            if attr.endswith("_kernel") and hasattr(obj, "fn"):
                replaced.append((module, attr, obj))
                setattr(module, attr, _CountLaunches(obj, counter) if run else _NoLaunch(counter))
    return replaced


def graph_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `output` was computed from."""
    leaves, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


def _cases(device: str) -> dict[str, Callable[[], tuple[Callable, Callable | None]]]:
    """name -> make(): (forward() -> output, backward(output) or None); inputs made once."""
    import fastrlhf

    g = torch.Generator(device=device).manual_seed(0)
    B, T, P = (64, 1024, 4096) if device == "cuda" else (4, 64, 64)

    def bt(grad=False):
        return (-torch.rand(B, T, generator=g, device=device)).requires_grad_(grad)

    def pairs(grad=False):
        return (-torch.rand(P, generator=g, device=device) * 50).requires_grad_(grad)

    mask = torch.rand(B, T, generator=g, device=device) > 0.2
    upstream = {}

    def backward_of(out):
        # The upstream gradient is made once per shape, as a training step gets it from the ops
        # after the loss; autograd.grad, not .backward(): no accumulation into .grad between repetitions.
        loss = out[0] if isinstance(out, tuple) else out
        if loss.shape not in upstream:
            upstream[loss.shape] = torch.ones_like(loss)
        torch.autograd.grad(loss, graph_leaves(loss), grad_outputs=upstream[loss.shape])

    def ppo(**options):
        def make():
            logps, old, adv = bt(True), bt(), bt()
            kw = dict(options)
            if kw.pop("with_ref_entropy", False):
                kw.update(ref_logps=bt(), kl_coef=0.05, entropy=(-bt()).requires_grad_(), entropy_coef=0.01)
            return (lambda: fastrlhf.ppo_loss(logps, old, adv, mask, backend="triton", **kw)), backward_of
        return make

    def value():
        v, ov, r = bt(True), bt(), bt()
        return (lambda: fastrlhf.value_loss(v, ov, r, mask, clip_eps=0.2, backend="triton")), backward_of

    def kl():
        a, b = bt(True), bt()
        return (lambda: fastrlhf.kl_penalty(a, b, estimator="k3", backend="triton")), backward_of

    def whiten():
        x = bt(True)
        return (lambda: fastrlhf.whiten(x, mask, backend="triton")), backward_of

    def group():
        s = torch.randn(P * 16, generator=g, device=device)
        return (lambda: fastrlhf.group_advantages(s, 16, backend="triton")), None

    def dpo():
        c, r, rc, rr = pairs(True), pairs(True), pairs(), pairs()
        return (lambda: fastrlhf.dpo_loss(c, r, rc, rr, beta=0.1, backend="triton")), backward_of

    def kto():
        logps, ref = pairs(True), pairs()
        labels = torch.rand(P, generator=g, device=device) < 0.6
        kl = torch.tensor(0.1, device=device)
        return (lambda: fastrlhf.kto_loss(logps, ref, labels, kl=kl, beta=0.1, backend="triton")), backward_of

    def reward():
        c, r = pairs(True), pairs(True)
        return (lambda: fastrlhf.reward_loss(c, r, margin=0.5, center_coef=0.01, backend="triton")), backward_of

    return {
        "kl_penalty(k3)": kl,
        "ppo_loss": ppo(),
        "ppo_loss(+kl+entropy)": ppo(with_ref_entropy=True, clip_eps_high=0.28, dual_clip=3.0),
        "ppo_loss(gspo)": ppo(ratio_level="sequence", loss_agg="seq-mean-token-mean"),
        "value_loss": value,
        "whiten": whiten,
        "group_advantages": group,
        "dpo_loss(sigmoid)": dpo,
        "kto_loss": kto,
        "reward_loss": reward,
    }


def _median_us(fn: Callable[[], object], reps: int, rounds: int = 3) -> float:
    """The smallest of `rounds` medians of `reps` timed calls (after 50 untimed ones): the shared
    machine's noise only ever adds time."""
    for _ in range(50):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def _gpu_us(fn: Callable[[], object], reps: int) -> float:
    """GPU time per call: CUDA events around `reps` calls, divided (host time overlaps the queue)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def measure(reps: int = 300, only: tuple[str, ...] = (), label: str = "", device: str = "cpu") -> list[dict]:
    torch.set_num_threads(1)
    counter = [0]
    replaced = _replace_kernels(counter, run=device == "cuda")
    rows = []
    try:
        for name, make in _cases(device).items():
            if only and name not in only:
                continue
            forward, backward = make()
            full = (lambda: backward(forward())) if backward else forward
            out = forward()  # warm: checks cached, kernels compiled, upstream gradients made
            if backward is not None:
                backward(out)
            counter[0] = 0
            with LaunchingOps() as ops:
                out = forward()
            fwd_ops, fwd_launches = len(ops.ops), counter[0]
            bwd_ops = bwd_launches = 0
            if backward is not None:
                counter[0] = 0
                with LaunchingOps() as ops:
                    backward(out)
                bwd_ops, bwd_launches = len(ops.ops), counter[0]
            row = {"code": label, "device": device, "function": name,
                   "forward_us": round(_median_us(forward, reps), 1), "full_us": round(_median_us(full, reps), 1),
                   "torch_ops_fwd": fwd_ops, "torch_ops_bwd": bwd_ops,
                   "triton_launches_fwd": fwd_launches, "triton_launches_bwd": bwd_launches,
                   "gpu_us_fwd": "", "gpu_us_full": ""}
            if device == "cuda":
                row["gpu_us_fwd"] = round(_gpu_us(forward, reps), 1)
                row["gpu_us_full"] = round(_gpu_us(full, reps), 1)
            rows.append(row)
    finally:
        for module, attr, obj in replaced:
            setattr(module, attr, obj)
    return rows


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../fastrlhf", "../kernels"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--only", default="", help="comma-separated function names")
    ap.add_argument("--csv", default=None, help="also merge the rows into this CSV (keyed by code, device, function)")
    ap.add_argument("--label", default=None, help="the `code` column (default: the git commit)")
    args = ap.parse_args(argv)
    label = args.label or _git_commit()
    rows = measure(args.reps, tuple(s for s in args.only.split(",") if s), label, args.device)
    shown = [c for c in COLUMNS if args.device == "cuda" or not c.startswith("gpu_")]
    print("| " + " | ".join(shown) + " |")
    print("|" + "---|" * len(shown))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in shown) + " |")
    if args.csv:
        path = Path(args.csv)
        old = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
        keys = {(r["code"], r["device"], r["function"]) for r in rows}
        merged = [r for r in old if (r["code"], r.get("device", "cpu"), r["function"]) not in keys] + rows
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
