"""Resources against the plan, where the "Try it" step can load a model, and the HTML helpers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lazymoe.errors import GGUFError
from lazymoe.colab import in_colab
from lazymoe.gguf.quants import estimate_gguf_bytes
from lazymoe.notebook.html import Raw, error_html, needs_html, notice_html, table_html
from lazymoe.runtime.fit import resource_needs
from lazymoe.runtime.install import install_llama_cpp
from lazymoe.runtime.load import choose_loading
from lazymoe.runtime.machine import Runtime, probe, read_meminfo

GB = 1000**3


def runtime(*, disk=100 * GB, ram=12 * GB, gpu=None, vram=0, bf16=False, colab=False) -> Runtime:
    return Runtime(in_colab=colab, python="3.12", disk_path=Path("/content"), disk_free=disk, ram_available=ram,
                   ram_total=ram, torch="2.11", gpu_name=gpu, vram_free=vram if gpu else None,
                   vram_total=vram if gpu else None, bf16=bf16)


def beyonder_like_plan(**over):
    """The numbers of a 4x7B bf16 plan (BRIEF §1): only what the resource check reads."""
    values = dict(total_params=24_150_000_000, output_bytes=48_300_000_000, download_bytes=58_000_000_000,
                  disk_bytes=106_400_000_000, peak_ram_bytes=15_100_000_000, router_pass_bytes=14_500_000_000)
    values.update(over)
    return SimpleNamespace(**values)


def test_meminfo_is_read_in_bytes(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       13290452 kB\nMemFree:         9000000 kB\nMemAvailable:   12000000 kB\nHugePages_Total:       0\n")
    assert read_meminfo(f) == {"MemTotal": 13290452 * 1024, "MemFree": 9000000 * 1024,
                               "MemAvailable": 12000000 * 1024, "HugePages_Total": 0}
    assert read_meminfo(tmp_path / "missing") == {}


def test_probe_measures_this_machine(tmp_path):
    r = probe(tmp_path / "not" / "yet" / "there")  # the nearest existing parent is measured
    assert r.disk_path == tmp_path and r.disk_free > 0
    assert r.ram_available is None or 0 < r.ram_available <= r.ram_total
    assert r.in_colab is in_colab() is False


def test_free_colab_cannot_hold_a_4x7b_merge_and_the_table_says_why():
    needs = {n.what: n for n in resource_needs(beyonder_like_plan(), runtime(gpu="Tesla T4", vram=15 * GB, colab=True),
                                               gguf_quants=("Q4_K_M", "Q5_K_M"))}
    assert needs["Disk: merge"].ok is False and needs["Disk: merge"].needed == 106_400_000_000
    assert needs["Disk: merge + GGUF"].needed == 106_400_000_000 + estimate_gguf_bytes(24_150_000_000, ("Q4_K_M", "Q5_K_M"))
    assert needs["RAM: merge (peak)"].ok is False
    assert needs["GPU memory: router pass"].ok is True
    assert needs["GPU memory: try the model"].ok is False and "4-bit" in needs["GPU memory: try the model"].note
    html = needs_html(list(needs.values()))
    assert html.count("✖ too little") == 4 and html.count("✔ fits") == 1


def test_without_gpu_the_router_pass_is_counted_in_ram():
    needs = {n.what: n for n in resource_needs(beyonder_like_plan(), runtime(ram=64 * GB, disk=500 * GB))}
    assert needs["GPU memory: router pass"].ok is None and "runs on the CPU" in needs["GPU memory: router pass"].note
    assert needs["RAM: merge (peak)"].ok is True and needs["Disk: merge"].ok is True
    assert "RAM: try the model (CPU)" in needs


def test_gguf_estimate_uses_bits_per_weight():
    assert estimate_gguf_bytes(1_000_000_000, ()) == 2 * GB  # f16 alone
    # Q8_0 stores 32 weights in 34 bytes (8.5 bits); llama.cpp keeps a few tensors wider, never much
    q8 = estimate_gguf_bytes(1_000_000_000, ("Q8_0",)) - 2 * GB
    assert int(8.5e9 / 8) <= q8 <= int(8.6e9 / 8)
    q4 = estimate_gguf_bytes(1_000_000_000, ("Q4_K_M",)) - 2 * GB  # Q4_K blocks are 4.5 bits; the mix adds Q6_K
    assert int(4.5e9 / 8) < q4 < int(5.0e9 / 8)


# runtime, size, stored dtype, bitsandbytes installed -> device, four_bit, dtype, reason contains
LOADING = [
    ("fits the GPU", runtime(gpu="A100", vram=80 * GB, bf16=True), 48 * GB, "bfloat16", False, ("cuda", False, None, "on A100")),
    ("T4 has no bf16", runtime(gpu="Tesla T4", vram=15 * GB), 2 * GB, "bfloat16", False, ("cuda", False, "float16", "on Tesla T4")),
    ("4-bit on a T4", runtime(gpu="Tesla T4", vram=15 * GB), 48 * GB, "bfloat16", True, ("cuda", True, "float16", "4-bit")),
    ("4-bit needs bitsandbytes", runtime(gpu="Tesla T4", vram=15 * GB, ram=12 * GB), 48 * GB, "bfloat16", False,
     (None, False, None, "bitsandbytes")),
    ("CPU when it fits RAM", runtime(ram=32 * GB), 2 * GB, "float32", False, ("cpu", False, None, "on the CPU")),
    ("nowhere", runtime(ram=12 * GB), 48 * GB, "bfloat16", False, (None, False, None, "does not fit this runtime")),
]


@pytest.mark.parametrize("rt, size, dtype, bnb, expected", [pytest.param(*c[1:], id=c[0]) for c in LOADING])
def test_try_step_loads_where_the_model_fits(rt, size, dtype, bnb, expected):
    choice = choose_loading(size, rt, dtype=dtype, bitsandbytes=bnb)
    device, four_bit, on_dtype, phrase = expected
    assert (choice.device, choice.four_bit, choice.dtype) == (device, four_bit, on_dtype)
    assert phrase in choice.reason


def test_html_helpers_escape_user_text():
    assert "&lt;script&gt;" in error_html("<script>") and "✖" in error_html("x")
    assert "lazymoe-warn" in notice_html("careful", "warn")
    table = table_html([("<b>", Raw("<i>ok</i>"))], ("a", "b"))
    assert "&lt;b&gt;" in table and "<i>ok</i>" in table and "<th" in table


@pytest.fixture
def no_llama_cpp(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))


def test_llama_cpp_is_only_built_inside_colab(no_llama_cpp, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may be installed outside Colab"))
    assert install_llama_cpp(runtime(colab=False), print, version="0.3.36") is False


def test_colab_builds_llama_cpp_for_its_gpu_keeping_torch(no_llama_cpp, monkeypatch):
    import subprocess
    from importlib.metadata import version

    import torch

    calls, said = [], []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: calls.append((cmd, k)) or SimpleNamespace(returncode=0))
    assert install_llama_cpp(runtime(gpu="Tesla T4", vram=15 * GB, colab=True), said.append, version="0.3.36")
    ((cmd, kwargs),) = calls
    assert cmd[-1] == "llama-cpp-python==0.3.36" and "--upgrade" not in cmd
    assert kwargs["env"]["CMAKE_ARGS"] == "-DGGML_CUDA=on -DLLAVA_BUILD=OFF -DCMAKE_CUDA_ARCHITECTURES=75"
    assert f"torch=={version('torch')}" in Path(cmd[cmd.index("-c") + 1]).read_text().splitlines()
    assert "compiles llama.cpp" in said[0], "the notebook says it will take a while before it starts"


def test_a_failed_llama_cpp_build_shows_pips_own_error(no_llama_cpp, monkeypatch):
    import subprocess

    out = SimpleNamespace(returncode=1, stderr="...\nCMake Error: CUDA compiler not found\n", stdout="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: out)
    with pytest.raises(GGUFError, match="failed \\(pip exit status 1\\):\n...\nCMake Error: CUDA compiler not found"):
        install_llama_cpp(runtime(colab=True), print, version="0.3.36")


def test_the_setup_command_reads_the_llama_cpp_pin_and_flags_from_the_package_before_anything_is_installed():
    """README and .ci/run run ``python -m lazymoe.gguf.install`` in a fresh clone: with no site-packages at all
    (``-S``) it prints what pip installs and the CMAKE_ARGS, the same ones the Colab build and the hints use."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def ask(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", "-m", "lazymoe.gguf.install", *flags], cwd=root,
                              capture_output=True, text=True, timeout=60)

    assert ask().stdout == "llama-cpp-python==0.3.36\n"
    assert ask("--cmake-args").stdout == "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF\n"
    assert ask("--cmake-args", "--cuda").stdout == "-DGGML_CUDA=on -DLLAVA_BUILD=OFF\n"
    wrong = ask("--version")
    assert wrong.returncode == 2 and wrong.stdout == "" and wrong.stderr.startswith("usage: python -m lazymoe.gguf.install")
    for name in ("README.md", ".ci/run"):  # the setup command installs what the module prints, nothing pinned by hand
        text = (root / name).read_text()
        assert 'pip install "$(python -m lazymoe.gguf.install)"' in text and "llama-cpp-python==" not in text
