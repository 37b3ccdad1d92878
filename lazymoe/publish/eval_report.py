"""What `lazymoe eval` measured, as data: ``eval.json``, the printed table, the card's rows and the plot.

No torch here: the card reads ``eval.json`` through this module without loading a model.

The measure (per expert, on that expert's evaluation texts):

* ``loss``: mean next-token cross-entropy in nats per scored token, computed from the logits (never a
  model's ``out.loss``, which for Mixtral adds the router's auxiliary loss), of the base, the expert and
  the MoE;
* ``gain_kept`` = (base − MoE) / (base − expert): 1 when the MoE does as well as the expert on its texts,
  0 when it does no better than the base. Undefined (None, with the reason) when the expert gains less
  than :data:`MIN_GAIN` over the base: there is nothing to keep, and the ratio would be noise over noise;
* ``routing``: per layer, the share of the same tokens whose first choice (top-1) is the expert, and whose
  top-k includes it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalFileError, Setting, Text
from ..io.folder import ANSWERS_JSON, ANSWERS_MD, BENCHMARKS_JSON, EVAL_IMAGE, EVAL_JSON

SCHEMA = "lazymoe-eval/1"
#: your own questions answered side by side (questions.py): answers.md for reading and the card, .json for tools
ANSWERS_SCHEMA = "lazymoe-answers/1"
#: lm-evaluation-harness results (benchmarks.py)
BENCHMARKS_SCHEMA = "lazymoe-benchmarks/1"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
#: gains below this (nats per token) count as none: float noise between equal models is ~1e-6
MIN_GAIN = 1e-3
LOSS_UNIT = "nats per token"
#: how each kind of evaluation text is described, in every report
TEXT_KINDS = {
    "config": "eval_texts given in the config",
    "file": "eval_texts from a file",
    "dataset": "eval_texts from a Hub dataset",
    "generated": "written by the expert itself from its positive prompts (sampled); only its own words are "
                 "scored, never the prompts, which fitted the routers",
    "none": "no texts",
}


def gain_kept(base: float | None, expert: float | None, moe: float | None) -> tuple[float | None, str | None]:
    """(base − MoE) / (base − expert), or None and why it is undefined."""
    if base is None or expert is None or moe is None:
        return None, "a loss is missing"
    gain = base - expert
    if gain < MIN_GAIN:
        if abs(gain) < MIN_GAIN:
            return None, f"the expert does no better than the base on these texts ({gain:+.4f} nats): no gain to keep"
        return None, f"the expert is worse than the base on these texts ({gain:+.4f} nats): no gain to keep"
    return (base - moe) / gain, None


@dataclass
class ExpertEval:
    """One expert's row."""

    index: int
    name: str
    source_model: str
    texts_kind: str  # a key of TEXT_KINDS
    texts_detail: str  # file name, dataset id, seed...
    texts: int = 0
    tokens: int = 0
    loss_base: float | None = None
    loss_expert: float | None = None
    loss_moe: float | None = None
    #: per layer: share of scored tokens whose first choice is this expert / whose top-k includes it
    top1_by_layer: list[float] | None = None
    topk_by_layer: list[float] | None = None
    #: per layer and expert: share of these tokens whose first choice is that expert (rows sum to 1)
    top1_matrix: list[list[float]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def gain_kept(self) -> float | None:
        return gain_kept(self.loss_base, self.loss_expert, self.loss_moe)[0]

    @property
    def kept_note(self) -> str | None:
        return gain_kept(self.loss_base, self.loss_expert, self.loss_moe)[1]

    @property
    def top1(self) -> float | None:
        return sum(self.top1_by_layer) / len(self.top1_by_layer) if self.top1_by_layer else None

    @property
    def topk(self) -> float | None:
        return sum(self.topk_by_layer) / len(self.topk_by_layer) if self.topk_by_layer else None

    @property
    def texts_label(self) -> str:
        label = TEXT_KINDS.get(self.texts_kind, self.texts_kind)
        return f"{label} ({self.texts_detail})" if self.texts_detail else label


@dataclass
class EvalReport:
    model_name: str
    num_experts: int
    experts_per_token: int
    num_layers: int
    experts: list[ExpertEval]
    skipped: list[str] = field(default_factory=list)  # what was not measured, and why
    device: str = "cpu"
    seconds: float = 0.0
    max_tokens: int = 0

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        rows = []
        for e in self.experts:
            row = asdict(e)
            row["gain_kept"], row["gain_kept_note"] = gain_kept(e.loss_base, e.loss_expert, e.loss_moe)
            row["top1"], row["topk"] = e.top1, e.topk
            row["texts_label"] = e.texts_label
            rows.append(row)
        return {
            "schema": SCHEMA,
            "model_name": self.model_name,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "num_layers": self.num_layers,
            "loss_unit": LOSS_UNIT,
            "loss": "mean next-token cross-entropy from the logits (no router auxiliary loss)",
            "gain_kept": "(base - moe) / (base - expert)",
            "max_tokens": self.max_tokens,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "experts": rows,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise EvalFileError(f"This eval.json is not {SCHEMA!r} (schema {data.get('schema') if isinstance(data, dict) else None!r}); "
                                "run lazymoe eval again to rewrite it.")
        fields = set(ExpertEval.__dataclass_fields__)
        experts = [ExpertEval(**{k: v for k, v in row.items() if k in fields}) for row in data["experts"]]
        return cls(data["model_name"], data["num_experts"], data["experts_per_token"], data["num_layers"], experts,
                   list(data.get("skipped", [])), data.get("device", "cpu"), data.get("seconds", 0.0),
                   data.get("max_tokens", 0))

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / EVAL_JSON
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> EvalReport:
        path = Path(folder) / EVAL_JSON
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EvalFileError(f"{path} cannot be read ({type(err).__name__}: {err}); run lazymoe eval again.") from None

    # ------------------------------------------------------------------ text

    def rows(self) -> list[dict[str, str]]:
        """The table every front end shows (CLI, notebook, card): formatted cells, '—' where not measured."""

        def num(x: float | None) -> str:
            return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"

        def pct(x: float | None) -> str:
            return "—" if x is None else f"{100 * x:.0f}%"

        out = []
        for e in self.experts:
            routed = "—" if e.top1 is None else f"{pct(e.top1)} / {pct(e.topk)}"
            out.append({"expert": f"{e.index}: {e.name}", "texts": e.texts_kind, "tokens": str(e.tokens),
                        "base": num(e.loss_base), "expert_loss": num(e.loss_expert), "moe": num(e.loss_moe),
                        "kept": pct(e.gain_kept), "routed": routed})
        return out

    HEADER = {"expert": "Expert", "texts": "Texts", "tokens": "Tokens", "base": "Base loss",
              "expert_loss": "Expert loss", "moe": "MoE loss", "kept": "Gain kept", "routed": "Routed to it (top-1 / top-k)"}

    def notes(self) -> list[str]:
        """Footnotes: what each kind of text used is, where each expert's came from, why a figure is missing."""
        kinds = dict.fromkeys(e.texts_kind for e in self.experts if e.texts_kind != "none")
        out = [f"Texts '{kind}': {TEXT_KINDS.get(kind, kind)}." for kind in kinds]
        for e in self.experts:
            detail = f", {e.texts_detail}" if e.texts_detail else ""
            if e.texts:
                out.append(f"{e.index}: {e.name}: {e.texts} text(s), '{e.texts_kind}'{detail}.")
            if e.kept_note and e.loss_moe is not None:
                out.append(f"{e.index}: {e.name}: gain kept not defined: {e.kept_note}.")
            out += [f"{e.index}: {e.name}: {n}" for n in e.notes]
        return out

    def summary(self) -> str:
        rows = self.rows()
        keys = list(self.HEADER)
        widths = {k: max(len(self.HEADER[k]), *(len(r[k]) for r in rows)) for k in keys}
        line = lambda cells: "  ".join(str(cells[k]).ljust(widths[k]) for k in keys).rstrip()  # noqa: E731
        lines = [f"Skill retention of {self.model_name} (losses in {LOSS_UNIT}; gain kept = (base - MoE) / "
                 f"(base - expert); top-{self.experts_per_token} routing averaged over {self.num_layers} layers)",
                 line(self.HEADER)]
        lines += [line(r) for r in rows]
        lines += [f"note: {n}" for n in self.notes()]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines.append(f"measured in {self.seconds:.1f} s on {self.device}")
        return "\n".join(lines)

    def card_data(self) -> dict[str, Any]:
        """What the model card's Evaluation section shows."""
        return {"header": [self.HEADER[k] for k in self.HEADER], "rows": [list(r.values()) for r in self.rows()],
                "notes": self.notes(), "skipped": list(self.skipped), "experts_per_token": self.experts_per_token,
                "loss_unit": LOSS_UNIT}


def plot_eval(report: EvalReport, path: str | os.PathLike) -> Path:
    """Two panels: each expert's loss for the base, the expert and the MoE; and, per layer, the share of its
    texts' tokens routed first to it (solid) and within the top-k (dashed). PNG, matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    E = len(report.experts)
    fig = Figure(figsize=(max(7.0, 2.2 + 1.6 * E), 3.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[max(E, 2), 3])
    width = 0.26
    for j, (label, key, colour) in enumerate((("base", "loss_base", "#9e9e9e"), ("expert", "loss_expert", "#1f77b4"),
                                              ("MoE", "loss_moe", "#d62728"))):
        xs = [i + (j - 1) * width for i in range(E)]
        ys = [getattr(e, key) if getattr(e, key) is not None else 0.0 for e in report.experts]
        left.bar(xs, ys, width, label=label, color=colour)
    for i, e in enumerate(report.experts):
        kept = e.gain_kept
        top = max((v for v in (e.loss_base, e.loss_expert, e.loss_moe) if v is not None), default=0.0)
        left.text(i, top, "kept —" if kept is None else f"kept {100 * kept:.0f}%", ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(E), [e.name[:14] for e in report.experts], rotation=20, ha="right", fontsize=7)
    left.set_ylabel(f"loss ({LOSS_UNIT})", fontsize=8)
    left.set_title("Loss on each expert's texts", fontsize=9)
    left.legend(fontsize=7)
    for i, e in enumerate(report.experts):
        if not e.top1_by_layer:
            continue
        layers = range(len(e.top1_by_layer))
        line = right.plot(layers, e.top1_by_layer, marker="o", markersize=3, label=e.name[:14])[0]
        right.plot(layers, e.topk_by_layer, linestyle="--", color=line.get_color(), linewidth=1)
    right.axhline(1 / max(report.num_experts, 1), color="#777", linewidth=0.8, linestyle=":")
    right.set_ylim(0, 1.02)
    right.set_xlabel("layer", fontsize=8)
    right.set_ylabel("share of its texts' tokens", fontsize=8)
    right.set_title(f"Routed to its own expert: top-1 (solid), top-{report.experts_per_token} (dashed)", fontsize=9)
    if any(e.top1_by_layer for e in report.experts):
        right.legend(fontsize=7)
    fig.suptitle(f"Did {report.model_name} keep its experts' skills?", fontsize=10)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def answers_for_card(folder: str | os.PathLike) -> bool:
    """Whether the side-by-side answers saved in ``folder`` were marked for the model card."""
    path = Path(folder) / ANSWERS_JSON
    if not (path.is_file() and (Path(folder) / ANSWERS_MD).is_file()):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("schema") == ANSWERS_SCHEMA and bool(data.get("in_card"))


def read_benchmarks(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``benchmarks.json`` of a model folder, or None when there is none (or it is not ours)."""
    path = Path(folder) / BENCHMARKS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise EvalFileError(Text(f"{path} is not valid JSON; run the benchmarks again (" + "{tasks}).",
                                 [Setting("tasks", ...)])) from None
    if not isinstance(data, dict) or data.get("schema") != BENCHMARKS_SCHEMA:
        raise EvalFileError(Text(f"{path} is not {BENCHMARKS_SCHEMA!r}; run the benchmarks again (" + "{tasks}).",
                                 [Setting("tasks", ...)]))
    return data


def benchmark_table(result: dict[str, Any]) -> dict[str, Any]:
    """Rows (task, metric, one value per model) for the CLI, the notebook and the card."""
    models = list(result["models"])
    rows = []
    for task in result["tasks"]:
        metrics = dict.fromkeys(m for name in models for m in result["models"][name].get(task, {}))
        for metric in metrics:
            values = [result["models"][name].get(task, {}).get(metric) for name in models]
            rows.append([task, metric, *("—" if v is None else f"{100 * v:.1f}" for v in values)])
    return {"header": ["Task", "Metric", *models], "rows": rows, "limit": result.get("limit"),
            "lm_eval_version": result.get("lm_eval_version"), "skipped": list(result.get("skipped", []))}


def model_index(result: dict[str, Any], model_name: str) -> list[dict[str, Any]]:
    """The MoE's results in the Hub's ``model-index`` metadata format (values in percent)."""
    out = []
    limit = result.get("limit")
    for task, metrics in result["models"].get("MoE", {}).items():
        out.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"name": task, "type": task},
            "metrics": [{"type": m, "value": round(100 * v, 2), "name": m} for m, v in metrics.items()],
            "source": {"name": "lm-evaluation-harness" + (f", {limit} documents per task" if limit else ""),
                       "url": LM_EVAL_URL},
        })
    return [{"name": model_name, "results": out}] if out else []
