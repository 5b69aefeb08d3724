"""The dtype every loss computes in."""
from __future__ import annotations

import torch


def compute_dtype(*items: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs (fp32 accumulation), float64 if any input is float64
    (so `gradcheck` runs the twins in float64). Accepts tensors, dtypes or None (skipped)."""
    dtype = torch.float32
    for item in items:
        if item is not None:
            dtype = torch.promote_types(dtype, item if isinstance(item, torch.dtype) else item.dtype)
    return dtype
