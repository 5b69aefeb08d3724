"""What machine a result came from: device name, file-name slug, library versions, hardware peaks."""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import re
from dataclasses import dataclass

import torch

# Vendor spec-sheet peaks (dense, no sparsity), for "% of peak". About 3 TB/s and ~790 TFLOP/s is
# what an H100 SXM reaches in practice (a device-to-device copy and an 8k bf16 GEMM
# measured here gave 3.0 TB/s and ~798 TFLOP/s), so 80-85% of these spec numbers is the real ceiling.
# fp32 rows use the non-tensor-core FP32 peak (torch's default matmul precision is "highest": no TF32).
# Matched in order against torch.cuda.get_device_name(); first hit wins.
PEAKS = [
    # (substring, memory bytes/s, bf16 flop/s, fp32 flop/s)
    ("H200", 4.8e12, 989e12, 67e12),
    ("H100 PCIe", 2.0e12, 756e12, 51e12),
    ("H100", 3.35e12, 989e12, 67e12),  # SXM / "H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12, 312e12, 19.5e12),
    ("A100", 1.555e12, 312e12, 19.5e12),
    ("L4", 0.3e12, 121e12, 30.3e12),
]


@dataclass(frozen=True)
class DeviceInfo:
    device: str          # "cuda" or "cpu" (what tensors are put on)
    name: str            # human name, e.g. "NVIDIA H100 80GB HBM3"
    slug: str            # file-name safe, e.g. "nvidia-h100-80gb-hbm3"
    mem_bw: float | None
    flops: dict          # dtype name -> flop/s
    versions: dict       # package -> version string

    def peak_for(self, unit: str, dtype: str) -> float | None:
        if unit == "GB/s":
            return self.mem_bw
        if unit == "TFLOP/s":
            return self.flops.get(dtype)
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastrlhf": _version("fastrlhf"),
        "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "trl": _version("trl"),
        "transformers": _version("transformers"),
    }


def detect(device: str | None = None) -> DeviceInfo:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        bw = flops = None
        for key, mem_bw, bf16, fp32 in PEAKS:
            if key in name:
                bw, flops = mem_bw, {"bf16": bf16, "fp16": bf16, "fp32": fp32}
                break
        return DeviceInfo(device, name, slugify(name), bw, flops or {}, versions())
    name = _cpu_name()
    threads = torch.get_num_threads()
    # CPU peaks are not tabulated: pct_of_peak stays blank there.
    return DeviceInfo(device, f"{name} ({threads} threads)", "cpu-" + slugify(name), None, {}, versions())


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
