"""Optional parts of lazymoe, and the one line that says what to install when one is missing.

``pip install -e .`` (or ``pip install lazymoe``) gives plan, merge, push and the demo; the routing picture,
the notebook form and GGUF need extras. Each front end reaches them through :func:`require`, so a missing
one is a :class:`MissingDependency` (a :class:`~lazymoe.errors.LazyMoEError` and an ``ImportError``) naming
the pip command, never a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LazyMoEError

#: import name -> (what needs it, the pip command that installs it)
OPTIONAL = {
    "matplotlib": ("The routing picture", 'pip install "lazymoe[plot]" (or pip install matplotlib)'),
    "ipywidgets": ("The notebook form", 'pip install "lazymoe[notebook]" (or pip install ipywidgets)'),
    "llama_cpp": ("GGUF conversion, quantisation and chat",
                  'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install llama-cpp-python==0.3.36 '
                  '(compiles llama.cpp, a few minutes; NVIDIA GPU: CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF")'),
}


class MissingDependency(LazyMoEError, ImportError):
    """An optional package a feature needs is not installed; the message is the install command."""


_PACKAGE = {"llama_cpp": "llama-cpp-python"}  # import name -> distribution name, where they differ


def install_hint(module: str) -> str:
    what, command = OPTIONAL[module]
    return f"{what} needs {_PACKAGE.get(module, module)}, which is not installed: {command}"


def require(module: str) -> ModuleType:
    """Import optional ``module`` (a key of :data:`OPTIONAL`) or raise :class:`MissingDependency`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] != module:
            raise  # the package is there but broken inside: keep the real error
        raise MissingDependency(install_hint(module)) from None
