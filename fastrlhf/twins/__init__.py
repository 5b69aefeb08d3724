"""Readable pure-PyTorch versions of every loss: the ground truth for tests and benchmarks, and the
path on CPU and other devices. Same names and signatures as `fastrlhf.losses`, minus `backend`."""
from fastrlhf import _EXPORTS as _ALL
from fastrlhf._lazy import lazy_exports

_EXPORTS = {
    name: module.replace("fastrlhf.losses.", "fastrlhf.twins.")
    for name, module in _ALL.items()
    if module.startswith("fastrlhf.losses.")
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
