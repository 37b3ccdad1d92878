"""Installing an optional extra into the running Colab runtime (llama-cpp-python, lm-eval) without ever
replacing its torch; elsewhere nothing is installed and the step that needs it says how."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import GGUFError, LazyMoEError
from ..gguf.install import CPU_CMAKE_ARGS, cuda_cmake_args
from .machine import Runtime


def torch_constraints() -> Path:
    """A pip constraints file pinning this runtime's torch (and friends): pip may add, never replace them."""
    pins = []
    for name in ("torch", "torchvision", "torchaudio"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as f:
        f.write("\n".join(pins) + "\n")
    return Path(f.name)


def llama_cpp_build(runtime: Runtime) -> tuple[str, str]:
    """CMAKE_ARGS for compiling llama-cpp-python here, and how long to say it takes."""
    if not runtime.has_gpu:
        return CPU_CMAKE_ARGS, "a few minutes"
    import torch

    # one architecture instead of all: a much shorter build
    return cuda_cmake_args(torch.cuda.get_device_capability(0)), "several minutes for the CUDA build"


def install_llama_cpp(runtime: Runtime, say, *, version: str) -> bool:
    """In Colab, build llama-cpp-python ``version`` once per runtime (with CUDA when there is a GPU).

    Elsewhere nothing is installed: the GGUF step then reports the install command. Returns True if it ran.
    """
    if importlib.util.find_spec("llama_cpp") is not None or not runtime.in_colab:
        return False
    cmake, duration = llama_cpp_build(runtime)
    say(f"Installing llama-cpp-python {version}: pip compiles llama.cpp ({duration}, once per Colab runtime).")
    env = {**os.environ, "CMAKE_ARGS": cmake}
    pins = str(torch_constraints())
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", pins, f"llama-cpp-python=={version}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise GGUFError(f"Building llama-cpp-python {version} failed (pip exit status {done.returncode}):\n{tail}")
    importlib.invalidate_caches()
    return True


def install_lm_eval(runtime: Runtime, say, *, spec: str = "lm-eval>=0.4.5") -> bool:
    """In Colab, pip-install lm-evaluation-harness once per runtime, never replacing its torch.

    Elsewhere nothing is installed (the benchmark step then says how). Returns True if it ran.
    """
    if importlib.util.find_spec("lm_eval") is not None or not runtime.in_colab:
        return False
    say(f"Installing {spec} (once per Colab runtime, about a minute).")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-c", str(torch_constraints()), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise LazyMoEError(f"Installing {spec} failed (pip exit status {done.returncode}):\n{tail}")
    importlib.invalidate_caches()
    return True
