"""The GGUF files of a model, as cards and uploads list them: ``NAME.QUANT.gguf``, smallest first."""

from __future__ import annotations

import hashlib
import json
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


#: the files of a model folder that llama.cpp's converter reads: the weights and their index, the configs and the
#: tokenizer (its gguf-py vocab reads the chat template and BPE merges too). Not the card, nor what later steps
#: write beside the model (eval.json, answers.json, ...), nor lazymoe's hidden records.
_CONVERTER_READS = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """The state of the files of ``model_dir`` that a conversion reads. Small files by their content; weight
    files by their header (names, dtypes, shapes, offsets), size and modification time, since hashing gigabytes
    would cost as much as converting them. A merge writes every weight file anew, so a model merged again under
    the same name (other experts, another seed) has another fingerprint even when its shapes are the same; a
    copy that does not keep modification times has another one too (its GGUF files are then made again)."""
    lines = []
    for path in sorted(Path(model_dir).iterdir()):
        if not any(path.match(p) for p in _CONVERTER_READS) or not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                st = path.stat()
                with path.open("rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = f.read(min(size, 100_000_000))
                digest = f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(header).hexdigest()}"
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:  # a file that vanished while we look is not read by the converter either
            continue
        lines.append(f"{path.name}\0{digest}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def own_gguf_names(names: Iterable[str], name: str) -> list[str]:
    """Those of ``names`` that are model ``name``'s GGUF files: ``NAME.TAG.gguf`` exactly (never a path, never
    another model's ``NAME.v2.F16.gguf``)."""
    return [n for n in names if (tag := quant_of(n)) is not None and n == f"{name}.{tag}.gguf"]


def recorded_files(out: Path, made_from: dict[str, str], name: str, state: str, *, current: bool) -> list[Path]:
    """Model ``name``'s GGUF files in ``out`` that the record ``made_from`` says were made from ``state`` (with
    ``current``), or from another state of the model (without); only those on disk, sorted."""
    return sorted(out / n for n in own_gguf_names(made_from, name)
                  if (made_from[n] == state) == current and (out / n).is_file())


def current_gguf_files(model_dir: str | os.PathLike, outdir: str | os.PathLike | None = None, *,
                       name: str | None = None) -> list[Path]:
    """The GGUF files of ``model_dir`` in ``outdir`` (default ``NAME-GGUF`` beside it) made from the model as it is
    now, by the record :func:`convert_to_gguf` keeps; sorted by name. Files it does not record, or that were made
    before the model was merged again, are not among them."""
    model_dir = Path(model_dir)
    name = name or model_dir.resolve().name
    out = Path(outdir) if outdir is not None else gguf_dir_of(model_dir, name)
    made_from = read_gguf_record(out).made_from
    if not made_from or not model_dir.is_dir():
        return []
    return recorded_files(out, made_from, name, model_fingerprint(model_dir), current=True)


@dataclass(frozen=True)
class GGUFRecord:
    """A GGUF folder's record (:data:`GGUF_RECORD`): the model its files were made from (None in a record that
    does not say), the name they carry, and ``{file name: the model's state it was made from}``."""

    model: Path | None
    name: str | None
    made_from: dict[str, str]


def read_gguf_record(out: str | os.PathLike) -> GGUFRecord:
    """The record of the GGUF folder ``out``; an empty one when there is none or it cannot be read (then no file
    is reused, and none is known to be stale)."""
    empty = GGUFRecord(None, None, {})
    try:
        data = json.loads((Path(out) / GGUF_RECORD).read_text(encoding="utf-8"))
        made_from = data["made_from"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return empty
    if not isinstance(made_from, dict):
        return empty
    made_from = {k: v for k, v in made_from.items() if isinstance(k, str) and isinstance(v, str)}
    model, name = data.get("model"), data.get("name")
    readable = isinstance(model, str) and isinstance(name, str) and model.isprintable() and "\0" not in model
    return GGUFRecord(Path(model) if readable else None, name if readable else None, made_from)


def stale_gguf_files(out: str | os.PathLike) -> list[Path]:
    """The GGUF files in ``out`` that its record says were made from an earlier state of its model (merged again
    since); sorted. Empty when the record does not name the model, or the model is not there to compare with."""
    out = Path(out)
    record = read_gguf_record(out)
    if record.model is None or record.name is None or not record.model.is_dir():
        return []
    return recorded_files(out, record.made_from, record.name, model_fingerprint(record.model), current=False)


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
