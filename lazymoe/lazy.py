"""torch, imported the first time it is used rather than when a module that needs it is imported.

Loading torch costs 1-3 s of CPU. A local merge copies gigabytes through the kernel in about the same
time, and it needs torch only for what runs beside the copy (the tokenizer check, the router pass) and
for the last, small, routers' shard. So the modules on the merge's path (``moe.writer``, ``router.*``)
write ``from ..lazy import torch`` instead of ``import torch``: the writer starts copying at once while
another thread pays for the import (``tests/test_layout.py`` checks that importing the merge loads no
torch). Everywhere else, a plain ``import torch`` inside the function that needs it does the same job.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

_F = TypeVar("_F", bound=Callable)


class LazyModule:
    """A stand-in for module ``name``: the first attribute looked up imports it (through the import system,
    so a thread that asks while another thread is importing it waits for the whole module)."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str):
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazily imported module {self._name!r} ({state})>"


if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")


def no_grad(fn: _F) -> _F:
    """``@torch.no_grad()`` for a function defined before torch is imported."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
