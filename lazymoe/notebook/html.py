"""The HTML the notebook shows: red errors, notices, tables, the runtime report and the plan with its resources.

Nothing here imports ipywidgets or ``google.colab``: the functions return HTML strings from the library's
plain data (``runtime.machine``, ``runtime.fit``), so they are unit-tested without a kernel.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..errors import worded
from ..moe.report import plan_rows
from ..runtime.fit import Need, Verdict, fit_verdicts, resource_needs, shortages, streamed_disk_note, streams
from ..runtime.machine import Runtime
from ..units import human_bytes
from .words import form_words

_RED, _AMBER, _GREEN, _GREY = "#b00020", "#8a5a00", "#1b6e20", "#555"


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


def checks_html(checks) -> str:
    """What the ticked later steps need (``preflight.Check`` rows): a table, then each blocking one in red."""
    if not checks:
        return ""
    marks = {True: Raw(f'<b style="color:{_GREEN}">✔</b>'), False: Raw(f'<b style="color:{_RED}">✖</b>'),
             None: Raw(f'<b style="color:{_GREY}">ℹ</b>')}
    rows = [(marks[c.ok], c.step, worded(c.message, form_words)) for c in checks]
    out = table_html(rows, ("", "Later step", "What it needs"), css_class="lazymoe-ahead")
    return out + "".join(error_html(f"{c.step}: {worded(c.message, form_words)}") for c in checks if c.ok is False)


#: how the form turns low-disk mode on (the CLI's ``--low-disk``)
LOW_DISK_SWITCH = "Low-disk mode (Advanced)"
#: ... and the streamed push (the CLI's ``--push REPO --no-keep``): with Upload ticked, a merge keeps no shard
#: where the disk cannot hold the output (``runtime.fit.streams``)
STREAMED_SWITCH = "tick Upload"


def fits_html(verdicts: list[Verdict]) -> str:
    """"Fits?": the free Colab runtime's verdict beside this runtime's, as ``lazymoe plan`` prints them."""
    lines = "".join(notice_html(str(v), "ok" if v.fits else "warn") for v in verdicts)
    return f'<div class="lazymoe-fits"><b>Fits?</b>{lines}</div>'


def plan_html(plan, runtime: Runtime, *, gguf_quants: tuple[str, ...] = (), ahead=(), upload: bool = False) -> str:
    """The plan as the notebook shows it: facts, the experts, resources against this runtime, what the
    ticked later steps need (``ahead``: preflight checks), warnings. ``upload``: Upload is ticked, so the merge
    uploads as it writes (keeping no shard where the disk is short)."""
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
    streamed = streams(plan, runtime, upload)
    needs = resource_needs(plan, runtime, gguf_quants=gguf_quants, streamed=streamed)
    parts.append(needs_html(needs))
    parts.append(fits_html(fit_verdicts(plan, runtime, low_disk_switch=LOW_DISK_SWITCH, streamed_switch=STREAMED_SWITCH,
                                        upload=upload)))
    if streamed:
        parts.append(notice_html(
            f"This disk cannot hold the {human_bytes(plan.output_bytes)} output, so the Merge step uploads each shard "
            f"as it is written and deletes it ({human_bytes(plan.streamed_disk_bytes())}: {streamed_disk_note(plan)}). "
            "The model then exists on the Hub only: routing, trying, evaluating and GGUF, which read it here, are "
            "skipped.", "warn"))
    short = shortages(needs)
    for n in short:
        parts.append(error_html(f"{n.what}: needs {human_bytes(n.needed)} but this runtime has "
                                f"{human_bytes(n.have or 0)}. " + _advice(n, runtime, plan, streamed)))
    parts.append(checks_html(ahead))
    for warning in plan.warnings:
        parts.append(notice_html(warning, "warn"))
    blocked = bool(short) or any(c.ok is False for c in ahead)
    if not blocked:
        later = " and everything the ticked steps need is in place" if ahead else ""
        note = f"{len(plan.warnings)} warning(s) above, none blocking" if plan.warnings else "No problems found"
        parts.append(notice_html(f"{note}{later}: ready to merge.", "ok"))
    return "".join(parts)


def _advice(need: Need, runtime: Runtime, plan, streamed: bool) -> str:
    if need.what.startswith("Disk"):
        where = "a Colab Pro runtime or a machine with a bigger disk" if runtime.in_colab else "another disk"
        first = ""
        if not streamed and plan.streamed_disk_bytes() <= runtime.disk_free:
            first = (f"Tick Upload: the merge then uploads each shard as it is written and deletes it, which needs "
                     f"{human_bytes(plan.streamed_disk_bytes())} ({streamed_disk_note(plan)}); the model is then on "
                     "the Hub only, and the steps that read it here are skipped. ")
        elif not getattr(plan, "low_disk", True):
            first = f"Tick {LOW_DISK_SWITCH}, which deletes each fetched tensor once it is written. "
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
