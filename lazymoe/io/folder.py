"""What a lazymoe output folder holds, and the small file operations every stage shares.

A merged folder is recognised by its recipe (``lazymoe_config.yml``) next to ``config.json``; the merge
writes both last-but-one, just before the folder is renamed into place, so a folder with both is finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..errors import ModelFormatError, ModelNotFoundError

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


def read_json(path: Path, what: str, ref: object) -> dict:
    """A JSON object from a model's file, or ModelFormatError saying which file is broken and what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelFormatError(f"{ref}: {what} is not UTF-8 text; the file is damaged, download the model again.") from None
    except (ValueError, RecursionError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise ModelFormatError(
            f"{ref}: {what} is not valid JSON{where}; the file is damaged, download the model again."
        ) from None
    if not isinstance(data, dict):
        raise ModelFormatError(
            f"{ref}: {what} holds a JSON {type(data).__name__}, not an object; download the model again."
        )
    return data


def read_folder_config(folder: Path) -> dict:
    """A merged (or dense) folder's config.json as a dict, or one ModelFormatError saying what is wrong with it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; give the folder lazymoe merge wrote.")
    return read_json(path, "config.json", str(folder))


def read_folder_recipe(folder: Path) -> dict | None:
    """The recipe a merge saved in ``folder`` (None if there is none), or ModelFormatError if it is damaged."""
    path = Path(folder) / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problem = getattr(err, "problem", None) or "not readable"
        raise ModelFormatError(f"{path} is damaged ({problem}); merge again, or restore it from the model "
                               "card's recipe.") from None
    if data is not None and not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a recipe (a YAML mapping); merge again, or restore it from the "
                               "model card's recipe.")
    return data


def load_folder_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, or one ModelFormatError naming the files to restore."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ModelFormatError(f"{folder} has no usable tokenizer ({str(err).splitlines()[0][:160]}); copy the "
                               "base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it, "
                               "or merge again.") from None


def missing_weights(folder: Path) -> list[str]:
    """The weight files a merged folder's index names that are not in it: a merge that uploaded each shard and
    deleted it (``merge --push --no-keep``) leaves the small files only."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return [] if (Path(folder) / "model.safetensors").is_file() else ["model.safetensors"]
    names = read_json(index, index.name, folder).get("weight_map", {})
    return sorted({n for n in names.values() if isinstance(n, str) and not (Path(folder) / n).is_file()})


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
