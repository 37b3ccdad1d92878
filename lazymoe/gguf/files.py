"""The GGUF files of a model, as cards and uploads list them: ``NAME.QUANT.gguf``, smallest first."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CardError, GGUFError
from ..io.folder import CARD_FILENAME, CARD_RECORD, CONFIG_FILENAME, GGUF_RECORD, foreign_entries
from .quants import PREFERENCE, UNQUANTISED, quant_of

UNQUANTISED_NAMES = frozenset(q.name for q in UNQUANTISED)
#: every file lazymoe writes into a GGUF folder (shell patterns): the GGUF files, the recipe copy ``lazymoe chat``
#: reads, the NAME-GGUF card and its record, the record of what each GGUF file was made from, and while ``lazymoe
#: gguf`` runs its hidden partial files and the converter's log. A folder holding anything else holds files of
#: the user's own.
GGUF_FOLDER_FILES = ("*.gguf", CONFIG_FILENAME, CARD_FILENAME, CARD_RECORD, GGUF_RECORD, f".{GGUF_RECORD}.tmp-*",
                     ".*.gguf.partial", ".*.convert.log")


@dataclass(frozen=True)
class GGUFFile:
    name: str
    size_bytes: int

    @property
    def quant(self) -> str | None:
        """``NAME.Q4_K_M.gguf`` -> ``Q4_K_M`` (the naming the gguf command uses)."""
        return quant_of(self.name)


def gguf_dir_of(model_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Where ``lazymoe gguf`` writes a model's GGUF files unless told otherwise: ``NAME-GGUF`` beside the model
    folder (``NAME``: the folder's name)."""
    model = Path(model_dir).resolve()
    return model.parent / f"{name or model.name}-GGUF"


def foreign_gguf_entries(folder: str | os.PathLike) -> list[str]:
    """What ``folder`` holds that lazymoe never writes into a GGUF folder (subfolders with a trailing ``/``), sorted."""
    return foreign_entries(folder, GGUF_FOLDER_FILES)


def find_gguf_files(source: str | os.PathLike | Iterable[str | os.PathLike | GGUFFile]) -> list[GGUFFile]:
    """GGUF files from a folder (every ``*.gguf`` in it) or a list of paths, smallest first."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise CardError(f"{folder} is not a folder of GGUF files.")
        source = sorted(folder.glob("*.gguf"))
        if not source:
            raise CardError(f"{folder} has no *.gguf files; make them with lazymoe gguf first.")
    files = []
    for item in source:
        if not isinstance(item, GGUFFile):
            path = Path(item)
            if not path.is_file():
                raise CardError(f"GGUF file {path} does not exist.")
            item = GGUFFile(path.name, path.stat().st_size)
        files.append(item)
    return sorted(files, key=lambda f: (f.size_bytes, f.name))


def preferred_gguf(paths: Iterable[str | os.PathLike]) -> Path:
    """The file to run or recommend: the most advisable quantisation (``quants.PREFERENCE``), else the first."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise GGUFError("There are no GGUF files yet: run the GGUF step (lazymoe gguf) first.")
    rank = {quant: i for i, quant in enumerate(q for q in PREFERENCE if q not in UNQUANTISED_NAMES)}
    quantised = [p for p in paths if quant_of(p.name) in rank]
    return min(quantised, key=lambda p: rank[quant_of(p.name)]) if quantised else paths[0]
