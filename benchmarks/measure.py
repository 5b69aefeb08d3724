"""Timing and peak-memory measurement, the same API on CUDA and CPU.

Timing
  CUDA: one untimed warm-up call, then `triton.testing.do_bench` (L2 flushed between reps, CUDA
        events) for calls under 5 ms, and at least 5 individually event-timed calls for longer ones;
        quantiles 0.5 / 0.2 / 0.8.
  CPU:  a plain repeated `time.perf_counter` loop with the same quantiles (warm-up calls first,
        then at least `min_reps` calls and at least `min_time_s` seconds).

Peak memory = the most bytes allocated at any moment during the call, minus what was allocated
before it (the inputs, weights and anything else already alive are not counted), so the number is
"extra memory this implementation needs".
  CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`.
  CPU:  torch.profiler with `profile_memory=True`: every allocation and free made through the c10
        CPU allocator is an event with a size and a timestamp; we replay them in time order and take
        the running maximum. Unlike a TorchDispatchMode (which sees only ATen ops called through the
        dispatcher), this also sees the buffers that torch.compile/Inductor's generated C++ code and
        the autograd engine allocate. Frees of blocks allocated before the call are ignored.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), without needing numpy."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def bench_cpu(fn: Callable[[], object], *, grad_to_none: Iterable[torch.Tensor] = (),
              warmup: int = 1, min_reps: int = 5, max_reps: int = 1000, min_time_s: float = 0.2) -> Timing:
    grads = list(grad_to_none)
    for _ in range(warmup):
        _clear_grads(grads)
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_time_s):
        _clear_grads(grads)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(*(_quantile(times, q) for q in QUANTILES), reps=len(times))


# Calls at least this long are timed one by one with CUDA events (at least `min_reps` of them):
# do_bench sizes its repetitions from `rep_ms`, which gives a 150 ms LM-head call one timed run.
# Flushing the 60 MB L2 between such calls (do_bench does) changes nothing at these sizes.
LONG_CALL_MS = 5.0


def _event_times(fn: Callable[[], object], grads: list[torch.Tensor], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        _clear_grads(grads)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_cuda(fn: Callable[[], object], *, grad_to_none: Iterable[torch.Tensor] = (),
               warmup_ms: int = 25, rep_ms: int = 100, min_reps: int = 5) -> Timing:
    """Median / p20 / p80 in ms. The first call (compilation, autotuning, allocator growth) is not
    timed; calls of LONG_CALL_MS or more get max(min_reps, rep_ms / call) event-timed runs, shorter
    ones `triton.testing.do_bench` (L2 flushed between runs)."""
    from triton.testing import do_bench

    grads = list(grad_to_none)
    _clear_grads(grads)
    fn()  # warm-up: compiles, autotunes, grows the caching allocator
    [estimate] = _event_times(fn, grads, 1)
    if estimate >= LONG_CALL_MS:
        times = sorted(_event_times(fn, grads, max(min_reps, int(rep_ms / estimate))))
        return Timing(*(_quantile(times, q) for q in QUANTILES), reps=len(times))
    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads or None, quantiles=list(QUANTILES))
    return Timing(float(med), float(p20), float(p80), reps=-1)


def bench(fn: Callable[[], object], device: str, *, grad_to_none: Iterable[torch.Tensor] = (),
          quick: bool = False, min_reps: int = 5) -> Timing:
    if device.startswith("cuda"):
        return bench_cuda(fn, grad_to_none=grad_to_none, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100,
                          min_reps=min_reps)
    return bench_cpu(fn, grad_to_none=grad_to_none, min_reps=min_reps, min_time_s=0.1 if quick else 0.3)


def _allocation_events(prof) -> list[tuple[int, int, int]]:
    """(timestamp_ns, ptr, signed size) of every allocator event the profiler recorded."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    return events


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes_cpu(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():  # kineto prints a line on every profiler start/stop
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result  # freed inside the window: the output counts towards the peak, then goes
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size in _allocation_events(prof):
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:  # a free of something allocated inside the window
            current -= live.pop(ptr)
    return peak


def peak_bytes_cuda(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return max(torch.cuda.max_memory_allocated() - before, 0)


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    return peak_bytes_cuda(fn) if device.startswith("cuda") else peak_bytes_cpu(fn)
