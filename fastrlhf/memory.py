"""Measuring memory: peak bytes on a CUDA device or of the whole process, and a one-line summary
of a `RoleModel.memory_report()`. The trainers report the peak of a run in their summary; the
pipeline resets and reads it around each stage.

Two readings of the process's peak RSS exist on CPU, and they answer different questions:
`peak_memory` reads Linux's resettable high-water mark (VmHWM, reset by `reset_peak_memory`), so
each pipeline stage gets its own peak; `peak_memory_bytes` reads getrusage's maximum since the
process started, which no reset touches, so a trainer run inside a measured stage never disturbs
the stage's measurement.
"""
from __future__ import annotations

import resource
import sys

import torch

# what a trainer summary's "peak_memory_kind" says was measured
CUDA_MAX_ALLOCATED = "cuda_max_allocated"
PROCESS_MAX_RSS = "process_max_rss"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory`: the CUDA allocator's statistics on a CUDA device, else
    the process's RSS high-water mark (Linux: writing "5" to /proc/self/clear_refs; elsewhere nothing)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured) since the last `reset_peak_memory`: CUDA max allocated, or the
    process's peak RSS (since it started where the high-water mark cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS"
    except OSError:
        pass
    return process_max_rss_bytes(), "process peak RSS (since start)"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated since the last reset on a CUDA device; on CPU the process's RSS
    high-water mark since it started (`PROCESS_MAX_RSS`, unaffected by `reset_peak_memory`)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_max_rss_bytes()


def peak_memory_kind(device: torch.device) -> str:
    """What `peak_memory_bytes(device)` measures: `CUDA_MAX_ALLOCATED` or `PROCESS_MAX_RSS`."""
    return CUDA_MAX_ALLOCATED if device.type == "cuda" else PROCESS_MAX_RSS


def process_max_rss_bytes() -> int:
    """getrusage's maximum resident set size of this process since it started, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def memory_summary(report: dict) -> str:
    """One line for the log: bytes per role of a `RoleModel.memory_report()`."""

    def mib(n) -> str:
        return f"{(n or 0) / 2**20:.1f} MiB"

    parts = []
    for role, entry in report.items():
        if isinstance(entry, dict):
            total = sum(v for k, v in entry.items()
                        if k.endswith("_bytes") and k != "trainable_bytes" and isinstance(v, (int, float)))
            parts.append(f"{role} {mib(total)}")
    if "total_bytes" in report:
        parts.append(f"total {mib(report['total_bytes'])}")
    return "memory (params + optimizer): " + ", ".join(parts)
