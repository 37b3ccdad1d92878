"""Byte ranges of a file on the Hub, through huggingface_hub's own HTTP layer.

The same calls ``HfApi.get_safetensors_metadata`` makes: the file's ``resolve`` URL (``hf_hub_url``), the
client's shared session and headers (token, user agent), an HTTP ``Range``, the client's retries with back-off
(``http_backoff``) and its error types (``hf_raise_for_status``). Always at a commit hash, so every range of
one merge comes from the same files.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..lazy import hf_hub, hf_utils
from .safetensors import TensorInfo, header_length, header_tensors, parse_header

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class RangeError(OSError):
    """The Hub answered a range request with something else (a whole file, a short body)."""


def read_range(repo_id: str, revision: str, filename: str, start: int, end: int, *,
               to_eof: bool = False) -> tuple[bytes, int]:
    """Bytes ``start``..``end`` (end excluded) of ``filename`` at ``revision``, and the file's total size.
    ``to_eof``: a file that ends before ``end`` gives what it has from ``start`` (HTTP sends a range that
    reaches past the end up to the end)."""
    url = hf_hub.hf_hub_url(repo_id, filename, revision=revision)
    headers = {**hf_utils.build_hf_headers(), "Range": f"bytes={start}-{end - 1}"}
    response = hf_utils.http_backoff("GET", url, headers=headers)
    if to_eof and start == 0 and response.status_code == 416:
        return b"", 0  # nothing at byte 0: an empty file
    hf_utils.hf_raise_for_status(response)
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    data = response.content
    if to_eof and start == 0 and response.status_code == 200 and len(data) <= end:
        return data, len(data)  # a range that covers a small file may be answered with the whole file
    last = min(end, int(match[3])) if match is not None and to_eof else end
    if response.status_code != 206 or match is None or int(match[1]) != start or len(data) != last - start:
        raise RangeError(
            f"asked {filename} for bytes {start}-{end - 1}, got HTTP {response.status_code} with {len(data)} bytes "
            f"({response.headers.get('content-range', 'no Content-Range')})"
        )
    return data, int(match[3])


def remote_tensors(repo_id: str, revision: str, filename: str, local_path: Path,
                   header_guess: int = 0) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file on the Hub, read from its header alone, with their real offsets in
    the file; ``local_path`` is where the file would be once downloaded. The first read asks for the length
    and ``header_guess`` bytes after it (a guess from the index: ``header_bytes_guess``), so a header the
    guess covers takes one request; the rest of a longer one takes a second."""
    first, total = read_range(repo_id, revision, filename, 0, 8 + header_guess, to_eof=True)
    if len(first) < 8:
        raise ValueError(f"it is {len(first)} bytes long, too short for a safetensors file")
    size = header_length(first[:8])
    if 8 + size > total:  # a length past the file's end: nothing more to read (a lie would fetch the weights)
        raise ValueError(f"it is truncated inside its header ({total - 8} of {size} header bytes)")
    text = first[8 : 8 + size]
    if len(text) < size:  # the guess was short; the file holds the rest (checked above)
        text += read_range(repo_id, revision, filename, 8 + len(text), 8 + size)[0]
    return header_tensors(parse_header(text, size), 8 + size, total, local_path)


#: the most a guess asks for: a header is a few KB per hundred tensors, and an index that lists more (or
#: lies) makes the first read fetch at most this much of the weights
MAX_HEADER_GUESS = 1 << 20


def header_bytes_guess(names: list[str]) -> int:
    """Bytes enough, nearly always, for the header of a file holding tensors ``names``: each entry is its name
    and about 70 bytes (dtype, a shape, two offsets), padded here to 100, plus 1 KiB for ``__metadata__``;
    at most MAX_HEADER_GUESS. Over-reading costs a few bytes per tensor; under-reading, a second request."""
    return min(MAX_HEADER_GUESS, 1024 + sum(len(name.encode()) + 100 for name in names))
