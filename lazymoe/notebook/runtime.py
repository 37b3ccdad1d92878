"""What this runtime has (disk, RAM, GPU), set against what a plan needs, and the HTML the notebook shows.

Nothing here imports ipywidgets or ``google.colab``: the functions return plain data and HTML strings, so
they are unit-tested without a kernel and reused by every notebook step.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..colab import CONTENT_DIR, in_colab
from ..errors import GGUFError, LazyMoEError, Setting, Text, Words, python_words, worded
from ..gguf.install import CPU_CMAKE_ARGS, cuda_cmake_args
from ..gguf.quants import estimate_gguf_bytes
from ..io.folder import free_disk_bytes
from ..moe.report import plan_rows
from ..units import human_bytes
from .words import form_words

_RED, _AMBER, _GREEN, _GREY = "#b00020", "#8a5a00", "#1b6e20", "#555"


def read_meminfo(path: str | os.PathLike = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as bytes per field (empty where the file does not exist, e.g. macOS)."""
    out: dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


@dataclass(frozen=True)
class Runtime:
    """A snapshot of the machine the notebook runs on."""

    in_colab: bool
    python: str
    disk_path: Path
    disk_free: int
    ram_available: int | None
    ram_total: int | None
    torch: str | None = None
    gpu_name: str | None = None
    vram_free: int | None = None
    vram_total: int | None = None
    bf16: bool = False

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None


#: Colab's free runtime, as its resource panel reports it: "GPU RAM 15.0 GB" (a T4's 15,360 MiB),
#: "System RAM 12.7 GB" (MemTotal 13,290,452 kB; both panels count in GiB) and about 100 GB of disk free at
#: /content (BRIEF §5). ``plan`` checks every recipe against it, wherever it runs.
FREE_COLAB = Runtime(
    in_colab=True, python="3.13", disk_path=Path(CONTENT_DIR), disk_free=100 * 1000**3,
    ram_available=13_290_452 * 1024, ram_total=13_290_452 * 1024, gpu_name="Tesla T4",
    vram_free=15_360 * 2**20, vram_total=15_360 * 2**20, bf16=False,
)  # fmt: skip
FREE_COLAB_LABEL = "Free Colab (T4, 12.7 GiB RAM, ~100 GB disk)"

#: resource rows that only decide how step 5 loads the model (4-bit, or skipped), never whether it merges
_TRY_ROWS = ("GPU memory: try", "RAM: try")


def probe(path: str | os.PathLike = ".") -> Runtime:
    """Measure free disk at ``path`` (its nearest existing parent), RAM and, if torch sees one, the GPU."""
    disk = Path(path).resolve()
    while not disk.exists():
        disk = disk.parent
    mem = read_meminfo()
    gpu = vram_free = vram_total = torch_version = None
    bf16 = False
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch_version = torch.__version__
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            vram_free, vram_total = torch.cuda.mem_get_info(0)
            bf16 = torch.cuda.is_bf16_supported()
    return Runtime(
        in_colab=in_colab(), python=platform.python_version(), disk_path=disk,
        disk_free=free_disk_bytes(disk), ram_available=mem.get("MemAvailable"),
        ram_total=mem.get("MemTotal"), torch=torch_version, gpu_name=gpu, vram_free=vram_free,
        vram_total=vram_total, bf16=bf16,
    )  # fmt: skip


@dataclass(frozen=True)
class Need:
    """One row of the resource check: ``ok`` is None where the comparison does not apply."""

    what: str
    needed: int | None
    have: int | None
    ok: bool | None
    note: str = ""


def resource_needs(plan, runtime: Runtime, *, gguf_quants: tuple[str, ...] = ()) -> list[Need]:
    """Disk, RAM and GPU memory the merge (and the optional steps) need, against what ``runtime`` has."""
    rows = []
    gguf = estimate_gguf_bytes(plan.total_params, gguf_quants) if gguf_quants else 0
    downloads = getattr(plan, "peak_download_bytes", plan.download_bytes)  # low-disk mode keeps two models at most
    disk_note = f"at {runtime.disk_path}; downloads {human_bytes(downloads)} + output {human_bytes(plan.output_bytes)}"
    disk = plan.disk_bytes
    rows.append(Need("Disk: merge", disk, runtime.disk_free, disk <= runtime.disk_free, disk_note))
    if gguf:
        total = plan.disk_bytes + gguf
        rows.append(Need("Disk: merge + GGUF", total, runtime.disk_free, total <= runtime.disk_free,
                         f"f16 GGUF + {', '.join(gguf_quants)} ≈ {human_bytes(gguf)} more (estimate)"))
    ram = runtime.ram_available
    rows.append(Need("RAM: merge (peak)", plan.peak_ram_bytes, ram, None if ram is None else plan.peak_ram_bytes <= ram,
                     "" if ram is not None else "this system does not report free memory"))
    hidden = plan.router_pass_bytes
    if hidden:
        if runtime.has_gpu:
            rows.append(Need("GPU memory: router pass", hidden, runtime.vram_free, hidden <= (runtime.vram_free or 0),
                             f"{runtime.gpu_name}; the base one layer at a time, or whole to write continuations"))
        else:
            rows.append(Need("GPU memory: router pass", hidden, None, None,
                             "no GPU: the router pass runs on the CPU (slower), inside the RAM figure above"))
    size = plan.output_bytes
    if runtime.has_gpu:
        fits = size * 1.15 <= (runtime.vram_free or 0)
        rows.append(Need("GPU memory: try the model", size, runtime.vram_free, fits,
                         "" if fits else "step 5 loads it in 4-bit if bitsandbytes is installed, else skips"))
    else:
        fits = ram is not None and size * 1.2 <= ram
        rows.append(Need("RAM: try the model (CPU)", size, ram, fits, "" if fits else "step 5 will be skipped"))
    return rows


def fit_lines(plan, runtimes: list[tuple[str, Runtime]], words: Words = python_words) -> list[str]:
    """For ``plan``: one verdict per runtime, "fits" with the figures compared, or what is short and by how much."""
    lines = []
    for label, runtime in runtimes:
        needs = [n for n in resource_needs(plan, runtime) if not n.what.startswith(_TRY_ROWS)]
        short = shortages(needs)
        if not short:
            figures = "; ".join(f"{n.what} {human_bytes(n.needed)} of {human_bytes(n.have)}" for n in needs if n.ok)
            lines.append(f"{label}: fits ({figures})")
            continue
        why = "; ".join(f"{n.what} needs {human_bytes(n.needed)}, has {human_bytes(n.have or 0)}" for n in short)
        line = f"{label}: does NOT fit ({why})"
        if any(n.what.startswith("Disk") for n in short) and not plan.low_disk:
            # the same plan in low-disk mode: only the downloads held at once change, not the output
            low = dataclasses.replace(plan, low_disk=True)
            low_disk = Setting("low_disk", True)
            line += worded(Text(f". {low_disk.placeholder} and the disk needed is {human_bytes(low.disk_bytes)}",
                                (low_disk,)), words)
        lines.append(line)
    return lines


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


# ----------------------------------------------------------------------------- HTML


def error_html(message: str) -> str:
    """A short red message: what went wrong and what to change (never a traceback)."""
    return (f'<div class="lazymoe-error" style="color:{_RED};border-left:4px solid {_RED};padding:4px 8px;'
            f'margin:4px 0;white-space:pre-wrap">✖ {html.escape(message)}</div>')


def notice_html(message: str, kind: str = "info") -> str:
    """``kind``: ok (green), warn (amber) or info (grey)."""
    color, mark = {"ok": (_GREEN, "✔"), "warn": (_AMBER, "⚠"), "info": (_GREY, "ℹ")}[kind]
    return (f'<div class="lazymoe-{kind}" style="color:{color};padding:2px 8px;margin:2px 0;'
            f'white-space:pre-wrap">{mark} {html.escape(message)}</div>')


def table_html(rows: list[tuple], header: tuple | None = None, *, css_class: str = "lazymoe-table") -> str:
    """A plain table; cells are escaped unless they are ``Raw``."""

    def cell(value, tag="td") -> str:
        text = value.html if isinstance(value, Raw) else html.escape(str(value))
        return f'<{tag} style="text-align:left;padding:2px 10px;vertical-align:top">{text}</{tag}>'

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}" style="border-collapse:collapse;margin:4px 0">{head}{body}</table>'


@dataclass(frozen=True)
class Raw:
    """Trusted HTML for :func:`table_html`."""

    html: str


def _status(ok: bool | None) -> Raw:
    if ok is None:
        return Raw(f'<span style="color:{_GREY}">–</span>')
    style = "white-space:nowrap;color:"
    return Raw(f'<b style="{style}{_GREEN}">✔ fits</b>' if ok else f'<b style="{style}{_RED}">✖ too little</b>')


def needs_html(needs: list[Need]) -> str:
    rows = [
        (n.what, human_bytes(n.needed) if n.needed is not None else "–",
         human_bytes(n.have) if n.have is not None else "–", _status(n.ok), n.note)
        for n in needs
    ]
    return table_html(rows, ("", "Needed", "This runtime has", "", ""), css_class="lazymoe-resources")


def shortages(needs: list[Need]) -> list[Need]:
    """The rows that stop the pipeline (trying the model in too little memory only skips that step)."""
    return [n for n in needs if n.ok is False and not n.what.startswith(_TRY_ROWS)]


def checks_html(checks) -> str:
    """What the ticked later steps need (``preflight.Check`` rows): a table, then each blocking one in red."""
    if not checks:
        return ""
    marks = {True: Raw(f'<b style="color:{_GREEN}">✔</b>'), False: Raw(f'<b style="color:{_RED}">✖</b>'),
             None: Raw(f'<b style="color:{_GREY}">ℹ</b>')}
    rows = [(marks[c.ok], c.step, worded(c.message, form_words)) for c in checks]
    out = table_html(rows, ("", "Later step", "What it needs"), css_class="lazymoe-ahead")
    return out + "".join(error_html(f"{c.step}: {worded(c.message, form_words)}") for c in checks if c.ok is False)


def plan_html(plan, runtime: Runtime, *, gguf_quants: tuple[str, ...] = (), ahead=()) -> str:
    """The plan as the notebook shows it: facts, the experts, resources against this runtime, what the
    ticked later steps need (``ahead``: preflight checks), warnings."""
    covered = ("Disk needed", "RAM needed (peak)", "Router pass")  # the resource table below shows these
    parts = [table_html([r for r in plan_rows(plan) if r[0] not in covered], css_class="lazymoe-plan")]
    experts = [(f"experts[{i}]", e.source_model, "; ".join(e.positive_prompts) or "–", "; ".join(e.negative_prompts) or "–")
               for i, e in enumerate(plan.config.experts)]
    if plan.config.shared_expert is not None:
        e = plan.config.shared_expert
        experts.append(("shared", e.source_model, "; ".join(e.positive_prompts) or "– (constant gate 1/2)",
                        "; ".join(e.negative_prompts) or "–"))
    header = ("#", "Expert", "Positive prompts", "Negative prompts")
    parts.append(table_html(experts, header, css_class="lazymoe-experts"))
    needs = resource_needs(plan, runtime, gguf_quants=gguf_quants)
    parts.append(needs_html(needs))
    short = shortages(needs)
    for n in short:
        parts.append(error_html(f"{n.what}: needs {human_bytes(n.needed)} but this runtime has "
                                f"{human_bytes(n.have or 0)}. " + _advice(n, runtime, getattr(plan, "low_disk", True))))
    parts.append(checks_html(ahead))
    for warning in plan.warnings:
        parts.append(notice_html(warning, "warn"))
    blocked = bool(short) or any(c.ok is False for c in ahead)
    if not blocked:
        later = " and everything the ticked steps need is in place" if ahead else ""
        note = f"{len(plan.warnings)} warning(s) above, none blocking" if plan.warnings else "No problems found"
        parts.append(notice_html(f"{note}{later}: ready to merge.", "ok"))
    return "".join(parts)


def _advice(need: Need, runtime: Runtime, low_disk: bool) -> str:
    if need.what.startswith("Disk"):
        where = "a Colab Pro runtime or a machine with a bigger disk" if runtime.in_colab else "another disk"
        first = "" if low_disk else "Tick Low-disk mode (Advanced), which keeps at most two downloaded models. "
        return f"{first}Free some space, use {where}, or untick GGUF if it is on."
    if need.what.startswith("RAM"):
        return "Use a runtime with more memory (Colab: High-RAM), or fewer/smaller models."
    return "Use a bigger GPU, or run without one (the router pass then runs on the CPU)."


def runtime_html(runtime: Runtime, *, lazymoe_version: str, lazymoe_path: str, installed: bool) -> str:
    """What ``setup()`` reports: where lazymoe came from and what this machine offers."""
    gpu = (f"{runtime.gpu_name}, {human_bytes(runtime.vram_free or 0)} free of {human_bytes(runtime.vram_total or 0)}"
           if runtime.has_gpu else "none")
    ram = (f"{human_bytes(runtime.ram_available)} free of {human_bytes(runtime.ram_total or 0)}"
           if runtime.ram_available is not None else "unknown")
    rows = [
        ("Where", "Google Colab" if runtime.in_colab else "Jupyter (not Colab)"),
        ("lazymoe", f"{lazymoe_version} from {lazymoe_path} "
                    + ("(just installed)" if installed else "(already installed; nothing installed)")),
        ("Python", runtime.python),
        ("torch", runtime.torch or "not installed"),
        ("GPU", gpu),
        ("RAM", ram),
        ("Disk", f"{human_bytes(runtime.disk_free)} free at {runtime.disk_path}"),
    ]
    out = table_html(rows, css_class="lazymoe-runtime")
    if not runtime.has_gpu:
        if runtime.in_colab:
            out += notice_html("No GPU: choose Runtime → Change runtime type → T4 GPU, then run this cell again. "
                               "Without one the router pass and the test generation run on the CPU (slow for "
                               "7B models).", "warn")
        else:
            out += notice_html("No GPU found: the router pass and the test generation run on the CPU (7B experts: slow).", "info")
    return out
