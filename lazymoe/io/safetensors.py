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
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {size})")
        header = json.loads(f.read(size))
    return header, 8 + size


def scan_file(path: Path) -> dict[str, TensorInfo]:
    header, base = read_header(path)
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, base + start, end - start)
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
