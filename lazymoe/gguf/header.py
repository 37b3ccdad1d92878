"""Whether a GGUF file is whole: its header parses and the file holds every tensor byte the header describes.

``lazymoe gguf`` reuses the files an earlier run made; one cut short (a copy that stopped, a disk that filled
outside lazymoe) would otherwise reach llama.cpp, which refuses it with a message about offsets. The check reads
the header only (seconds at most, even for a 150k-token vocabulary) and applies llama.cpp's own rule: each
tensor's data, at its offset past the aligned header, must lie inside the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
#: llama.cpp's default data alignment, unless ``general.alignment`` says otherwise
DEFAULT_ALIGNMENT = 32
#: GGUF metadata value types with a fixed size: type id -> struct format (8: string, 9: array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: ggml tensor types a converter's output holds (its --outtype, the tensors it keeps in F32, and Q8_0 whose
#: quantisation the converter does itself), as (elements per block, bytes per block): ggml's type table
_TENSOR_TYPES = {0: (1, 4), 1: (1, 2), 8: (32, 34), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
                 30: (1, 2)}
#: and the quantiser's: Q4_0, Q4_1, Q5_0, Q5_1, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K
_TENSOR_TYPES.update({2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 9: (32, 36), 10: (256, 84),
                      11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292)})


class _Bad(Exception):
    """The header cannot be what it claims (the reason is the message)."""


#: a count, a length or a read that goes past the end of the file: from the bytes alone, a file cut short and a
#: damaged header look the same (and either is made again)
_PAST_END = "its header runs past the end of the file: it was cut short or is damaged"


def gguf_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a whole GGUF file (a short phrase), or None when it is."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            end = _data_end(f, size)
    except _Bad as bad:
        return str(bad)
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if end > size:
        return f"it is {size:,} bytes but its header describes {end:,}: it was cut short"
    return None


def _data_end(f: BinaryIO, size: int) -> int:
    """The byte just past the last tensor's data, as the header describes it."""
    if f.read(4) != MAGIC:
        raise _Bad("it does not start with GGUF's magic bytes")
    (version,) = _read(f, "<I")
    if version not in (2, 3):
        raise _Bad(f"it is GGUF version {version}; llama.cpp writes versions 2 and 3")
    n_tensors, n_values = _read(f, "<QQ")
    if n_tensors > size or n_values > size:  # each takes at least a byte
        raise _Bad(_PAST_END)
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_values):
        key = _string(f, size)
        (kind,) = _read(f, "<I")
        value = _value(f, kind, size)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _Bad(f"its general.alignment {value!r} is not a power of two")
            alignment = value
    end = 0
    for _ in range(n_tensors):
        name = _string(f, size)
        (n_dims,) = _read(f, "<I")
        if n_dims > 4:  # GGML_MAX_DIMS: llama.cpp refuses more
            raise _Bad(f"its tensor {name} has {n_dims} dimensions, more than llama.cpp's 4")
        count = 1
        for dim in _read(f, f"<{n_dims}Q"):
            count *= dim
        kind, offset = _read(f, "<IQ")
        # a type not in the table (an i-quant): only its start is checked, never a reason to refuse the file
        block, block_bytes = _TENSOR_TYPES.get(kind, (1, 0))
        end = max(end, offset + -(-count // block) * block_bytes)
    start = -(-f.tell() // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    return start + end


def _read(f: BinaryIO, fmt: str) -> tuple:
    raw = f.read(struct.calcsize(fmt))
    if len(raw) < struct.calcsize(fmt):
        raise _Bad(_PAST_END)
    return struct.unpack(fmt, raw)


def _string(f: BinaryIO, size: int) -> str:
    (length,) = _read(f, "<Q")
    if length > size:  # checked before reading: a damaged length could ask for exabytes
        raise _Bad(_PAST_END)
    raw = f.read(length)
    if len(raw) < length:
        raise _Bad(_PAST_END)
    return raw.decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int, size: int) -> object:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f, size)
    if kind == _ARRAY:
        item, count = _read(f, "<IQ")
        if count > size:
            raise _Bad(_PAST_END)
        if item in _SCALARS:  # skipped, not read: a vocabulary's scores are megabytes
            f.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
            return None
        for _ in range(count):
            _value(f, item, size)
        return None
    raise _Bad(f"its header holds a value of unknown type {kind}")
