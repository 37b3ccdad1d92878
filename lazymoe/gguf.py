"""Merged model → GGUF: llama.cpp's converter for the 16/32-bit file, ``llama_model_quantize`` for each quant.

Every step checks its own result (converter exit status and output, quantiser return code, tensors that
fell back to another type) and stops with the real cause; disk space is checked before each step; files are
written under a hidden ``.partial`` name and renamed only when complete, so a final name is always a whole
file and a rerun resumes by skipping them.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import CONFIG_FILENAME
from .converter import (
    TENSOR_LINE,
    cache_root,
    converter_cached,
    ensure_converter,
    llama_cpp_python_version,
    run_converter,
)
from .errors import GGUFError, InsufficientResourcesError
from .outdir import DISK_MARGIN_BYTES
from .report import human_bytes
from .llama import capture_llama_log, chat, chat_loop, expert_prompts, find_config_for, import_llama_cpp

log = logging.getLogger("lazymoe.gguf")

#: quantisations offered, with approximate bits per weight (for the disk check, generous on purpose)
QUANT_BPW: dict[str, float] = {
    "Q2_K": 3.4, "Q3_K_S": 3.6, "Q3_K_M": 4.0, "Q3_K_L": 4.4, "Q4_0": 4.6, "Q4_1": 5.1, "Q4_K_S": 4.7,
    "Q4_K_M": 5.0, "Q5_0": 5.6, "Q5_1": 6.1, "Q5_K_S": 5.7, "Q5_K_M": 5.8, "Q6_K": 6.7, "Q8_0": 8.6,
}
QUANT_TYPES = tuple(QUANT_BPW)
DEFAULT_QUANTS = ("Q4_K_M", "Q5_K_M")
#: converter output types and their bits per weight
OUTTYPE_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5}

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


def parse_quants(quants: str | Iterable[str] | None) -> list[str]:
    """``"Q4_K_M,q5_k_m"``, a list, ``"all"`` or ``"none"`` → validated upper-case names, in order, no repeats."""
    if quants is None:
        return []
    items = quants.split(",") if isinstance(quants, str) else list(quants)
    items = [q.strip().upper() for q in items if q.strip()]
    if items == ["NONE"]:
        return []
    if items == ["ALL"]:
        return list(QUANT_TYPES)
    unknown = [q for q in items if q not in QUANT_BPW]
    if unknown:
        raise GGUFError(f"unknown quantisation {', '.join(unknown)}; choose from {', '.join(QUANT_TYPES)} "
                        "(or 'all', 'none').")
    return list(dict.fromkeys(items))


def _model_params(model_dir: Path) -> int:
    """Parameter count from safetensors headers alone; also refuses layouts the converter cannot read."""
    from .safetensors_io import scan_file

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
            if ".mlp.experts.gate_up_proj" in info.name:
                raise GGUFError(
                    f"{model_dir} stores experts in transformers 5's fused layout ({info.name}), which llama.cpp's "
                    "converter cannot map; merge again with `--layout classic` (the default).")
            total += info.numel
    return total


def _check_disk(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN_BYTES:
        raise InsufficientResourcesError(
            f"not enough disk for {what}: about {human_bytes(need + DISK_MARGIN_BYTES)} needed ({human_bytes(need)} "
            f"+ {human_bytes(DISK_MARGIN_BYTES)} margin), {human_bytes(free)} free in {folder}; "
            "free space, choose another --outdir, or request fewer quantisations.")


def _partial(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *,
                  threads: int | None = None) -> QuantReport:
    """Quantise one GGUF file with ``llama_model_quantize``; raise GGUFError with llama.cpp's reason on failure.

    Writes ``dst`` atomically (a ``.partial`` name until the quantiser returns 0) and reports which tensors
    fell back to another type.
    """
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

    Output goes to ``outdir`` (default: ``MODEL_DIR-GGUF`` beside the model). Existing complete files are
    reused unless ``overwrite``. Returns the paths, the unquantised file first. Tensors that had to take
    another type are logged as warnings (use :func:`quantize_gguf` to get them as data).
    """
    model_dir = Path(model_dir)
    outtype = outtype.lower()
    if outtype not in OUTTYPE_BITS:
        raise GGUFError(f"unknown outtype {outtype!r}; choose from {', '.join(OUTTYPE_BITS)}.")
    quant_list = parse_quants(quants)
    if quant_list and outtype == "q8_0":
        raise GGUFError("quantisations are made from the f16, bf16 or f32 file; with --outtype q8_0 request no "
                        "further --quant (or add Q8_0 to --quant and keep --outtype f16).")
    if quant_list:
        import_llama_cpp()  # fail now, not after a long conversion
    n_params = _model_params(model_dir)
    name = name or model_dir.resolve().name
    out = Path(outdir) if outdir is not None else model_dir.resolve().parent / f"{name}-GGUF"
    out.mkdir(parents=True, exist_ok=True)
    if (model_dir / CONFIG_FILENAME).is_file() and not (out / CONFIG_FILENAME).exists():
        shutil.copy2(model_dir / CONFIG_FILENAME, out / CONFIG_FILENAME)  # lets `lazymoe chat` find the prompts

    bar = _progress_bar(1 + len(quant_list), progress)
    try:
        base = out / f"{name}.{outtype.upper()}.gguf"
        bar.set_description(f"convert {outtype.upper()}")
        if base.is_file() and not overwrite:
            log.info("%s exists, reusing it (pass overwrite=True to rebuild)", base)
        else:
            _check_disk(out, int(n_params * OUTTYPE_BITS[outtype] / 8 * 1.02), base.name)
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
        bar.update(1)
        paths = [base]
        for quant in quant_list:
            bar.set_description(f"quantise {quant}")
            dst = out / f"{name}.{quant}.gguf"
            if dst.is_file() and not overwrite:
                log.info("%s exists, reusing it", dst)
            else:
                _check_disk(out, int(n_params * QUANT_BPW[quant] / 8 * 1.1), dst.name)
                report = quantize_gguf(base, dst, quant, threads=threads)
                if report.fallbacks:
                    log.warning("%s", report.summary())
            paths.append(dst)
            bar.update(1)
    finally:
        bar.close()
    return paths


def _progress_bar(total: int, enabled: bool, *, unit: str = "file", desc: str | None = None,
                  leave: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, leave=leave, disable=not enabled)


def _say(bar: Any, enabled: bool, text: str) -> None:
    """A line above the progress bar (what is happening and how long it takes); silent with progress off."""
    log.info("%s", text)
    if enabled:
        bar.write(text, file=sys.stderr)


def _tensor_count(model_dir: Path) -> int:
    """How many tensors the converter writes: one per tensor, except that each layer's experts are stacked."""
    from .safetensors_io import scan_file

    names = {re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
             for shard in sorted(model_dir.glob("*.safetensors")) for name in scan_file(shard)}
    return len(names)


# --- command line -------------------------------------------------------------------------------------------

def add_gguf_parsers(subparsers: Any) -> None:
    """Register ``lazymoe gguf`` and ``lazymoe chat`` on an argparse subparsers object."""
    p = subparsers.add_parser("gguf", help="convert a merged model to GGUF and quantise it (llama.cpp)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--quant", default=",".join(DEFAULT_QUANTS),
                   help=f"comma-separated, 'all' or 'none' (default {','.join(DEFAULT_QUANTS)}); "
                        f"menu: {','.join(QUANT_TYPES)}")
    p.add_argument("--outdir", help="where to write (default: MODEL_DIR-GGUF beside the model)")
    p.add_argument("--outtype", default="f16", choices=tuple(OUTTYPE_BITS), help="unquantised file type (default f16)")
    p.add_argument("--threads", type=int, help="quantiser threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="rebuild files that already exist")
    p.set_defaults(func=run_gguf)

    p = subparsers.add_parser("chat", help="answer prompts with a GGUF file (one per expert by default, or "
                                           "a conversation with -i)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf_file", metavar="GGUF_FILE", help="a .gguf file written by `lazymoe gguf`")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: type messages, the model answers with the conversation so far")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per expert, built from "
                                                      "its positive prompts in lazymoe_config.yml")
    p.add_argument("--config", help="the lazymoe_config.yml to build per-expert prompts from "
                                    "(default: beside the GGUF file or its parent)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU (-1: all, when the build has one)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length, in tokens")
    p.set_defaults(func=run_chat)


def run_gguf(args: Any) -> int:
    paths = convert_to_gguf(args.model_dir, args.outdir, outtype=args.outtype, quants=args.quant,
                            threads=args.threads, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    for path in paths:
        print(f"{path}  ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


def run_chat(args: Any) -> int:
    gguf_file = Path(args.gguf_file)
    if getattr(args, "interactive", False):  # a Namespace built in code may not have it
        chat_loop(gguf_file, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads, max_tokens=args.max_tokens,
                  n_ctx=args.n_ctx)
        return 0
    if args.prompt:
        labelled = [(None, p) for p in args.prompt]
    else:
        config = Path(args.config) if args.config else find_config_for(gguf_file)
        if config is None:
            raise GGUFError(f"no --prompt given and no {CONFIG_FILENAME} beside {gguf_file} to build one prompt per "
                            "expert from; pass --prompt TEXT or --config PATH.")
        labelled = expert_prompts(config)
    replies = chat(gguf_file, [p for _, p in labelled], n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                   max_tokens=args.max_tokens, n_ctx=args.n_ctx)
    for (expert, prompt), reply in zip(labelled, replies):
        print(f"--- {'expert ' + expert + ': ' if expert else ''}{prompt}\n{reply.strip()}\n")
    return 0
