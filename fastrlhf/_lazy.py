"""Lazy re-exports (PEP 562): `from fastrlhf import ppo_loss` imports only the module that defines it.

Keeps `import fastrlhf` cheap (no transformers, no triton) and lets each area of the library be
imported, tested and benchmarked on its own.
"""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """Return `(__getattr__, __dir__)` for a package whose names live in submodules.

    `exports` maps a public name to the module (absolute or relative to `package`) that defines it.
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
