"""The notebook's evaluation steps as HTML: the retention table with its notes, and the answers side by side."""

from __future__ import annotations

import html
from typing import Any

from ..publish.eval_report import EvalReport
from ..evaluate.questions import routed_text
from .html import Raw, notice_html, table_html


def retention_html(report: EvalReport) -> str:
    """The table every front end shows, the text sources and reasons as notes, what was skipped as warnings."""
    keys = list(EvalReport.HEADER)
    rows = [tuple(Raw(f"<b>{r[k]}</b>") if k == "kept" else r[k] for k in keys) for r in report.rows()]
    parts = [table_html(rows, tuple(EvalReport.HEADER[k] for k in keys), css_class="lazymoe-eval")]
    parts += [notice_html(n, "info") for n in report.notes()]
    parts += [notice_html(f"Not measured: {s}", "warn") for s in report.skipped]
    parts.append(notice_html(f"Measured in {report.seconds:.1f} s on {report.device}; losses in nats per token "
                             "(lower is better); gain kept = (base − MoE) / (base − expert).", "ok"))
    return "".join(parts)


def answers_html(result: dict[str, Any]) -> str:
    """One row per question, one column per model; the MoE's cell names the experts it used."""
    models = result["models"]
    rows = []
    for q in result["questions"]:
        tag = f" [{q['expert_label']}]" if q["expert_label"] else ""
        cells: list[Any] = [q["question"] + tag]
        for name in models:
            answer = q["answers"][name]
            text = answer["text"] or "(empty answer)"
            if "routed" in answer:
                routed = routed_text(answer["routed"], result["experts"])
                cells.append(Raw(html.escape(text) + f"<br><i style='color:#555'>routed: {html.escape(routed)}</i>"))
            else:
                cells.append(text)
        rows.append(tuple(cells))
    parts = [table_html(rows, ("Question", *models), css_class="lazymoe-answers")]
    parts += [notice_html(f"Not answered by {s}", "warn") for s in result["skipped"]]
    return "".join(parts)
