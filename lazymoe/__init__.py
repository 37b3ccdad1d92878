"""lazymoe: build Mixture-of-Experts models (frankenMoEs) from dense LLMs of one family.

    import lazymoe
    plan = lazymoe.make_plan("moe.yaml")      # headers only: sizes, params, problems
    lazymoe.merge("moe.yaml", "out/")         # streams the MoE checkpoint into out/
"""

from .config import ExpertConfig, MoEConfig, load_config
from .errors import LazyMoEError
from .merge import make_plan, merge

__all__ = ["ExpertConfig", "MoEConfig", "LazyMoEError", "load_config", "make_plan", "merge"]
__version__ = "0.1.0"
