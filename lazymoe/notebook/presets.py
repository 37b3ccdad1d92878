"""Presets: a mergekit-moe YAML with one optional extra block, ``notebook:``, holding what the notebook form
needs beyond the MoE config (model name, licence, upload and GGUF choices...). Removing that block leaves a
config any mergekit-moe user recognises.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..options import DEFAULT_MAX_SHARD, NotebookSettings

def _kind(name: str) -> type | tuple[type, ...]:
    annotation = NotebookSettings.model_fields[name].annotation
    if name == "max_shard_bytes":
        return (str, int)  # "2GB" or a number of bytes
    return list if annotation == tuple[str, ...] else annotation


def _default(name: str) -> Any:
    if name == "max_shard_bytes":
        return DEFAULT_MAX_SHARD  # shown in the form as written
    value = NotebookSettings.model_fields[name].default
    return list(value) if isinstance(value, tuple) else value


#: ``notebook:`` keys a preset may set, with their types and the default the form starts from: the notebook
#: settings (``options.NotebookSettings``) plus what only the generated notebook reads
NOTEBOOK_KEYS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "title": (str, None),
    "description": (str, ""),
    **{name: (_kind(name), _default(name)) for name in NotebookSettings.model_fields
       if name not in ("layout", "device")},  # fixed in the notebook: classic layout, the device auto-detected
    "demo_dir": (str, None),
}


@dataclass(frozen=True)
class Preset:
    name: str  # file stem
    text: str  # the YAML exactly as written (embedded in the notebook)
    config: dict  # the mergekit-moe part, not yet validated (the form reports its problems)
    notebook: dict = field(default_factory=dict)  # NOTEBOOK_KEYS, defaults filled in
    given: tuple[str, ...] = ()  # the keys the preset's notebook block actually sets

    @property
    def title(self) -> str:
        return self.notebook["title"] or self.notebook["model_name"]

    @property
    def demo_dir(self) -> str | None:
        return self.notebook["demo_dir"]


def parse_preset(text: str, name: str = "preset") -> Preset:
    """Split a preset (or a plain mergekit-moe YAML) into its config and ``notebook:`` settings."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"The preset is not valid YAML{where}: {getattr(err, 'problem', None) or err}.") from None
    if not isinstance(data, dict):
        raise ConfigError("A preset must be a mapping: a mergekit-moe config, optionally with a 'notebook:' block.")
    data = dict(data)
    block = data.pop("notebook", None) or {}
    if not isinstance(block, dict):
        raise ConfigError("The preset's 'notebook:' block must be a mapping (model_name, upload, gguf, ...).")
    settings = {key: copy.deepcopy(default) for key, (_, default) in NOTEBOOK_KEYS.items()}
    for key, value in block.items():
        if key not in NOTEBOOK_KEYS:
            close = difflib.get_close_matches(str(key), NOTEBOOK_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(NOTEBOOK_KEYS)}."
            raise ConfigError(f"Unknown key '{key}' in the preset's notebook block.{hint}")
        kind, default = NOTEBOOK_KEYS[key]
        ok = (value is None and default is None) or (
            isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            and (kind is not list or all(isinstance(v, str) for v in value)))
        if not ok:
            want = {str: "text", bool: "true or false", list: "a list of names"}.get(kind, "text or a number")
            raise ConfigError(f"notebook.{key} in the preset must be {want}, got {value!r}.")
        settings[key] = value
    return Preset(name=name, text=text, config=data, notebook=settings, given=tuple(block))


def load_preset(path: str | Path) -> Preset:
    path = Path(path)
    return parse_preset(path.read_text(encoding="utf-8"), name=path.stem)
