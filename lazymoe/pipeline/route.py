"""The routing step: route the recipe's prompts through a merged folder, draw ``routing.png`` into it and embed
the picture in the folder's card."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..optional import require
from ..publish.card import ROUTING_IMAGE, detected_extras, rerender_card
from ..router.plot import plot_routing
from ..router.routing import RoutingReport, routing_report

def write_routing_picture(
    model_dir: str | os.PathLike,
    extra_texts: Sequence[str] = (),
    *,
    device: str | None = None,
    progress: bool = True,
    update_card: bool = True,
) -> RoutingReport:
    """Route the recipe's prompts (and ``extra_texts``) through a merged folder, draw ``routing.png`` into it
    and, with ``update_card``, re-render its card so the picture is embedded. Returns the report."""
    require("matplotlib")  # before minutes of routing, not after
    folder = Path(model_dir)
    report = routing_report(folder, extra_texts=extra_texts, device=device, progress=progress)
    plot_routing(report, folder / ROUTING_IMAGE)
    if update_card:
        rerender_card(folder, **detected_extras(folder))
    return report
