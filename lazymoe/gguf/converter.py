"""llama.cpp's own HF→GGUF converter, obtained to match the installed llama-cpp-python, run in a subprocess.

The installed llama-cpp-python wheel carries neither ``convert_hf_to_gguf.py`` nor the ``gguf-py`` it needs
(PyPI's ``gguf`` lags behind it), but the sdist on PyPI vendors both. We fetch that sdist with pip itself
(so pip's index, proxy and cache settings apply: Colab, CI and a laptop alike), keep only the converter,
its ``conversion`` package and ``gguf-py``, and cache them per version. llama.cpp's requirements files are
never installed: the converter runs with lazymoe's own torch, transformers, sentencepiece and numpy.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import GGUFError, Setting, Text
from .install import LLAMA_CPP_PYTHON_VERSION

log = logging.getLogger("lazymoe.gguf")

#: what we keep from the sdist's ``vendor/llama.cpp`` folder
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
_SDIST_PREFIX = "vendor/llama.cpp/"

#: what a merge for llama.cpp must use (each front end words it: layout='classic', --layout classic)
CLASSIC_LAYOUT = Setting("layout", "classic")

# Known converter failures and what the user can do about them (matched against its output).
_HINTS = (
    (re.compile(r"Can not map tensor '[^']*mlp\.experts\.gate_up_proj"),
     Text("this checkpoint uses transformers 5's fused expert layout, which this llama.cpp converter cannot read; "
          f"merge again and {CLASSIC_LAYOUT.placeholder} (the default).", (CLASSIC_LAYOUT,))),
    (re.compile(r"BPE pre-tokenizer was not recognized - update"),
     "llama.cpp does not know this tokenizer.json's pre-tokenizer; a SentencePiece tokenizer.model next to it "
     "converts cleanly (copy the base model's tokenizer.model into the folder)."),
    (re.compile(r"Model \S+ is not supported"),
     "llama.cpp cannot convert this architecture; lazymoe's outputs (MixtralForCausalLM, Qwen2MoeForCausalLM, "
     "Qwen3MoeForCausalLM) are."),
    (re.compile(r"No space left on device"), "the disk filled up while writing; free space and run again."),
)


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python version, else the pinned one (the converter must match the runtime)."""
    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return LLAMA_CPP_PYTHON_VERSION


def cache_root() -> Path:
    if os.environ.get("LAZYMOE_CACHE"):
        return Path(os.environ["LAZYMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lazymoe"


def _is_complete(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf" / "__init__.py").is_file()


def ensure_converter(version: str | None = None, *, sdist: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` for ``version``.

    Looks in ``$LAZYMOE_LLAMA_CPP_DIR`` (a llama.cpp checkout you trust to match), then the cache
    (``~/.cache/lazymoe/llama.cpp-VERSION``); otherwise extracts the parts from ``sdist`` (a local
    ``llama_cpp_python-VERSION.tar.gz``) or from the sdist that ``pip download`` fetches (about 75 MB,
    once per version).
    """
    override = os.environ.get("LAZYMOE_LLAMA_CPP_DIR")
    if override:
        if not _is_complete(Path(override)):
            raise GGUFError(f"LAZYMOE_LLAMA_CPP_DIR={override} has no convert_hf_to_gguf.py and gguf-py/gguf; "
                            "point it at the root of a llama.cpp checkout, or unset it.")
        return Path(override)
    version = version or llama_cpp_python_version()
    target = Path(cache_dir) if cache_dir else cache_root() / f"llama.cpp-{version}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama.cpp-", dir=target.parent) as tmp:
        archive = Path(sdist) if sdist else _pip_download_sdist(version, Path(tmp))
        staged = Path(tmp) / "staged"
        _extract_converter(archive, staged)
        try:
            os.replace(staged, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent process that finished first
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staged, target)
    log.info("llama.cpp %s converter cached in %s", version, target)
    return target


def _pip_download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           f"llama-cpp-python=={version}", "-d", str(dest)]
    log.info("fetching llama.cpp's converter: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GGUFError(f"could not run pip to fetch the llama-cpp-python {version} sdist: {err}") from err
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise GGUFError(
            f"pip could not download the llama-cpp-python {version} sdist, which carries llama.cpp's converter "
            f"(exit {proc.returncode}):\n{tail}\nWith no network, pass sdist=PATH to a downloaded "
            f"llama_cpp_python-{version}.tar.gz, or set LAZYMOE_LLAMA_CPP_DIR to a llama.cpp checkout."
        )
    return found[0]


def _extract_converter(archive: Path, dest: Path) -> None:
    """Extract only the converter parts of the sdist, refusing links and paths that leave ``dest``."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError) as err:
        raise GGUFError(f"{archive} is not a readable llama-cpp-python sdist: {err}") from err
    with tar:
        for member in tar:
            parts = member.name.split("/", 1)
            rel = parts[1][len(_SDIST_PREFIX):] if len(parts) == 2 and parts[1].startswith(_SDIST_PREFIX) else None
            if not rel or not any(rel == p or rel.startswith(p + "/") for p in _CONVERTER_PARTS):
                continue
            if ".." in rel.split("/") or not (member.isfile() or member.isdir()):
                continue
            out = dest / rel
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not _is_complete(dest):
        raise GGUFError(f"{archive} does not contain vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py; "
                        "is it a llama-cpp-python sdist?")


def converter_cached(version: str | None = None) -> bool:
    """Whether :func:`ensure_converter` has what it needs without fetching anything."""
    if os.environ.get("LAZYMOE_LLAMA_CPP_DIR"):
        return True
    return _is_complete(cache_root() / f"llama.cpp-{version or llama_cpp_python_version()}")


#: what a converter line about one tensor looks like (``INFO:hf-to-gguf:blk.0.ffn_up.weight, ... --> F16``)
TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:\S+,.*-->")


def run_converter(model_dir: Path, out_file: Path, outtype: str, *, converter_dir: Path | None = None,
                  echo: bool = False, timeout_s: float | None = None, log_file: Path | None = None,
                  on_line=None) -> None:
    """Run ``convert_hf_to_gguf.py`` on ``model_dir``; on failure raise GGUFError with its real cause.

    ``echo`` streams the converter's own log lines to stderr as they come; ``on_line(line)`` sees each line
    (for a progress bar); ``log_file`` keeps the whole log, and the error names it.
    """
    converter_dir = converter_dir or ensure_converter()
    cmd = [sys.executable, str(converter_dir / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(out_file), "--outtype", outtype]
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must import its own gguf-py, not PyPI's
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(converter_dir / "gguf-py"), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                errors="replace")
    except OSError as err:
        raise GGUFError(f"could not start llama.cpp's converter ({cmd[1]}): {err}") from err
    assert proc.stdout is not None
    log = open(log_file, "w", encoding="utf-8") if log_file is not None else None
    try:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if log is not None:
                log.write(line)
            if echo:
                print(line, end="", file=sys.stderr, flush=True)
            if on_line is not None:
                on_line(line)
        code = proc.wait(timeout=timeout_s)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if log is not None:
            log.close()
    if code != 0:
        message = _failure_message(model_dir, code, list(tail))
        raise GGUFError(message + (f"\nThe converter's whole log: {log_file}" if log_file else ""))
    if not out_file.is_file():
        raise GGUFError(f"llama.cpp's converter exited 0 on {model_dir} but wrote no {out_file.name}; "
                        "its last output:\n" + "\n".join(list(tail)[-10:]))


def _failure_message(model_dir: Path, code: int, tail: list[str]) -> Text:
    text = "\n".join(tail)
    # the cause is the exception line closing a traceback, else the converter's last ERROR line
    cause = next((ln for ln in reversed(tail) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)), None)
    cause = cause or next((ln for ln in reversed(tail) if ln.startswith("ERROR:")), None) or (tail[-1] if tail else "")
    hint = next((advice for pattern, advice in _HINTS if pattern.search(text)), None)
    if "BPE pre-tokenizer was not recognized" in text and (model_dir / "tokenizer.model").is_file() and \
            "Qwen2MoeForCausalLM" in (model_dir / "config.json").read_text(encoding="utf-8"):
        hint = ("llama.cpp reads a Qwen MoE's tokenizer as BPE only, and this one is SentencePiece (Llama 2, "
                "Mistral): such experts convert only as Mixtral; merge again without 'architecture: qwen' and "
                "shared_experts.")
    lines = [f"llama.cpp's converter failed on {model_dir} (exit {code}): {cause.strip()}"]
    if hint:
        lines.append(Text.join(["What to do: ", hint]))
    lines.append("Last lines of its output:\n" + "\n".join("    " + ln for ln in tail[-15:]))
    return Text.join(lines, "\n")
