"""What a lazymoe output folder holds, and the small file operations every stage shares.

A merged folder is recognised by its recipe (``lazymoe_config.yml``) next to ``config.json``; the merge
writes both last-but-one, just before the folder is renamed into place, so a folder with both is finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ModelNotFoundError

#: what the merged folder calls the recipe that built it (written by merge, read by card, gguf and the notebook)
CONFIG_FILENAME = "lazymoe_config.yml"


def is_lazymoe_output(folder: str | os.PathLike, *, follow_links: bool = True) -> bool:
    """True for a folder a finished ``lazymoe merge`` wrote: its recipe next to config.json.

    ``follow_links=False``: a link to such a folder is not one (the output transaction never replaces or
    deletes through a link)."""
    folder = Path(folder)
    if not follow_links and folder.is_symlink():
        return False
    return folder.is_dir() and (folder / CONFIG_FILENAME).is_file() and (folder / "config.json").is_file()


def require_lazymoe_output(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path if a finished merge wrote it, else :class:`ModelNotFoundError` saying what to give."""
    folder = Path(folder)
    if not is_lazymoe_output(folder):
        raise ModelNotFoundError(f"{folder} has no config.json and {CONFIG_FILENAME}; give the folder lazymoe merge "
                                 "wrote.")
    return folder


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
