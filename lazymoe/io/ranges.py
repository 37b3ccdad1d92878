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


def read_range(repo_id: str, revision: str, filename: str, start: int, end: int) -> tuple[bytes, int]:
    """Bytes ``start``..``end`` (end excluded) of ``filename`` at ``revision``, and the file's total size."""
    url = hf_hub.hf_hub_url(repo_id, filename, revision=revision)
    headers = {**hf_utils.build_hf_headers(), "Range": f"bytes={start}-{end - 1}"}
    response = hf_utils.http_backoff("GET", url, headers=headers)
    hf_utils.hf_raise_for_status(response)
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    data = response.content
    if response.status_code != 206 or match is None or int(match[1]) != start or len(data) != end - start:
        raise RangeError(
            f"asked {filename} for bytes {start}-{end - 1}, got HTTP {response.status_code} with {len(data)} bytes "
            f"({response.headers.get('content-range', 'no Content-Range')})"
        )
    return data, int(match[3])


def remote_tensors(repo_id: str, revision: str, filename: str, local_path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file on the Hub, read from its header alone (two small ranged reads), with
    their real offsets in the file; ``local_path`` is where the file would be once downloaded."""
    first, total = read_range(repo_id, revision, filename, 0, 8)
    size = header_length(first)
    text = read_range(repo_id, revision, filename, 8, 8 + size)[0] if size else b""
    return header_tensors(parse_header(text, size), 8 + size, total, local_path)
