"""torch and huggingface_hub, imported the first time they are used rather than when a module that needs them is
imported.

Loading torch costs 1-3 s of CPU. A local merge copies gigabytes through the kernel in about the same
time, and it needs torch only for what runs beside the copy (the router pass of a mode that runs a model)
and for tensors it transforms. So the modules on the merge's path (``moe.writer``, ``router.*``)
write ``from ..lazy import torch`` instead of ``import torch``: the writer starts copying at once while
another thread pays for the import (``tests/test_layout.py`` checks that importing the merge loads no
torch), and a ``random`` merge of straight copies never pays it (its rows come from ``router.seeded``).
Everywhere else, a plain ``import torch`` inside the function that needs it does the same job.

huggingface_hub's client (its HTTP stack) costs 0.2-0.3 s, about 5% of copying the benchmark's 6.5 GB MoE on a
fast disk, and a merge of local folders never talks to the Hub: the modules a local merge imports (``io.sources``,
``io.fetch``, ``io.ranges``, ``publish.hub``) reach it through ``hf_hub`` and its three submodules below.

torch's import first maps and relocates libtorch (hundreds of MB of code), 0.3 s here, with the interpreter lock
held: every other thread stops, and in a streamed push those are the threads moving bytes to and from the Hub.
``load_torch_libraries`` does that part with the lock released, and the first use of ``torch`` below (and the
tokenizer's load, which imports it through transformers) calls it first.

numpy costs 0.1 s; the merge's modules that use it (the router rows, ``router.seeded``) reach it through ``np``,
so that cost, too, falls on the router thread rather than before the first copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import importlib
import importlib.util
import os
import sys
import threading
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
            with collector_paused():
                if self._name == "torch":
                    load_torch_libraries()
                module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazily imported module {self._name!r} ({state})>"


if TYPE_CHECKING:
    import huggingface_hub as hf_hub
    import numpy as np
    import torch
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import lfs as hf_lfs
    from huggingface_hub import utils as hf_utils
else:
    torch = LazyModule("torch")
    np = LazyModule("numpy")
    hf_hub = LazyModule("huggingface_hub")
    hf_errors = LazyModule("huggingface_hub.errors")
    hf_lfs = LazyModule("huggingface_hub.lfs")
    hf_utils = LazyModule("huggingface_hub.utils")


_collector_lock = threading.Lock()
_collector_pausers = 0
_collector_was_enabled = False


@contextlib.contextmanager
def collector_paused():
    """No cyclic garbage collection while the block runs (in any thread), then as before.

    Importing torch and transformers creates over a million long-lived objects. While they pile up the
    collector keeps walking all of them (a full pass each time they grow by a quarter), with the interpreter
    lock held: about 0.5 s of stops, measured, in which no other thread moves a byte. Paused, it walks them
    once, afterwards (0.4 s more), unless the process is lazymoe's own (``own_process``): then they are frozen
    (``gc.freeze``), never walked again. Nested and concurrent pauses (the tokenizer's thread and the router
    pass's) count.
    """
    global _collector_pausers, _collector_was_enabled
    with _collector_lock:
        if _collector_pausers == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_pausers += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pausers -= 1
            if _collector_pausers == 0 and _collector_was_enabled:
                if _own_process:
                    gc.freeze()
                gc.enable()


_own_process = False


def own_process() -> None:
    """Called by the ``lazymoe`` command, whose process ends with its work: what the imports left (modules,
    classes, functions) lives as long as the process, so ``collector_paused`` freezes it rather than have the
    collector walk it again. The price: cyclic garbage that exists at that moment, or that frozen objects
    become later, is never freed (1.5 MB in a streamed push with a router pass, measured), which a process
    that ends with the merge can pay. Never inside someone else's process (a notebook's kernel, a test run),
    which may live for days."""
    global _own_process
    _own_process = True


_libraries_lock = threading.Lock()
_libraries_tried = False


def load_torch_libraries() -> bool:
    """Load libtorch's shared libraries without holding the interpreter lock, so that torch's import, which
    would load them with the lock held, finds them loaded; True if it did. Linux only; once per process.

    A function called through ctypes runs with the lock released, so ``dlopen`` is called that way, with the
    flags Python's import uses for an extension (RTLD_NOW, local). Anything unexpected (another platform, a
    torch without ``lib/libtorch_python.so``, a library that will not load alone) leaves the work to the import.
    """
    global _libraries_tried
    with _libraries_lock:
        if _libraries_tried or "torch" in sys.modules or not sys.platform.startswith("linux"):
            return False
        _libraries_tried = True
        try:
            spec = importlib.util.find_spec("torch")
            if spec is None or spec.origin is None:
                return False
            path = os.path.join(os.path.dirname(spec.origin), "lib", "libtorch_python.so")
            if not os.path.isfile(path):
                return False
            dlopen = ctypes.CDLL(None).dlopen
            dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
            return bool(dlopen(os.fsencode(path), os.RTLD_NOW))
        except (AttributeError, OSError, ImportError, ValueError):
            return False


def no_grad(fn: _F) -> _F:
    """``@torch.no_grad()`` for a function defined before torch is imported."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
