"""The routing picture as a PNG: one heatmap (layers x experts) per prompt group, drawn with matplotlib's Agg
backend. matplotlib is the optional ``plot`` extra, so it is imported when a picture is drawn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..optional import require
from .routing import RoutingReport

#: at most this many heatmaps side by side: four experts' groups in one row made a 1500 px picture that a
#: notebook shrank until its numbers could not be read; two per row stays under 900 px for up to 6 experts
MAX_COLUMNS = 2
#: dots per inch of the PNG, and the size of the per-cell percentages (points)
DPI = 110
CELL_FONT_PT = 7.5


def plot_routing(report: RoutingReport, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw one heatmap per prompt group (layers x experts, share of tokens choosing each expert) as a PNG."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    G, L, E = report.chosen.shape
    cols = min(G, MAX_COLUMNS)
    rows = math.ceil(G / cols)
    cell = 0.42
    fig = Figure(figsize=(max(3.0, cols * (1.2 + E * cell * 1.3)), rows * (1.4 + min(L, 40) * cell * 0.75) + 0.6),
                 dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    annotate = L * E <= 160
    for g in range(rows * cols):
        ax = axes[g // cols][g % cols]
        if g >= G:
            ax.axis("off")
            continue
        data = report.chosen[g]
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"{report.groups[g]}\n({report.tokens[g]} tokens)", fontsize=8)
        ax.set_xticks(range(E), [e[:12] for e in report.experts], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(0, L, max(1, L // 16)))
        ax.tick_params(axis="y", labelsize=7)
        if g % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
        expected = report.expected[g]
        if expected is not None:  # frame the column these tokens should land in
            ax.add_patch(Rectangle((expected - 0.5, -0.5), 1, L, fill=False, edgecolor="red", linewidth=1.5))
        if annotate:
            for layer in range(L):
                for e in range(E):
                    v = data[layer, e]
                    ax.text(e, layer, f"{100 * v:.0f}", ha="center", va="center", fontsize=CELL_FONT_PT,
                            color="black" if v > 0.6 else "white")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"share of tokens routed there (top-{report.experts_per_token})")
    acc = report.accuracy()
    subtitle = f" — own-expert first choice {100 * acc:.0f}%" if acc is not None else ""
    fig.suptitle(title or f"Expert choice per layer: {report.model_dir.name}{subtitle}", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out
