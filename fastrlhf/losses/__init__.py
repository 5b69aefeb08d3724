"""Public drop-in losses. Each dispatches to a Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)
or to its PyTorch twin in `fastrlhf.twins`; `backend="auto"|"triton"|"torch"` forces one."""
from fastrlhf import _EXPORTS as _ALL
from fastrlhf._lazy import lazy_exports

_EXPORTS = {name: module for name, module in _ALL.items() if module.startswith("fastrlhf.losses.")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
