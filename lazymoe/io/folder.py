"""What a lazymoe output folder holds, and the small file operations every stage shares.

A merged folder is recognised by its recipe (``lazymoe_config.yml``) next to ``config.json``; the merge
writes both last-but-one, just before the folder is renamed into place, so a folder with both is finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: what the merged folder calls the recipe that built it (written by merge, read by card, gguf and the notebook)
CONFIG_FILENAME = "lazymoe_config.yml"


def is_lazymoe_output(folder: str | os.PathLike) -> bool:
    """True for a folder a finished ``lazymoe merge`` wrote: its recipe next to config.json."""
    folder = Path(folder)
    return (folder / CONFIG_FILENAME).is_file() and (folder / "config.json").is_file()


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``path``, or would hold it once created (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
