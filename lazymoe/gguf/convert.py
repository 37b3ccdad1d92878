"""Merged model → GGUF: llama.cpp's converter for the 16/32-bit file, ``llama_model_quantize`` for each quant.

Every step checks its own result (converter exit status and output, quantiser return code, tensors that
fell back to another type) and stops with the real cause; disk space is checked before each step; files are
written under a hidden ``.partial`` name and renamed only when complete, so a final name is always a whole
file and a rerun resumes by skipping them. A file is skipped only when the folder's record (:data:`GGUF_RECORD`)
says it was made from the model's files as they are now (a merge again, with other experts or another seed,
writes new ones): a model merged again under the same name never gets its earlier GGUF files.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from ..errors import GGUFError, InsufficientResourcesError, Setting, Text
from ..io.folder import CONFIG_FILENAME, GGUF_RECORD, free_disk_bytes, require_weights, write_text_atomic
from ..io.safetensors import scan_file
from ..moe import arch
from ..options import check_count
from ..units import human_bytes
from .converter import (
    CLASSIC_LAYOUT,
    TENSOR_LINE,
    cache_root,
    converter_cached,
    ensure_converter,
    llama_cpp_python_version,
    run_converter,
)
from ..io.outdir import DISK_MARGIN_BYTES
from .llama import capture_llama_log, import_llama_cpp
from .files import (foreign_gguf_entries, gguf_dir_of, model_fingerprint, own_gguf_names, read_gguf_record,
                    recorded_files)
from .header import gguf_problem
from .quants import DEFAULT_QUANTS, OUTTYPES, gguf_bytes, parse_quants, quant_of

log = logging.getLogger("lazymoe.gguf")

_FALLBACK_RE = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING: must use F16 due to unusual shape\)\s*)?"
    r"-> falling back to\s+(?P<used>\S+)"
)


@dataclass(frozen=True)
class Fallback:
    """A tensor llama.cpp could not give the requested type (its width is not a multiple of the block size)."""

    tensor: str
    ncols: int
    block: int
    wanted: str
    used: str

    def __str__(self) -> str:
        return f"{self.tensor} (width {self.ncols} not divisible by {self.block}: {self.wanted} -> {self.used})"


@dataclass
class QuantReport:
    path: Path
    quant: str
    seconds: float
    fallbacks: list[Fallback] = field(default_factory=list)

    def summary(self) -> str:
        if not self.fallbacks:
            return f"{self.quant}: every tensor got its requested type."
        shown = "; ".join(str(f) for f in self.fallbacks[:6])
        more = f"; and {len(self.fallbacks) - 6} more" if len(self.fallbacks) > 6 else ""
        return (f"{self.quant}: {len(self.fallbacks)} tensor(s) fell back to another type because their width is "
                f"not a multiple of the quant's block size (K-quants need 256): {shown}{more}.")


def _model_params(model_dir: Path) -> int:
    """Parameter count from safetensors headers alone; also refuses layouts the converter cannot read."""
    shards = sorted(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not shards:
        raise GGUFError(f"{model_dir} is not a Hugging Face model folder (needs config.json and *.safetensors); "
                        "pass the folder `lazymoe merge` wrote.")
    total = 0
    for shard in shards:
        try:
            infos = scan_file(shard)
        except (OSError, ValueError) as err:
            raise GGUFError(f"cannot read {shard}: {err}") from err
        for info in infos.values():
            if arch.layout_of([info.name]) == "fused":
                raise GGUFError(Text(
                    f"{model_dir} stores experts in transformers 5's fused layout ({info.name}), which llama.cpp's "
                    f"converter cannot map; merge again and {CLASSIC_LAYOUT.placeholder} (the default).",
                    (CLASSIC_LAYOUT,)))
            total += info.numel
    return total


def _check_outdir(model_dir: Path, out: Path, default: Path, *, given: bool, overwrite: bool) -> None:
    """Refuse, before any work, a GGUF folder that would mix the files with something else: a model folder or a
    folder inside one, the filesystem root, the home folder, a file, or a folder holding files of the user's own
    (unless ``overwrite``: then they go beside those). ``given``: the user named ``out``; else it is ``default``,
    and a message says how to clear the way (the notebook and ``publish`` have no outdir to change)."""
    outdir = Setting("outdir", ..., noun=True)
    named = Text(f"{outdir.placeholder} {out}", (outdir,)) if given else Text(f"{out}")
    _check_not_a_model_folder(model_dir, out, default, named)
    target = out.resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder to protect (no HOME, no passwd entry)
        home = None
    if target == Path(target.anchor) or target == home:
        where = "your home folder" if target == home else "the filesystem root"
        raise GGUFError(Text.join([named, f" is {where}: give the GGUF files a folder of their own (such as "
                                          f"{target / default.name}), or leave it out to write them to {default}."]))
    if target.exists() and not target.is_dir():
        fix = f"give a new or empty folder, or leave it out to write them to {default}" if given else \
            "move that file away and run again"
        raise GGUFError(Text.join([named, f" is a file, not a folder for the GGUF files: {fix}."]))
    foreign = foreign_gguf_entries(target) if target.is_dir() else []
    if foreign and not overwrite:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        replace = Setting("overwrite", True)
        fix = Text(f"give a new or empty folder, or {replace.placeholder} to write them beside those (files of the "
                   "same names are replaced)", (replace,)) if given else "move them out of it and run again"
        raise GGUFError(Text.join([named, f" holds files lazymoe did not write there ({', '.join(foreign[:3])}{more}), "
                                          "so the GGUF files would mix with them: ", fix, "."]))


def _check_not_a_model_folder(model_dir: Path, out: Path, default: Path, named: Text) -> None:
    """GGUF files go beside a model, never into a model folder: a push of that folder uploads every file in it (the
    GGUF files would go up with the model) and a merged folder holding them no longer holds only a merged model
    (``io.folder.OUTPUT_FILES``), so a later ``overwrite`` refuses to replace it."""
    model, target = model_dir.resolve(), out.resolve()
    inside = target == model or model in target.parents
    holder = None if inside else _model_folder_above(target)  # another model's folder, or a folder inside one
    if not inside and holder is None and not (target / "config.json").is_file():
        return
    if inside:
        where = f"inside the model folder {model_dir}"
    elif holder is None or holder == target:
        where = "a model folder (it holds config.json)"
    else:
        where = f"inside the model folder {holder}"
    raise GGUFError(Text.join([named, f" is {where}: a push of that folder would upload the GGUF files with the "
                                      f"model. Leave it out to write them to {default}, or give a folder outside any "
                                      "model folder."]))


def _model_folder_above(path: Path) -> Path | None:
    """The nearest of ``path`` and its parents that holds a model (config.json and its weights), or None."""
    for folder in (path, *path.parents):
        if (folder / "config.json").is_file() and (
                (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors"))):
            return folder
    return None


def _check_disk(folder: Path, need: int, what: str) -> None:
    free = free_disk_bytes(folder)
    if free < need + DISK_MARGIN_BYTES:
        outdir = Setting("outdir", ...)
        raise InsufficientResourcesError(Text(
            f"not enough disk for {what}: about {human_bytes(need + DISK_MARGIN_BYTES)} needed ({human_bytes(need)} "
            f"+ {human_bytes(DISK_MARGIN_BYTES)} margin), {human_bytes(free)} free in {folder}; "
            f"free space, {outdir.placeholder} (another folder), or request fewer quantisations.", (outdir,)))


def _partial(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *,
                  threads: int | None = None) -> QuantReport:
    """Quantise one GGUF file with ``llama_model_quantize``; raise GGUFError with llama.cpp's reason on failure.

    Writes ``dst`` atomically (a ``.partial`` name until the quantiser returns 0) and reports which tensors
    fell back to another type.
    """
    check_count("threads", threads)
    (quant,) = parse_quants([quant])
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GGUFError(f"cannot quantise {src}: the file does not exist (did the conversion step fail?).")
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    params.nthread = threads or 0  # 0: all cores
    tmp = _partial(dst)
    start = time.perf_counter()
    try:
        with capture_llama_log() as chunks:
            code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        text = "".join(chunks)
        if code != 0 or not tmp.is_file():
            errors = [ln for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
            detail = "\n".join("    " + ln for ln in (errors or text.splitlines())[-10:])
            raise GGUFError(f"llama.cpp could not quantise {src.name} to {quant} (return code {code}):\n{detail}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fallbacks = [Fallback(m["tensor"], int(m["ncols"]), int(m["block"]), m["wanted"], m["used"])
                 for m in _FALLBACK_RE.finditer(text)]
    return QuantReport(dst, quant, time.perf_counter() - start, fallbacks)


def convert_to_gguf(
    model_dir: str | os.PathLike,
    outdir: str | os.PathLike | None = None,
    *,
    outtype: str = "f16",
    quants: str | Iterable[str] | None = DEFAULT_QUANTS,
    threads: int | None = None,
    progress: bool = True,
    name: str | None = None,
    overwrite: bool = False,
    converter_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Convert a merged model to ``NAME.{OUTTYPE}.gguf`` and quantise it to each of ``quants``.

    Output goes to ``outdir`` (default: ``MODEL_DIR-GGUF`` beside the model). Existing complete files made from
    the model as it is now (the folder's record says so) are reused unless ``overwrite``. Returns the paths, the
    unquantised file first. Tensors that had to take another type are logged as warnings (use
    :func:`quantize_gguf` to get them as data).
    """
    check_count("threads", threads)
    model_dir = Path(model_dir)
    require_weights(model_dir)  # a merged folder whose shards went to the Hub says where they are
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise GGUFError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPES)}.")
    quant_list = parse_quants(quants)
    if quant_list and outtype == "q8_0":
        raise GGUFError("quantisations are made from the f16, bf16 or f32 file: with outtype q8_0, request no further "
                        "quantisation (or keep outtype f16 and add Q8_0 to the quantisations).")
    name = name or model_dir.resolve().name
    default = gguf_dir_of(model_dir, name)
    out = Path(outdir) if outdir is not None else default
    _check_outdir(model_dir, out, default, given=outdir is not None, overwrite=overwrite)
    if quant_list:
        import_llama_cpp()  # fail now, not after a long conversion
    n_params = _model_params(model_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GGUFError(f"Cannot create the GGUF folder {out} ({err.strerror or err}); choose a folder you can "
                        "write to.") from None
    if (model_dir / CONFIG_FILENAME).is_file():  # lets `lazymoe chat` find the prompts: this merge's, not an earlier's
        shutil.copy2(model_dir / CONFIG_FILENAME, out / CONFIG_FILENAME)

    made_from = read_gguf_record(out).made_from
    bar = _progress_bar(1 + len(quant_list), progress)
    try:
        base = out / f"{name}.{outtype.upper()}.gguf"
        bar.set_description(f"convert {outtype.upper()}")
        model_state = model_fingerprint(model_dir)
        if _reusable(base, overwrite, made_from, model_state):
            log.info("%s exists from an earlier conversion of this model: reusing it (delete it to rebuild)", base)
        else:
            _check_disk(out, int(gguf_bytes(n_params, outtype) * 1.02), base.name)
            folder = Path(converter_dir) if converter_dir else None
            if folder is None and not converter_cached():
                _say(bar, progress, f"Fetching llama.cpp's converter with pip (the llama-cpp-python "
                                    f"{llama_cpp_python_version()} sdist, about 75 MB; once per version, about 2-3 "
                                    f"minutes), into {cache_root()}")
                bar.set_description("fetch llama.cpp's converter (once)")
                folder = ensure_converter()
                bar.set_description(f"convert {outtype.upper()}")
            tmp, converter_log = _partial(base), out / f".{name}.{outtype.upper()}.convert.log"
            tensors = _progress_bar(_tensor_count(model_dir), progress, unit="tensor",
                                    desc="  tensors converted", leave=False)
            try:
                run_converter(model_dir, tmp, outtype, converter_dir=folder, log_file=converter_log,
                              on_line=lambda line: tensors.update(1) if TENSOR_LINE.match(line) else None)
                os.replace(tmp, base)
                converter_log.unlink(missing_ok=True)  # kept only when the conversion fails (the error names it)
            finally:
                tensors.close()
                tmp.unlink(missing_ok=True)
            _record(out, made_from, base, model_state, model_dir, name)
        bar.update(1)
        paths = [base]
        for quant in quant_list:
            bar.set_description(f"quantise {quant}")
            dst = out / f"{name}.{quant}.gguf"
            if _reusable(dst, overwrite, made_from, model_state):
                log.info("%s exists from an earlier quantisation of this model: reusing it", dst)
            else:
                _check_disk(out, int(gguf_bytes(n_params, quant) * 1.1), dst.name)
                report = quantize_gguf(base, dst, quant, threads=threads)
                if report.fallbacks:
                    log.warning("%s", report.summary())
                _record(out, made_from, dst, model_state, model_dir, name)
            paths.append(dst)
            bar.update(1)
        _warn_stale(out, made_from, name, model_state)
    finally:
        bar.close()
    return paths


def _warn_stale(out: Path, made_from: dict[str, str], name: str, state: str) -> None:
    """Say which of the model's GGUF files in ``out`` were made from an earlier state of the model (a merge
    again, and a quantisation this run did not ask for): they are left, but an upload of the folder or its card
    would take them for this model."""
    stale = [p.name for p in recorded_files(out, made_from, name, state, current=False)]
    unknown = [n for n in own_gguf_names((p.name for p in out.glob("*.gguf")), name)
               if n not in made_from]  # made by a lazymoe before the record
    for names, what in ((stale, "made from the model as it was before (merged again since)"),
                        (unknown, "of unknown origin (no record says what it was made from)")):
        if names:
            them = "it" if len(names) == 1 else "them"
            log.warning("%s: %s %s, and not made again by this run; delete %s, or ask for %s too, before uploading "
                        "this folder.", out, ", ".join(sorted(names)), what, them, them)


def _record(out: Path, made_from: dict[str, str], path: Path, state: str, model_dir: Path, name: str) -> None:
    """Note that ``path`` was made from ``state`` of the model ``model_dir`` (after it was written whole)."""
    made_from[path.name] = state
    record = {"model": str(model_dir.resolve()), "name": name, "made_from": made_from}
    write_text_atomic(out / GGUF_RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _reusable(path: Path, overwrite: bool, made_from: dict[str, str], state: str) -> bool:
    """Whether a file an earlier run made at ``path`` is kept instead of made again: not with ``overwrite``, only
    when the record says it was made from ``state`` (what it would be made from now), and never one that is not
    whole (llama.cpp would refuse it later with a message about offsets)."""
    if overwrite or not path.is_file():
        return False
    if made_from.get(path.name) != state:
        why = "the model changed since it was made" if path.name in made_from else "nothing records what it was made from"
        log.info("%s is from an earlier conversion, but %s: making it again.", path, why)
        return False
    problem = gguf_problem(path)
    if problem is not None:
        log.warning("%s is not a whole GGUF file (%s); making it again.", path, problem)
    return problem is None


def _progress_bar(total: int, enabled: bool, *, unit: str = "file", desc: str | None = None,
                  leave: bool = True) -> Any:
    return tqdm(total=total, unit=unit, desc=desc, leave=leave, disable=not enabled)


def _say(bar: Any, enabled: bool, text: str) -> None:
    """A line above the progress bar (what is happening and how long it takes); silent with progress off."""
    log.info("%s", text)
    if enabled:
        bar.write(text, file=sys.stderr)


def _tensor_count(model_dir: Path) -> int:
    """How many tensors the converter writes: one per tensor, except that each layer's experts are stacked."""
    names = {re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
             for shard in sorted(model_dir.glob("*.safetensors")) for name in scan_file(shard)}
    return len(names)
