"""What the steps after the merge need, checked at Plan time, before anything is downloaded.

A 4x7B merge downloads about 48 GB and runs for an hour; a missing token, a repo name the Hub refuses, a
disk too small for the GGUF files or a missing llama-cpp-python must show up before that, not after it.
The notebook's Plan step and ``lazymoe plan --push REPO --gguf QUANTS`` both call :func:`check_ahead` and
stop when any :class:`Check` blocks. Nothing here creates, uploads or downloads anything: the Hub is asked
``whoami`` and whether the repo exists, nothing more.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LazyMoEError, NotReadyError, Text, Words, python_words, worded
from ..gguf.converter import cache_root, llama_cpp_python_version
from ..gguf.llama import INSTALL_HINT
from ..gguf.quants import estimate_gguf_bytes
from ..io.folder import free_disk_bytes
from ..options import repo_name_problem
from ..publish.hub import check_push_target
from ..units import human_bytes

#: how long compiling llama-cpp-python takes (README "GGUF and llama.cpp" has the measurement)
CPU_BUILD_TIME = "about 3 minutes on an idle 2-core machine, about 6 when the cores are busy"
CUDA_BUILD_TIME = "longer than the CPU build (several minutes; the CUDA build has not been timed yet)"
#: converter download (the llama-cpp-python sdist) the first GGUF conversion makes
CONVERTER_DOWNLOAD_BYTES = 75_000_000


@dataclass(frozen=True)
class Check:
    """One thing a later step needs. ``ok``: True ready, False blocks the plan, None a note worth knowing."""

    step: str  # the step that needs it: "Upload", "GGUF"
    ok: bool | None
    message: str | Text  # a Text when it names a setting (each front end words it: errors.Text)

    def line(self, words: Words = python_words) -> str:
        mark = {True: "✔", False: "✖", None: "ℹ"}[self.ok]
        return f"{mark} {self.step}: {worded(self.message, words)}"


def check_upload(repo: str, *, private: bool = False, token: str | None = None, colab_secret: str = "HF_TOKEN",
                 gguf: bool = False) -> list[Check]:
    """Token, write access, repo name, and the name free or ours, for ``repo`` (and ``repo-GGUF`` if ``gguf``)."""
    checks = []
    try:
        target = check_push_target(repo, private=private, token=token, colab_secret=colab_secret)
    except LazyMoEError as err:
        return [Check("Upload", False, err.text)]
    checks.append(Check("Upload", True, target.describe()))
    if gguf:
        gguf_repo = f"{target.repo_id}-GGUF"
        problem = repo_name_problem(gguf_repo)
        if problem:
            checks.append(Check("Upload", False, f"the GGUF files go to {gguf_repo!r}, but {problem}. Shorten the "
                                                 "model name."))
        else:
            try:
                gguf_target = check_push_target(gguf_repo, private=private, token=token, colab_secret=colab_secret)
                checks.append(Check("Upload", True, Text.join(["GGUF files: ", gguf_target.describe()])))
            except LazyMoEError as err:
                checks.append(Check("Upload", False, Text.join(["GGUF files: ", err.text])))
    return checks


def check_llama_cpp(*, in_colab: bool, has_gpu: bool = False) -> list[Check]:
    """llama-cpp-python installed, or (Colab) the build the GGUF step will run and how long it takes; and
    whether llama.cpp's converter is cached or will be fetched first."""
    checks = []
    if importlib.util.find_spec("llama_cpp") is not None:
        checks.append(Check("GGUF", True, f"llama-cpp-python {llama_cpp_python_version()} is installed"))
    elif in_colab:
        took = CUDA_BUILD_TIME if has_gpu else CPU_BUILD_TIME
        build = "with CUDA for this GPU" if has_gpu else "for the CPU"
        checks.append(Check("GGUF", None, f"llama-cpp-python is not installed: the GGUF step compiles it {build} "
                                          f"first, {took}, once per runtime"))
    else:
        checks.append(Check("GGUF", False, f"GGUF is ticked, but {INSTALL_HINT}. "
                                           f"Compiling takes {CPU_BUILD_TIME}."))
    version = llama_cpp_python_version()
    if not (cache_root() / f"llama.cpp-{version}" / "convert_hf_to_gguf.py").is_file():
        checks.append(Check("GGUF", None, f"the first conversion fetches llama.cpp's converter (the llama-cpp-python "
                                          f"{version} sdist, about {human_bytes(CONVERTER_DOWNLOAD_BYTES)}) with pip"))
    return checks


def check_gguf_disk(plan, quants: Sequence[str], disk_path: str | Path) -> Check:
    """The merge's disk plus the f16 GGUF and every quantisation, against the free disk at ``disk_path``."""
    gguf = estimate_gguf_bytes(plan.total_params, tuple(quants))
    need = plan.disk_bytes + gguf
    free = free_disk_bytes(Path(disk_path))
    what = (f"merge {human_bytes(plan.disk_bytes)} + GGUF (f16 + {', '.join(quants)}) about {human_bytes(gguf)} "
            f"= {human_bytes(need)}; {human_bytes(free)} free at {disk_path}")
    if need <= free:
        return Check("GGUF", True, f"disk: {what}")
    return Check("GGUF", False, f"not enough disk: {what}. Free space, choose fewer quantisations, or untick GGUF.")


def check_ahead(plan=None, *, push_repo: str | None = None, private: bool = False, token: str | None = None,
                colab_secret: str = "HF_TOKEN", gguf_quants: Sequence[str] | None = None,
                disk_path: str | Path = ".", in_colab: bool = False, has_gpu: bool = False,
                gguf_disk: bool = True) -> list[Check]:
    """Everything the ticked later steps need: Upload (``push_repo``) and GGUF (``gguf_quants``).

    ``plan`` (a :class:`~lazymoe.moe.plan.MergePlan`) sizes the GGUF files; without it, or with
    ``gguf_disk=False`` (the notebook's resource table shows that row), the disk check is left out.
    """
    checks: list[Check] = []
    if push_repo is not None:
        checks += check_upload(push_repo, private=private, token=token, colab_secret=colab_secret,
                               gguf=gguf_quants is not None)
    if gguf_quants is not None:
        checks += check_llama_cpp(in_colab=in_colab, has_gpu=has_gpu)
        if plan is not None and gguf_disk:
            checks.append(check_gguf_disk(plan, gguf_quants, disk_path))
    return checks


def blocking(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.ok is False]


def raise_if_blocked(checks: Iterable[Check]) -> None:
    """:class:`NotReadyError` listing every blocking check, or nothing."""
    problems = blocking(checks)
    if len(problems) == 1:
        raise NotReadyError(Text.join([f"Not ready: {problems[0].step}: ", problems[0].message]))
    if problems:
        raise NotReadyError(Text.join([f"Not ready ({len(problems)} problems):",
                                       *(Text.join([f"\n- {c.step}: ", c.message]) for c in problems)]))


def format_checks(checks: Sequence[Check], words: Words = python_words) -> str:
    """The CLI's "Later steps" block."""
    return "\n".join(["Later steps:", *(f"  {c.line(words)}" for c in checks)])


__all__ = ["Check", "NotReadyError", "check_ahead", "check_gguf_disk", "check_llama_cpp", "check_upload",
           "blocking", "raise_if_blocked", "format_checks"]
