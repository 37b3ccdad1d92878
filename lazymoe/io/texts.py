"""Text files the user points a recipe at (``eval_texts``, ``calibration_text``): ``.txt`` (texts separated
by blank lines), ``.jsonl`` (a JSON object with ``text``, or a JSON string, a line) or ``.json`` (a list
of strings)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .folder import read_user_text

#: the endings that make a one-line ``calibration_text`` item a file to read rather than text to route on
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def names_text_file(item: str) -> bool:
    """Whether a ``calibration_text`` item is a file name: one line ending in a text-file suffix."""
    line = item.strip()
    return "\n" not in line and line.lower().endswith(TEXT_FILE_SUFFIXES)


def read_text_file(path: Path, field: str = "eval_texts") -> list[str]:
    """The texts in ``path``; ``ConfigError`` naming ``field`` when it is missing, malformed or empty."""
    if not path.exists():
        raise ConfigError(f"{field} file {path} does not exist; give a .txt, .jsonl or .json file, or a list "
                          "of texts.")
    raw = read_user_text(path, f"{field} file")  # not UTF-8 (where), a folder, unreadable: one line each
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}, line {n}: not JSON; a .jsonl file holds one object with 'text' a line.") from None
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise ConfigError(f"{path}, line {n}: no 'text' string in it.")
            out.append(text)
    elif path.suffix.lower() == ".json":
        try:
            out = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}).") from None
        if not isinstance(out, list) or not all(isinstance(t, str) for t in out):
            raise ConfigError(f"{path} must hold a JSON list of strings.")
    else:
        out = [block.strip() for block in raw.replace("\r\n", "\n").split("\n\n")]
    out = [t for t in out if t.strip()]
    if not out:
        raise ConfigError(f"{field} file {path} holds no text.")
    return out


def expand_text_files(items: list[str], field: str) -> list[str]:
    """``items`` with every item that names a text file (``names_text_file``) replaced by the file's texts;
    a relative path is read from the current folder."""
    out: list[str] = []
    for item in items:
        if names_text_file(item):
            out.extend(read_text_file(Path(item.strip()).expanduser(), field))
        else:
            out.append(item)
    return out
