"""The form's edits on disk: saved on every change, restored when the form cell runs again.

The form is the one place to edit. Every change is written at once (atomically) to a recipe file next to the
notebook, ``<preset's model name>.lazymoe.yaml``: the preset format (a mergekit-moe config plus the ``notebook:``
block), so it is also what "Download YAML" and "Copy YAML" give, and what a new preset can be made from.
The token is never part of it.

Beside it, a hidden ``.<preset's model name>.lazymoe.preset.yaml`` keeps the PRESET text the edits started from. When
the form cell runs again (after a kernel restart, or after the PRESET text in the cell was edited), the
rule is **field by field, the later edit wins**: a field whose value in the PRESET text differs from the
PRESET the edits started from comes from the PRESET text (you just changed it there); every other field
keeps its form edit. When that replaces a form edit, the file as it was is kept as
``<preset's model name>.lazymoe.before-preset-edit.yaml`` first, and the form says which fields came from where.

Colab's ``/content`` survives a runtime restart but not a disconnect; ``save_to="drive"`` keeps the file in
Google Drive (``MyDrive/lazymoe/``) instead.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .colab import CONTENT_DIR
from .errors import ConfigError

SUFFIX = ".lazymoe.yaml"
DRIVE_MOUNT = Path(CONTENT_DIR) / "drive"
DRIVE_FOLDER = DRIVE_MOUNT / "MyDrive" / "lazymoe"


def recipe_filename(model_name: str) -> str:
    """``Beyonder-4x7B-v3`` -> ``Beyonder-4x7B-v3.lazymoe.yaml`` (anything but letters, digits, ``._-`` → ``-``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name.rsplit("/", 1)[-1]).strip("-.") or "recipe"
    return stem + SUFFIX


def recipe_folder(save_to: str | os.PathLike, *, in_colab: bool = False) -> Path:
    """Where to keep the recipe file: ``"here"`` (next to the notebook: the working folder), ``"drive"``
    (Google Drive, mounted now if needed: Colab only) or a folder path."""
    if str(save_to) == "here":
        return Path.cwd()
    if str(save_to) != "drive":
        return Path(save_to).expanduser()
    if not in_colab:
        raise ConfigError("Saving edits to Google Drive works in Colab only; here they are saved next to the "
                          "notebook: choose that in the form cell.")
    if not (DRIVE_MOUNT / "MyDrive").is_dir():
        from google.colab import drive  # Colab-only; asks the user to allow access

        drive.mount(str(DRIVE_MOUNT))
    return DRIVE_FOLDER


@dataclass(frozen=True)
class Saved:
    text: str  # the recipe as saved
    preset_text: str | None  # the PRESET the edits started from (None: the side file is missing)
    saved_at: float  # mtime


class RecipeFile:
    """One recipe file and the PRESET text it started from."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.base_path = self.path.with_name("." + self.path.name.replace(SUFFIX, ".lazymoe.preset.yaml"))

    def load(self) -> Saved | None:
        if not self.path.is_file():
            return None
        text = self.path.read_text(encoding="utf-8")
        base = self.base_path.read_text(encoding="utf-8") if self.base_path.is_file() else None
        return Saved(text=text, preset_text=base, saved_at=self.path.stat().st_mtime)

    def save(self, text: str, preset_text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.base_path.is_file() or self.base_path.read_text(encoding="utf-8") != preset_text:
            _write_atomic(self.base_path, preset_text)
        _write_atomic(self.path, text)

    def keep_copy(self, label: str) -> Path | None:
        """Copy the recipe file to ``<name>.lazymoe.<label>.yaml`` before it is replaced; its path."""
        if not self.path.is_file():
            return None
        copy = self.path.with_name(self.path.name.replace(SUFFIX, f".lazymoe.{label}.yaml"))
        _write_atomic(copy, self.path.read_text(encoding="utf-8"))
        return copy


def locate(folder: Path, title: str | None, model_name: str) -> RecipeFile:
    """The recipe file for a notebook in ``folder``: named after the preset's model name, or, when the PRESET text's title or name was edited since, the newest file whose PRESET had the same
    title or the same model name (so that editing the name in the cell does not lose the edits)."""
    default = RecipeFile(folder / recipe_filename(model_name))
    if default.path.is_file() or not folder.is_dir():
        return default
    found = []
    for base in folder.glob(".*.lazymoe.preset.yaml"):
        try:
            notebook = (yaml.safe_load(base.read_text(encoding="utf-8")) or {}).get("notebook") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if not isinstance(notebook, dict) or not ({notebook.get("title"), notebook.get("model_name")} - {None}) & {
                title, model_name}:
            continue
        file = RecipeFile(base.with_name(base.name[1:].replace(".lazymoe.preset.yaml", SUFFIX)))
        if file.path.is_file():
            found.append((file.path.stat().st_mtime, file))
    return max(found, key=lambda item: item[0])[1] if found else default


def _write_atomic(path: Path, text: str) -> None:
    # a restart in the middle of a write must never leave half a recipe: write beside it, then rename
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fields(recipe: dict) -> dict[str, object]:
    """A recipe as flat fields: top-level config keys, and ``notebook.KEY`` for the notebook block."""
    out = {k: v for k, v in recipe.items() if k != "notebook"}
    out.update({f"notebook.{k}": v for k, v in (recipe.get("notebook") or {}).items()})
    return out


def _unflatten(fields: dict[str, object]) -> dict:
    recipe: dict = {k: v for k, v in fields.items() if not k.startswith("notebook.")}
    notebook = {k[len("notebook."):]: v for k, v in fields.items() if k.startswith("notebook.")}
    if notebook:
        recipe["notebook"] = notebook
    return recipe


@dataclass(frozen=True)
class Restored:
    recipe: dict  # what the form should show
    from_preset: tuple[str, ...]  # fields taken from the edited PRESET text
    replaced_edits: tuple[str, ...]  # of those, the ones whose form edit was replaced


def restore(saved_text: str, saved_base: str | None, preset_text: str) -> Restored:
    """Combine saved form edits with the PRESET text now in the cell (the rule in the module docstring)."""
    saved = _load_mapping(saved_text, "the saved recipe")
    preset = _load_mapping(preset_text, "the PRESET")
    if saved_base is None or saved_base == preset_text:
        return Restored(saved, (), ())
    base = _load_mapping(saved_base, "the PRESET the edits started from")
    new, old, mine = _fields(preset), _fields(base), _fields(saved)
    changed = tuple(k for k in dict.fromkeys([*new, *old]) if new.get(k) != old.get(k))
    replaced = tuple(k for k in changed if mine.get(k) != old.get(k) and mine.get(k) != new.get(k))
    merged = dict(mine)
    for key in changed:
        if key in new:
            merged[key] = new[key]
        else:
            merged.pop(key, None)
    return Restored(_unflatten(merged), changed, replaced)


class _Dumper(yaml.SafeDumper):
    """Lists of plain values on one line (``positive_prompts: [chat, code]``), as mergekit-moe YAML is written."""


def _represent_list(dumper: yaml.SafeDumper, data: list):
    flow = all(isinstance(v, (str, int, float, bool)) and "\n" not in str(v) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump(recipe: dict) -> str:
    return yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def _load_mapping(text: str, what: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a mapping.")
    return data


def saved_when(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))
