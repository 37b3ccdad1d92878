"""llama.cpp file types: one table of names, sizes and advice, read by the converter's disk checks, the CLI,
the notebook form and the model cards. Imports only the errors, so any layer may use it.

Bits per weight are llama.cpp's own measurements: the file sizes its ``llama-quantize`` lists for
Llama-3-8B (GiB, in ``tools/quantize/quantize.cpp`` of llama-cpp-python 0.3.36's llama.cpp) times 2^33 over
8.03e9 parameters. Mixes such as Q4_K_M keep some tensors at higher precision, so they sit above their
nominal block size (4.5 bits for Q4_K).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import GGUFError


@dataclass(frozen=True)
class QuantType:
    name: str
    bits_per_weight: float
    note: str  # one line of advice on a model card


#: the quantisations offered, in the order a menu lists them (BRIEF §7's common menu)
QUANTS: tuple[QuantType, ...] = (
    QuantType("Q2_K", 3.17, "smallest, large quality loss"),
    QuantType("Q3_K_S", 3.65, "very small, large quality loss"),
    QuantType("Q3_K_M", 4.00, "small, noticeable quality loss"),
    QuantType("Q3_K_L", 4.31, "small, noticeable quality loss"),
    QuantType("Q4_0", 4.64, "legacy 4-bit; prefer Q4_K_M"),
    QuantType("Q4_1", 5.11, "legacy 4-bit; prefer Q4_K_M"),
    QuantType("Q4_K_S", 4.67, "slightly smaller than Q4_K_M, a little lower quality"),
    QuantType("Q4_K_M", 4.90, "balanced size and quality (recommended)"),
    QuantType("Q5_0", 5.57, "legacy 5-bit; prefer Q5_K_M"),
    QuantType("Q5_1", 6.04, "legacy 5-bit; prefer Q5_K_M"),
    QuantType("Q5_K_S", 5.57, "between Q4_K_M and Q5_K_M"),
    QuantType("Q5_K_M", 5.70, "higher quality, a little larger"),
    QuantType("Q6_K", 6.57, "near-lossless"),
    QuantType("Q8_0", 8.52, "near-lossless, large"),
)
#: what the converter writes before any quantisation (its --outtype), as llama.cpp names the file types
UNQUANTISED: tuple[QuantType, ...] = (
    QuantType("BF16", 16.0, "unquantised (bfloat16)"),
    QuantType("F16", 16.0, "unquantised (float16)"),
    QuantType("F32", 32.0, "unquantised (float32)"),
)
QUANT_TYPES: tuple[str, ...] = tuple(q.name for q in QUANTS)
DEFAULT_QUANTS: tuple[str, ...] = ("Q4_K_M", "Q5_K_M")
#: the file a reader should pick first, then the next...: the card's default and its order of advice
PREFERENCE: tuple[str, ...] = ("Q4_K_M", "Q5_K_M", "Q4_K_S", "Q6_K", "Q8_0", "Q5_K_S", "Q3_K_L", "Q3_K_M",
                               "Q3_K_S", "Q2_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32")
BY_NAME: dict[str, QuantType] = {q.name: q for q in QUANTS + UNQUANTISED}
#: converter output types (lower case, as convert_hf_to_gguf.py spells them)
OUTTYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")

_QUANT_TAG = re.compile(r"^(I?Q\d\w*|TQ\d\w*|F16|F32|BF16)$")


def bits_per_weight(name: str) -> float:
    """Bits per weight of a file type or outtype (``Q4_K_M``, ``f16``...)."""
    return BY_NAME[name.upper()].bits_per_weight


def gguf_bytes(params: int, name: str) -> int:
    """Estimated size of a ``name`` GGUF file of a ``params``-parameter model."""
    return int(params * bits_per_weight(name) / 8)


def estimate_gguf_bytes(params: int, quants: tuple[str, ...] | list[str], outtype: str = "F16") -> int:
    """Disk for the ``outtype`` GGUF plus each quantised file (an estimate from bits per weight)."""
    return gguf_bytes(params, outtype) + sum(gguf_bytes(params, q) for q in quants)


def quant_of(filename: str) -> str | None:
    """``NAME.Q4_K_M.gguf`` -> ``Q4_K_M`` (the naming ``convert_to_gguf`` uses); None when there is no tag."""
    stem = filename.removesuffix(".gguf")
    tag = stem.rsplit(".", 1)[1].upper() if "." in stem else ""
    return tag if _QUANT_TAG.match(tag) else None  # "Moe-v3.1.gguf" has no quant "1"


def parse_quants(quants: str | Iterable[str] | None) -> list[str]:
    """``"Q4_K_M,q5_k_m"``, a list, ``"all"`` or ``"none"`` → validated upper-case names, in order, no repeats."""
    if quants is None:
        return []
    items = quants.split(",") if isinstance(quants, str) else list(quants)
    items = [q.strip().upper() for q in items if q.strip()]
    if items == ["NONE"]:
        return []
    if items == ["ALL"]:
        return list(QUANT_TYPES)
    unknown = [q for q in items if q not in QUANT_TYPES]
    if unknown:
        raise GGUFError(f"unknown quantisation {', '.join(unknown)}; choose from {', '.join(QUANT_TYPES)} "
                        "(or 'all', 'none').")
    return list(dict.fromkeys(items))
