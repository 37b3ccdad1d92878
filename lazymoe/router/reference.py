"""The reference gate modes, as mergekit-moe computes them: ``random``, ``uniform_random``, ``cheap_embed`` and
the ``hidden`` family (the base's residual stream, one layer-streamed pass). See ``router/gates.py``.
"""

from __future__ import annotations

import math

from ..config import MoEConfig
from ..lazy import np, torch
from . import seeded
from .prompts import tokenize_prompts
from .streamed import StreamedBase


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(num_layers: int, num_experts: int, hidden: int, *, mode: str, seed: int):
    """The ``random`` (N(0, 1)) or ``uniform_random`` (U(-1/sqrt(H), 1/sqrt(H))) rows, (L, E, H) float32 numpy:
    the bits ``torch.randn``/``torch.rand`` give from ``torch.Generator().manual_seed(seed)`` on an x86 CPU,
    computed without importing torch (``router.seeded``)."""
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return seeded.randn(shape, seed)
    bound = 1.0 / math.sqrt(hidden)
    # torch.rand(...) * (2 * bound) - bound: each float scalar is rounded to float32 first, each step rounded
    return seeded.rand(shape, seed) * np.float32(2 * bound) - np.float32(bound)


def cheap_embed_gates(embed: torch.Tensor, tokenizer, config: MoEConfig, num_layers: int) -> torch.Tensor:
    embed = embed.float()

    def vec(prompts: list[str]) -> torch.Tensor:
        batch = tokenize_prompts(tokenizer, prompts)
        rows = embed[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
        return _unit(rows.sum(dim=(0, 1)))

    out = []
    for expert in config.experts:
        v = vec(expert.positive_prompts)
        if expert.negative_prompts:
            v = v - vec(expert.negative_prompts)
        out.append(_unit(v))
    return torch.stack(out).unsqueeze(0).repeat(num_layers, 1, 1)


def hidden_gates(base, tokenizer, config: MoEConfig, *, device: torch.device, progress: bool = True,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference ``hidden``/``hidden_avg`` rows, from one layer-streamed pass of the base.

    Each expert's positive prompts form one left-padded batch and its negatives another, exactly as the
    reference batches them (padding changes ``hidden_avg``); every batch goes through a layer before the
    next layer is read, so the base's weights are read once and never held whole.
    """
    average = config.gate_mode == "hidden_avg"
    batches, owners = [], []
    for e, expert in enumerate(config.experts):
        for prompts, sign in ((expert.positive_prompts, 1.0), (expert.negative_prompts, -1.0)):
            if prompts:
                batches.append(tokenize_prompts(tokenizer, prompts))
                owners.append((e, sign))

    def reduce(h: torch.Tensor, _mask: torch.Tensor) -> torch.Tensor:
        h = h.float()
        per_prompt = h.mean(dim=1) if average else h[:, -1, :]  # mean over positions, padding included
        return per_prompt.mean(dim=0).cpu()

    states = StreamedBase(base, device=device, dtype=dtype).collect(batches, residual=reduce, progress=progress)
    rows = torch.zeros(len(states["residual"][0]), config.num_experts, states["residual"][0][0].shape[-1])
    for (e, sign), per_layer in zip(owners, states["residual"]):
        rows[:, e] += sign * torch.stack(per_layer)
    return _unit(rows)  # (L, E, H)


# ----------------------------------------------------------------------------------- fitted modes
