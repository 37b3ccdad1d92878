"""lazymoe: build Mixture-of-Experts models (frankenMoEs) from dense LLMs of one family.

    import lazymoe
    plan = lazymoe.make_plan("moe.yaml")      # headers only: sizes, params, problems
    lazymoe.merge("moe.yaml", "out/")         # streams the MoE checkpoint into out/

``import lazymoe`` loads only the errors: the names below come from their modules the first time they are
used (``make_plan`` and ``merge`` need torch), so the command line and the light submodules start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import LazyMoEError

if TYPE_CHECKING:
    from .config import ExpertConfig, MoEConfig, load_config
    from .pipeline.merge import make_plan, merge

__all__ = ["ExpertConfig", "MoEConfig", "LazyMoEError", "__version__", "load_config", "make_plan", "merge"]

_LAZY = {"ExpertConfig": "lazymoe.config", "MoEConfig": "lazymoe.config", "load_config": "lazymoe.config",
         "make_plan": "lazymoe.pipeline.merge", "merge": "lazymoe.pipeline.merge"}


def __getattr__(name: str) -> Any:
    """The public API, loaded from its module on first use rather than at ``import lazymoe``."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lazymoe' has no attribute {name!r}")
