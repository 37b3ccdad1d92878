"""Which llama-cpp-python lazymoe works with, and how to build it: one pinned version, one set of build flags.

PyPI only has its sdist, so every install compiles llama.cpp; these flags keep that to a few minutes. This is
the only place the pin and the flags are written: the Colab install, the missing-extra hint and the converter
read them here, and the setup command (README, ``.ci/run``) asks this module, from the checkout, before
anything is installed (it and ``import lazymoe`` need only the standard library):

    CMAKE_ARGS="$(python -m lazymoe.gguf.install --cmake-args)" pip install "$(python -m lazymoe.gguf.install)"

There is no ``lazymoe[gguf]`` extra: an extra could pin the version but not carry the build flags.
"""

from __future__ import annotations

import sys

#: the release whose converter lazymoe runs
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: what pip installs
LLAMA_CPP_PYTHON_REQUIREMENT = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
#: CMAKE_ARGS for a CPU build: no multimodal tools, a portable binary
CPU_CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"


def cuda_cmake_args(capability: tuple[int, int] | None = None) -> str:
    """CMAKE_ARGS for an NVIDIA build; with the GPU's compute capability, for that architecture only (much faster)."""
    arch = f" -DCMAKE_CUDA_ARCHITECTURES={capability[0]}{capability[1]}" if capability else ""
    return f"-DGGML_CUDA=on -DLLAVA_BUILD=OFF{arch}"


def main(argv: list[str]) -> int:
    """Print the pip requirement, or with ``--cmake-args`` (``--cuda``) the CMAKE_ARGS of a CPU (NVIDIA) build."""
    answers = {(): LLAMA_CPP_PYTHON_REQUIREMENT, ("--cmake-args",): CPU_CMAKE_ARGS,
               ("--cmake-args", "--cuda"): cuda_cmake_args()}
    if tuple(argv) not in answers:
        print("usage: python -m lazymoe.gguf.install [--cmake-args [--cuda]]", file=sys.stderr)
        return 2
    print(answers[tuple(argv)])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
