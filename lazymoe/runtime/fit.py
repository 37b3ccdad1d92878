"""Does a plan fit a runtime? Disk, RAM and GPU memory needed against what it has, row by row, and the one-line
verdicts (free Colab and this runtime) that ``lazymoe plan`` prints and the notebook's Plan step shows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..gguf.quants import estimate_gguf_bytes
from ..moe.plan import STREAMED_SHARDS_ON_DISK
from ..units import human_bytes
from .machine import FREE_COLAB, FREE_COLAB_LABEL, Runtime

#: resource rows that only decide how step 5 loads the model (4-bit, or skipped), never whether it merges
_TRY_ROWS = ("GPU memory: try", "RAM: try")


@dataclass(frozen=True)
class Need:
    """One row of the resource check: ``ok`` is None where the comparison does not apply."""

    what: str
    needed: int | None
    have: int | None
    ok: bool | None
    note: str = ""


def resource_needs(plan, runtime: Runtime, *, gguf_quants: tuple[str, ...] = (), streamed: bool = False) -> list[Need]:
    """Disk, RAM and GPU memory the merge (and the optional steps) need, against what ``runtime`` has.
    ``streamed``: the merge uploads each shard as it is written and deletes it (``merge --push --no-keep``)."""
    rows = []
    gguf = estimate_gguf_bytes(plan.total_params, gguf_quants) if gguf_quants else 0
    if streamed:
        disk = plan.streamed_disk_bytes()
        disk_note = f"at {runtime.disk_path}; {streamed_disk_note(plan)}"
    else:
        downloads = getattr(plan, "peak_download_bytes", plan.download_bytes)  # low-disk mode keeps two models at most
        disk_note = (f"at {runtime.disk_path}; downloads {human_bytes(downloads)} + output "
                     f"{human_bytes(plan.output_bytes)}")
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


def streams(plan, runtime: Runtime, upload: bool) -> bool:
    """Whether a merge that uploads as it writes (the notebook with Upload ticked) keeps no shard on ``runtime``:
    only when its disk cannot hold the output (and the fetched tensors) but can hold a few shards at a time."""
    return upload and plan.disk_bytes > runtime.disk_free >= plan.streamed_disk_bytes()


def streamed_disk_note(plan) -> str:
    """What a merge that uploads and deletes each shard holds on disk, from the plan."""
    biggest = max(s.nbytes for s in plan.shards)
    return (f"{STREAMED_SHARDS_ON_DISK} shards of at most {human_bytes(biggest)} at a time, each deleted once uploaded, "
            f"+ what the router pass reads of the base and one fetch window, each deleted once written")


def shortages(needs: list[Need]) -> list[Need]:
    """The rows that stop the pipeline (trying the model in too little memory only skips that step)."""
    return [n for n in needs if n.ok is False and not n.what.startswith(_TRY_ROWS)]


@dataclass(frozen=True)
class Verdict:
    """Whether a plan fits one runtime: ``detail`` gives the figures compared, or what is short and by how much."""

    label: str
    fits: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.label}: {self.detail}"


def fit(plan, label: str, runtime: Runtime, *, low_disk_switch: str = "--low-disk",
        streamed_switch: str = "--push REPO --no-keep", upload: bool = False) -> Verdict:
    """Does ``plan`` merge on ``runtime`` (disk, peak RAM, router-pass GPU memory)? Trying the model is left out:
    too little memory for it only skips that step. ``low_disk_switch`` and ``streamed_switch`` name how the
    front end turns low-disk mode and the streamed push on, for the hints after a disk shortage; ``upload``:
    the merge uploads as it writes, and keeps no shard where the disk is short (``streams``)."""
    streamed = streams(plan, runtime, upload)
    needs = [n for n in resource_needs(plan, runtime, streamed=streamed) if not n.what.startswith(_TRY_ROWS)]
    short = shortages(needs)
    if not short:
        figures = "; ".join(f"{n.what} {human_bytes(n.needed)} of {human_bytes(n.have)}" for n in needs if n.ok)
        how = ", each shard deleted once uploaded" if streamed else ""
        return Verdict(label, True, f"fits{how} ({figures})")
    why = "; ".join(f"{n.what} needs {human_bytes(n.needed)}, has {human_bytes(n.have or 0)}" for n in short)
    detail = f"does NOT fit ({why})"
    if any(n.what.startswith("Disk") for n in short) and not upload:
        if not plan.low_disk:
            # the same plan in low-disk mode: only the downloads held at once change, not the output
            low = dataclasses.replace(plan, low_disk=True)
            detail += f". With {low_disk_switch} the disk needed is {human_bytes(low.disk_bytes)}"
        detail += (f"{'; ' if not plan.low_disk else '. The disk needed is '}uploading each shard while merging "
                   f"and deleting it ({streamed_switch}), {human_bytes(plan.streamed_disk_bytes())}")
    return Verdict(label, False, detail)


def fit_verdicts(plan, here: Runtime, *, low_disk_switch: str = "--low-disk",
                 streamed_switch: str = "--push REPO --no-keep", upload: bool = False) -> list[Verdict]:
    """The two verdicts every plan gets (``lazymoe plan``'s "Fits?", the notebook's Plan step): the free Colab
    runtime, which a notebook user most likely has, and ``here``, the runtime the merge would run on."""
    here_label = "This runtime" + (" (Colab)" if here.in_colab else "")
    return [fit(plan, label, runtime, low_disk_switch=low_disk_switch, streamed_switch=streamed_switch,
                upload=upload)
            for label, runtime in ((FREE_COLAB_LABEL, FREE_COLAB), (here_label, here))]
