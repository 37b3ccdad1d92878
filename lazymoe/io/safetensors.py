"""Safetensors at the byte level: read headers, read one tensor, stream shards to disk.

We parse the format ourselves (it is an 8-byte length, a JSON header, then raw bytes) because
that lets the planner see every shape without reading weights, lets straight copies go through
``os.copy_file_range`` without passing through Python, and keeps peak memory at one tensor.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ModelFileError
from ..lazy import np

if TYPE_CHECKING:  # torch is imported where a tensor is read or written, so headers and plans stay light
    import torch

#: safetensors dtype tag -> (torch dtype name, bytes per element)
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
#: the float dtypes a merged model may be stored in: torch name -> safetensors tag
NAME_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ST_TO_NAME = {tag: name for name, tag in NAME_TO_ST.items()}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a torch dtype name (``bfloat16`` -> 2) or a safetensors tag (``BF16`` -> 2)."""
    return ST_DTYPES[NAME_TO_ST.get(name, name)][1]


def torch_dtype(tag: str) -> "torch.dtype":
    """The torch dtype of a safetensors tag."""
    import torch

    return getattr(torch, ST_DTYPES[tag][0])

_TRUNCATED = ("the file is truncated or was changed after it was read. Download the model again (delete it from "
              "the Hugging Face cache first) or re-save it, then run the merge again.")
_MAX_HEADER = 100 * 1024 * 1024
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk."""

    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict, int]:
    """Return (header dict, absolute offset of the data section) for one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("it is not a safetensors file (shorter than 8 bytes)")
        size = header_length(raw)
        text = f.read(size)
    return parse_header(text, size), 8 + size


def header_length(first8: bytes) -> int:
    """The header's byte count, from a file's first 8 bytes; ValueError when it cannot be a safetensors file."""
    (size,) = struct.unpack("<Q", first8)
    if size > _MAX_HEADER:
        raise ValueError(f"it is not a safetensors file (header length {size})")
    return size


def parse_header(text: bytes, size: int) -> dict:
    """The JSON header of ``size`` bytes (``text`` may be short: the file was truncated)."""
    if len(text) != size:
        raise ValueError(f"it is truncated inside its header ({len(text)} of {size} header bytes)")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"its header is not valid JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    return header


def _bad(name: str, why: str) -> ValueError:
    return ValueError(f"tensor {name!r} {why}")


def scan_file(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one file, after checking that the header describes bytes the file really holds:
    offsets inside the file, shape and dtype agreeing with the byte count. Unknown dtypes are kept (a
    tensor lazymoe never reads may have any); whoever reads a tensor checks its dtype is in ST_DTYPES."""
    header, base = read_header(path)
    return header_tensors(header, base, os.path.getsize(path), path)


def header_tensors(header: dict, base: int, file_bytes: int, path: Path) -> dict[str, TensorInfo]:
    """The tensors a parsed header describes, checked against the file's size (see ``scan_file``); ``base``
    is where the data section starts. ``path`` is where the bytes are (or will be) on disk."""
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise _bad(name, f"is described by a JSON {type(meta).__name__}, not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str):
            raise _bad(name, "has no dtype")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad(name, f"has shape {shape!r}; a shape is a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(name, f"has data_offsets {offsets!r}; they must be two integers [start, end]")
        start, end = offsets
        if base + end > file_bytes:
            raise ValueError(
                f"it is truncated: tensor {name!r} ends at byte {base + end} but the file has {file_bytes} bytes"
            )
        info = TensorInfo(name, dtype, tuple(shape), path, base + start, end - start)
        if dtype in ST_DTYPES and info.numel * ST_DTYPES[dtype][1] != info.nbytes:
            raise _bad(name, f"has shape {shape} of {dtype} ({info.numel * ST_DTYPES[dtype][1]} bytes) but "
                             f"its data_offsets span {info.nbytes} bytes")
        out[name] = info
    return out


def read_tensor(info: TensorInfo) -> "torch.Tensor":
    """Read exactly one tensor with plain file reads (no mmap: touched pages would count as RSS)."""
    import torch

    dtype = torch_dtype(info.dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset)
        view = memoryview(buf.numpy())
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise ModelFileError(f"{info.file} ended early while reading {info.name}: {_TRUNCATED}")
            got += n
    return buf.view(dtype).reshape(info.shape)


def copy_bytes(info: TensorInfo, dst: BinaryIO) -> None:
    """Append a tensor's raw bytes to ``dst`` without materialising it (kernel-side when possible)."""
    dst.flush()
    with open(info.file, "rb", buffering=0) as src:
        remaining, offset = info.nbytes, info.offset
        out_fd = dst.fileno()
        if hasattr(os, "copy_file_range"):
            try:
                while remaining:
                    n = os.copy_file_range(src.fileno(), out_fd, remaining, offset)
                    if n == 0:
                        raise ModelFileError(f"{info.file} ended early while copying {info.name}: {_TRUNCATED}")
                    remaining -= n
                    offset += n
                return
            except OSError as err:
                # EXDEV/ENOSYS/EINVAL/EOPNOTSUPP: old kernel or a filesystem without it; nothing was
                # written yet, so the plain read/write path below can take over
                if remaining != info.nbytes or err.errno not in _NO_COPY_RANGE:
                    raise
        src.seek(offset)
        chunk = bytearray(min(remaining, 64 << 20))
        view = memoryview(chunk)
        while remaining:
            n = src.readinto(view[: min(remaining, len(chunk))])
            if not n:
                raise ModelFileError(f"{info.file} ended early while copying {info.name}: {_TRUNCATED}")
            write_all(dst, view[:n])
            remaining -= n


def write_all(dst: BinaryIO, data) -> None:
    """Unbuffered files may write less than asked; loop until every byte is out."""
    view = memoryview(data).cast("B")
    while view:
        n = dst.write(view)
        if n is None:  # non-blocking file with nothing written; not expected for regular files
            continue
        view = view[n:]


def tensor_bytes_view(t: "torch.Tensor") -> memoryview:
    import torch

    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def float32_bytes(array, tag: str) -> memoryview:
    """A float32 numpy array cast to the float dtype ``tag`` (F32, F16, BF16) as little-endian bytes, exactly as
    torch's ``.to(dtype)`` rounds (to nearest, ties to even, overflow to infinity; a NaN stays a NaN), with
    no torch: the router rows of a random-mode merge are the only tensor it computes."""
    a = np.ascontiguousarray(array, dtype="<f4")
    if tag == "F32":
        out = a
    elif tag == "F16":
        with np.errstate(over="ignore"):  # overflow gives infinity, as in torch
            out = a.astype("<f2")
    elif tag == "BF16":
        bits = a.view("<u4")
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        out = np.where(np.isnan(a), np.uint32(0x7FC0), rounded).astype("<u2")
    else:
        raise ValueError(f"float32_bytes casts to F32, F16 or BF16, not {tag}")
    return memoryview(out.reshape(-1).view(np.uint8))


def build_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a header for tensors written back to back in ``entries`` order: (name, dtype, shape, nbytes)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw
