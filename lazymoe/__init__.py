"""lazymoe: build Mixture-of-Experts models (frankenMoEs) from dense LLMs of one family.

    import lazymoe
    plan = lazymoe.make_plan("moe.yaml")      # headers only: sizes, params, problems
    lazymoe.merge("moe.yaml", "out/")         # streams a Mixtral checkpoint into out/

``import lazymoe`` loads only the config and the errors; ``make_plan`` and ``merge`` come from
``lazymoe.pipeline.merge``, which needs torch, and are loaded the first time they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import ExpertConfig, MoEConfig, load_config
from .errors import LazyMoEError

if TYPE_CHECKING:
    from .pipeline.merge import make_plan, merge

__all__ = ["ExpertConfig", "MoEConfig", "LazyMoEError", "__version__", "load_config", "make_plan", "merge"]

_LAZY = {"make_plan": "lazymoe.pipeline.merge", "merge": "lazymoe.pipeline.merge"}


def __getattr__(name: str) -> Any:
    """``lazymoe.merge`` and ``lazymoe.make_plan`` import torch: load them on first use, not at ``import lazymoe``."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lazymoe' has no attribute {name!r}")
