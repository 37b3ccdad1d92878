"""What an expert's MLP weight becomes in the MoE: ``noise_scale`` and ``residual_scale`` applied, cast.

One function, used by the writer (what lands on disk) and by the fitted gate modes (what the routers are
fitted against), so a router is always fitted on exactly the experts that are written.
"""

from __future__ import annotations

import zlib

from ..config import MoEConfig
from ..lazy import torch


def leaves_unchanged(config: MoEConfig, expert: int, *, is_residual: bool) -> bool:
    """True when :func:`expert_weight` only casts: no noise, and no residual scale on this tensor."""
    spec = config.expert_spec(expert)
    return not spec.noise_scale and (not is_residual or spec.residual_scale in (None, 1.0))


def expert_weight(config: MoEConfig, expert: int, source_name: str, tensor: torch.Tensor, *, is_residual: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` (expert ``expert``'s ``source_name``) as the MoE stores it, in ``dtype``.

    Noise is N(0, noise_scale) from a generator keyed on (config seed, expert, tensor name), so the result
    does not depend on the order tensors are written in; residual_scale multiplies ``down_proj`` (the
    reference applies noise first, then the scale).
    """
    spec = config.expert_spec(expert)
    if leaves_unchanged(config, expert, is_residual=is_residual):
        return tensor.to(dtype)
    t = tensor.float()
    if spec.noise_scale:
        key = zlib.crc32(f"{expert}:{source_name}".encode())
        gen = torch.Generator().manual_seed(((config.seed or 0) * 1_000_003 + key) % 2**63)
        t = t + torch.randn(t.shape, generator=gen).to(t.device) * spec.noise_scale
    if is_residual and spec.residual_scale is not None:
        t = t * spec.residual_scale
    return t.to(dtype)
