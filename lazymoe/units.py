"""Sizes and counts as people read and write them: ``24.2B`` parameters, ``48.3 GB``, ``--max-shard-size 2GB``."""

from __future__ import annotations

import math

from .errors import ConfigError


def human_params(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def parse_bytes(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (units are bytes, as the flag name says)."""
    bad = ConfigError(f"{str(text)[:40]!r} is not a size; write a positive size like 2GB, 500MB or 1.5GiB.")
    if isinstance(text, bool):
        raise bad
    if isinstance(text, int):
        if text < 1:
            raise bad
        return text
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num) if len(num) <= 40 else math.nan
    except ValueError:
        value = math.nan
    # inf, nan and 1e400 (which float() makes inf) are not sizes; nor is anything under one byte
    if unit not in units or not math.isfinite(value) or value * units[unit] < 1:
        raise bad
    return int(value * units[unit])
