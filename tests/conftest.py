"""Shared fixtures. Each engineer's fixtures live in their own marked section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the real network or a real token.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- model fixtures ---

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a dense base, three perturbed experts and two byte-identical copies of the base."""
    from lazymoe.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok = build_tokenizer(root / "tokenizer")
    base = build_model(root / "base", tokenizer_dir=tok, seed=0, initializer_range=0.2, max_shard_bytes=40_000)
    world = {"tokenizer": tok, "base": base}
    for i, name in enumerate(("chat", "code", "math")):
        world[name] = build_model(root / name, tokenizer_dir=tok, base=base, perturb=0.3, seed=100 + i)
    for name in ("same1", "same2"):
        world[name] = build_model(root / name, tokenizer_dir=tok, base=base, perturb=0.0)
    return world
