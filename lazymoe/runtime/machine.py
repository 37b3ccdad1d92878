"""The machine lazymoe runs on (disk, RAM, GPU), measured, and the free Colab runtime every plan is set against.

Plain data: the CLI prints it, the notebook renders it (``notebook.html``), the evaluations and the Try step
pick where to load a model from it (``runtime.load``).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from ..colab import CONTENT_DIR, in_colab
from ..io.folder import free_disk_bytes


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
