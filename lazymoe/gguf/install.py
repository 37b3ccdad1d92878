"""Which llama-cpp-python lazymoe works with, and how to build it: one pinned version, one set of build flags.

PyPI only has its sdist, so every install compiles llama.cpp; these flags keep that to a few minutes.
"""

from __future__ import annotations

#: the release whose converter lazymoe runs (and pins in pyproject's ``gguf`` extra)
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: CMAKE_ARGS for a CPU build: no multimodal tools, a portable binary
CPU_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"


def cuda_cmake_args(capability: tuple[int, int] | None = None) -> str:
    """CMAKE_ARGS for an NVIDIA build; with the GPU's compute capability, for that architecture only (much faster)."""
    arch = f" -DCMAKE_CUDA_ARCHITECTURES={capability[0]}{capability[1]}" if capability else ""
    return f"-DGGML_CUDA=on -DLLAVA_BUILD=OFF{arch}"
