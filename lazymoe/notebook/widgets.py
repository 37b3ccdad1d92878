"""Widget building blocks shared by the form, written once for ipywidgets 7.7 (Colab) and 8.x (Jupyter).

The differences that matter here: ipywidgets 8 has ``tooltip`` on every widget where 7 has
``description_tooltip`` (buttons excepted), and only core widgets render everywhere (Colab's widget
manager and JupyterLab's), so nothing here goes beyond ``ipywidgets`` itself.
"""

from __future__ import annotations

import html
import re
from typing import Any, Callable

from ..config import ExpertConfig
from ..errors import ConfigError
from ..optional import require

widgets = require("ipywidgets")  # a one-line install hint instead of ModuleNotFoundError

IPYWIDGETS_MAJOR = int(widgets.__version__.split(".")[0])

LICENSES = ("apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "llama2", "llama3", "gemma", "other")
NEWLINE_MARK = "↵"  # a line break inside one prompt, since the text area holds one prompt per line
_ROW_FIELDS = frozenset({"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale",
                         "calibration_text"})
_WIDE = "150px"
_UNDER_INPUT = "158px"  # left edge of an input whose description is _WIDE (plus the widget's margins)

#: what each expert field means: the row's tooltips and the help the form shows once above the experts
EXPERT_HELP = {
    "source_model": "Whose MLPs this expert takes: org/name, org/name@revision or a local folder",
    "positive_prompts": f"One prompt per line: what this expert is for ({NEWLINE_MARK} marks a line break inside a "
                        "prompt)",
    "negative_prompts": "Optional, one per line: what this expert is not for",
    "calibration_text": "Optional, for gate modes expert_classifier and trained: a few paragraphs of text of this "
                        "expert's kind (blank line between paragraphs), or the path of a .txt, .jsonl or .json file of them",
    "noise_scale": "Adds σ·N(0,1) noise to this expert's MLP weights; empty (none): the weights as they are",
    "residual_scale": "Multiplies this expert's down_proj; empty (none): down_proj as it is",
}


def set_tooltip(widget: widgets.Widget, text: str) -> None:
    """ipywidgets 8 has ``tooltip`` on every widget; 7 has it on buttons and ``description_tooltip`` elsewhere."""
    if IPYWIDGETS_MAJOR >= 8 or isinstance(widget, (widgets.Button, widgets.ToggleButton)):
        widget.tooltip = text
    elif hasattr(widget, "description_tooltip"):
        widget.description_tooltip = text


def tooltip_of(widget: widgets.Widget) -> str:
    """The text :func:`set_tooltip` gave ``widget`` ("" if none)."""
    return getattr(widget, "tooltip", None) or getattr(widget, "description_tooltip", None) or ""


def help_text(text: str, *, under_input: bool = True) -> widgets.HTML:
    """``text`` as a grey line under a field: help a newcomer sees without hovering (tooltips stay too)."""
    margin = _UNDER_INPUT if under_input else "0px"
    return widgets.HTML(f"<div class='lazymoe-help' style='color:#666;font-size:12px;line-height:1.4;"
                        f"white-space:normal;margin:0 0 4px {margin}'>{html.escape(text)}</div>")


def styled(widget, css: str, tip: str = "", width: str = "100%"):
    widget.style = {"description_width": _WIDE} if hasattr(widget, "description") else widget.style
    # a full-width field keeps its vertical margin only: the widgets-7 front end (Colab) adds the default 2px
    # side margins to 100% and pushes the right edge out of the form; widgets 8 looks the same either way
    widget.layout = widgets.Layout(width=width, margin="2px 0px" if width == "100%" else None)
    widget.add_class(css)
    if tip:
        set_tooltip(widget, tip)
    return widget


def prompts_to_text(prompts: list[str]) -> str:
    return "\n".join(p.replace("\n", NEWLINE_MARK) for p in prompts)


def text_to_prompts(text: str) -> list[str]:
    return [line.replace(NEWLINE_MARK, "\n") for line in text.split("\n") if line.strip()]


def texts_to_text(texts: list[str]) -> str:
    """Calibration texts are paragraphs: shown separated by blank lines."""
    return "\n\n".join(t.strip() for t in texts)


def text_to_texts(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"\n\s*\n", text) if t.strip()]


def parse_number(text: str, what: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number; leave it empty for none.") from None


class ExpertRow:
    """One expert: model reference, prompts and the optional scales, with reorder/remove buttons."""

    def __init__(self, *, on_up: Callable[[], None], on_down: Callable[[], None],
                 on_remove: Callable[[], None]) -> None:
        self.title = widgets.HTML()
        self.source = styled(widgets.Text(placeholder="org/name, org/name@revision or a local folder"),
                             "lazymoe-expert-model", EXPERT_HELP["source_model"], width="auto")
        self.source.layout.flex = "1 1 auto"
        self.positive = styled(widgets.Textarea(description="Positive prompts", rows=5), "lazymoe-positive",
                               EXPERT_HELP["positive_prompts"])
        self.negative = styled(widgets.Textarea(description="Negative prompts", rows=2), "lazymoe-negative",
                               EXPERT_HELP["negative_prompts"])
        self.calibration = styled(widgets.Textarea(description="Calibration text", rows=3), "lazymoe-calibration",
                                  EXPERT_HELP["calibration_text"])
        # "none" (empty) is explained in the help above the experts; a long placeholder was cut off
        self.noise = styled(widgets.Text(description="Noise scale", placeholder="none"), "lazymoe-noise",
                            EXPERT_HELP["noise_scale"], width="300px")
        self.residual = styled(widgets.Text(description="Residual scale", placeholder="none"), "lazymoe-residual",
                               EXPERT_HELP["residual_scale"], width="300px")
        self.up, self.down, self.remove = (widgets.Button(description=d, layout=widgets.Layout(width="38px"))
                                           for d in ("↑", "↓", "✕"))
        for button, tip, action in ((self.up, "Move up", on_up), (self.down, "Move down", on_down),
                                    (self.remove, "Remove this expert", on_remove)):
            set_tooltip(button, tip)
            button.on_click(lambda _, action=action: action())
        self.error = widgets.HTML()  # this expert's problems, shown inside its box
        self.box = widgets.VBox(
            [widgets.HBox([self.title, self.source, self.up, self.down, self.remove]), self.positive, self.negative,
             self.calibration, widgets.HBox([self.noise, self.residual], layout=widgets.Layout(flex_flow="row wrap")),
             self.error],
            layout=widgets.Layout(border="1px solid #ccc", padding="4px", margin="2px 0", width="100%"),
        )
        self.box.add_class("lazymoe-expert")
        self.extras: dict[str, Any] = {}

    def fill(self, expert: ExpertConfig | dict) -> None:
        if isinstance(expert, dict):
            expert = ExpertConfig.model_validate(expert)
        get = lambda key, default=None: getattr(expert, key, default)  # noqa: E731
        # fields the row has no widget for travel unchanged, so the round trip never drops them
        self.extras = {k: v for k, v in expert.model_dump(exclude_defaults=True).items() if k not in _ROW_FIELDS}
        self.source.value = str(get("source_model", "") or "")
        self.positive.value = prompts_to_text(list(get("positive_prompts", []) or []))
        self.negative.value = prompts_to_text(list(get("negative_prompts", []) or []))
        self.calibration.value = texts_to_text(list(get("calibration_text", []) or []))
        for widget, key in ((self.noise, "noise_scale"), (self.residual, "residual_scale")):
            value = get(key, None)
            widget.value = "" if value is None else repr(value)

    @property
    def inputs(self) -> tuple[widgets.Widget, ...]:
        """The widgets whose edits change the recipe."""
        return (self.source, self.positive, self.negative, self.calibration, self.noise, self.residual)

    def values(self, i: int, *, strict: bool = True) -> dict:
        """This expert as a config mapping; ``strict=False`` leaves out a number that does not parse yet."""
        out: dict[str, Any] = {"source_model": self.source.value.strip(),
                               "positive_prompts": text_to_prompts(self.positive.value)}
        negative = text_to_prompts(self.negative.value)
        if negative:
            out["negative_prompts"] = negative
        calibration = text_to_texts(self.calibration.value)
        if calibration:
            out["calibration_text"] = calibration
        for widget, key, what in ((self.noise, "noise_scale", "noise scale"),
                                  (self.residual, "residual_scale", "residual scale")):
            try:
                value = parse_number(widget.value, f"Expert {i + 1} {what}")
            except ConfigError:
                if strict:
                    raise
                value = None
            if value is not None:
                out[key] = value
        return {**out, **self.extras}
