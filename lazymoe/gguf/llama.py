"""Running GGUF files with llama-cpp-python: load with the real cause on failure, chat, one prompt per expert.

llama-cpp-python is optional (it compiles llama.cpp on install); everything here imports it lazily and says
how to install it when it is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import load_config
from ..errors import GGUFError, Setting, Text
from ..io.folder import CONFIG_FILENAME
from ..optional import install_hint
from ..options import check_count

INSTALL_HINT = install_hint("llama_cpp")
#: the lengths a chat is given (each front end words them: max_tokens=, --max-tokens)
_MAX_TOKENS, _N_CTX = Setting("max_tokens", ..., noun=True), Setting("n_ctx", ...)
_N_CTX_GIVEN = Setting("n_ctx", ..., noun=True)


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFError(f"{INSTALL_HINT} ({err})") from err
    return llama_cpp


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect everything llama.cpp logs (all levels) while the block runs, then restore llama-cpp-python's handler.

    llama.cpp reports the reasons that matter here (why a file does not load, which tensors a quantisation
    had to give another type) only through its log callback, never through return values.
    """
    llama_cpp = import_llama_cpp()
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def _collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(_collect, ctypes.c_void_p(0))
    try:
        yield chunks
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _log_tail(chunks: list[str], n: int = 12) -> str:
    lines = [ln for ln in "".join(chunks).splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike, *, n_gpu_layers: int = -1, n_threads: int | None = None,
              n_ctx: int = 2048, seed: int = 0, **kwargs: Any) -> Iterator[Any]:
    """Load a GGUF file as a ``llama_cpp.Llama`` (all layers on the GPU when the build has one) and close it after.

    A file that does not load raises GGUFError with llama.cpp's own explanation, not just "failed to load".
    """
    check_count("n_threads", n_threads)
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        hint = f" It holds {', '.join(p.name for p in found[:4])}: give one of them." if found else \
            " Give a .gguf file (`lazymoe gguf MODEL_DIR` makes them)."
        raise GGUFError(f"{path} is a folder, not a GGUF file.{hint}")
    if not path.is_file():
        raise GGUFError(f"{path} does not exist; produce it with `lazymoe gguf MODEL_DIR` first.")
    llama_cpp = import_llama_cpp()
    threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
    with capture_llama_log() as chunks:
        try:
            llm = llama_cpp.Llama(str(path), n_gpu_layers=n_gpu_layers, n_threads=threads,
                                  n_threads_batch=threads, n_ctx=n_ctx, seed=seed, verbose=False, **kwargs)
        except (ValueError, RuntimeError, OSError) as err:
            raise GGUFError(f"llama.cpp could not load {path}: {err}\nllama.cpp said:\n{_log_tail(chunks)}") from err
    try:
        yield llm
    finally:
        llm.close()


def _check_lengths(max_tokens: int, n_ctx: int) -> None:
    """Refuse lengths llama.cpp cannot work with, before the file is loaded."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise GGUFError(Text(f"{_MAX_TOKENS.placeholder} is {max_tokens!r}: an answer needs at least 1 token.",
                             (_MAX_TOKENS,)))
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
        raise GGUFError(Text(f"{_N_CTX_GIVEN.placeholder} is {n_ctx!r}: a context length is a whole number of tokens, "
                             "0 or more (0: the model's own).", (_N_CTX_GIVEN,)))


def _answer(llm: Any, messages: list[dict[str, str]], n_ctx: int, **options: Any) -> str:
    """One reply; a conversation or prompt too long for the context is one GGUFError saying what to raise."""
    try:
        out = llm.create_chat_completion(messages=messages, **options)
    except (ValueError, RuntimeError) as err:  # llama-cpp-python's "exceed context window", a failed decode
        size = n_ctx or llm.n_ctx()
        raise GGUFError(Text(f"llama.cpp could not answer within a {size}-token context ({err}); "
                             f"{_N_CTX.placeholder} larger than {size}, or give a shorter prompt.", (_N_CTX,))) from None
    return out["choices"][0]["message"]["content"] or ""


def chat(gguf_path: str | os.PathLike, prompts: Sequence[str] | str, *, n_gpu_layers: int = -1,
         n_threads: int | None = None, max_tokens: int = 128, temperature: float = 0.0, n_ctx: int = 2048,
         seed: int = 0, system: str | None = None) -> list[str]:
    """Answer each prompt (one user turn each, the model's own chat template) and return the replies' text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise GGUFError("chat needs at least one prompt.")
    _check_lengths(max_tokens, n_ctx)
    replies = []
    with open_gguf(gguf_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_ctx=n_ctx, seed=seed) as llm:
        for prompt in prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            replies.append(_answer(llm, messages, n_ctx, max_tokens=max_tokens, temperature=temperature, seed=seed))
    return replies


def chat_loop(gguf_path: str | os.PathLike, *, read=input, write=print, max_tokens: int = 256,
              n_gpu_layers: int = -1, n_threads: int | None = None, n_ctx: int = 2048, temperature: float = 0.7,
              seed: int = 0) -> int:
    """A conversation in the terminal: each line read is one user turn, answered with the whole conversation
    so far as context; an empty line, ``exit`` or end of input stops. Returns the number of turns."""
    _check_lengths(max_tokens, n_ctx)
    messages: list[dict[str, str]] = []
    with open_gguf(gguf_path, n_gpu_layers=n_gpu_layers, n_threads=n_threads, n_ctx=n_ctx, seed=seed) as llm:
        write(f"Chatting with {Path(gguf_path).name}: type a message, an empty line or 'exit' to stop.")
        while True:
            try:
                text = read("you> ").strip()
            except EOFError:
                break
            if not text or text.lower() in ("exit", "quit"):
                break
            messages.append({"role": "user", "content": text})
            reply = _answer(llm, messages, n_ctx, max_tokens=max_tokens, temperature=temperature, seed=seed).strip()
            messages.append({"role": "assistant", "content": reply})
            write(f"model> {reply}")
    return len(messages) // 2


def expert_prompts(config: Any) -> list[tuple[str, str]]:
    """One (expert name, prompt) per expert, built from its positive prompts, to show each domain being served.

    ``config`` is a MoE config, a mapping, or the path of the YAML saved beside a merged model.
    """
    cfg = load_config(config)
    out = []
    for i, expert in enumerate(cfg.experts):
        name = Path(expert.source_model.split("@", 1)[0].rstrip("/")).name or f"expert{i}"
        positives = [p.strip() for p in expert.positive_prompts if p.strip()]
        sentence = next((p for p in positives if len(p.split()) >= 3), None)
        if sentence:
            prompt = sentence
        elif positives:
            keywords = positives[:3]
            joined = keywords[0] if len(keywords) == 1 else ", ".join(keywords[:-1]) + " and " + keywords[-1]
            prompt = f"Write a short answer about {joined}."
        else:
            prompt = "Say hello and describe what you can do."
        out.append((f"{i}:{name}", prompt))
    return out


def find_config_for(gguf_path: Path) -> Path | None:
    """The ``lazymoe_config.yml`` saved beside a merged model or copied beside its GGUF files, if any."""
    for folder in (gguf_path.parent, gguf_path.parent.parent):
        candidate = folder / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
    return None
