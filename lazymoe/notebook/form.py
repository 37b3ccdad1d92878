"""The notebook form: core ipywidgets only, working with ipywidgets 7.7 (Colab) and 8.x (Jupyter).

The form holds no logic of its own: it fills in a :class:`~lazymoe.config.MoEConfig` (validated by the
same code as YAML and the CLI) plus the notebook-only :class:`Settings`. Problems are shown in the form's
message area as one short red line; they never raise out of a widget callback.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import yaml

from ..config import DTYPES, MoEConfig, parse_config
from ..errors import ConfigError, LazyMoEError, worded
from ..gguf.quants import QUANT_TYPES
from ..io.token import check_token
from ..options import DEFAULT_MAX_SHARD, NotebookSettings, validated, validation_problems
from ..router.modes import GATE_MODE_TABLE, RECOMMENDED_GATE_MODE
from .presets import Preset, parse_preset
from .recipe import dump as dump_recipe
from .recipe import recipe_filename
from .html import error_html, notice_html
from .words import ALLOW_SAME_LABEL, FIELD_HELP, LOW_DISK_LABEL, TOKEN_LABEL, form_words
from .widgets import (EXPERT_HELP, LICENSES, ExpertRow, help_text, parse_number, set_tooltip, styled, tooltip_of,
                      widgets)

_FORM_FIELDS = frozenset({"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "seed",
                          "allow_all_same_experts", "license"})
#: how a settings error names the field: the form's own words for it
_LABELS = {"model_name": "New model name:", "max_shard_bytes": "Shard size (Advanced):", "hf_secret": "", "quants": ""}
_DEFAULTS = NotebookSettings()
_HELP = FIELD_HELP


class MoEForm:
    """The whole form. ``widget`` is what the notebook displays."""

    def __init__(self, preset: Preset | str | None = None) -> None:
        w = widgets
        self.rows: list[ExpertRow] = []
        self._extras: dict[str, Any] = {}  # config keys the form has no field for (architecture, ...)
        self._token: str | None = None
        self._preset: Preset | None = None
        self.last_message: tuple[str, str] | None = None
        self._on_build: Callable[[], None] | None = None
        self._listeners: list[Callable[[], None]] = []  # called once per edit (see on_change)
        self._before_reset: list[Callable[[], str | None]] = []
        self._loading_depth = 0
        self._changed_while_loading = False

        self.model_name = styled(w.Text(description="New model name"), "lazymoe-model-name", _HELP["model_name"])
        self.license = styled(w.Combobox(description="License", options=list(LICENSES), ensure_option=False,
                                         placeholder="apache-2.0 when empty"), "lazymoe-license",
                              "Hub licence id for the model card; one the licences of the merged models allow")
        self.base_model = styled(w.Text(description="Base model", placeholder="org/name or a local folder"),
                                 "lazymoe-base-model", "Gives embeddings, attention, norms and lm_head")
        self.experts_box = w.VBox(layout=w.Layout(width="100%"))
        self.add_button = w.Button(description="+ Add expert", button_style="")
        self.add_button.on_click(lambda _: self.add_expert())
        gates = [(m.label, m.name) for m in GATE_MODE_TABLE]
        self.gate_mode = styled(w.Dropdown(description="Gate mode", options=gates, value=RECOMMENDED_GATE_MODE),
                                "lazymoe-gate-mode", "How each layer's router is initialised")
        self.experts_per_token = styled(w.IntText(description="Experts per token", value=2), "lazymoe-ept",
                                        "How many experts run for every token (2 is usual)", width="260px")
        dtypes = [("same as the base model", "")] + [(d, d) for d in DTYPES]
        self.dtype = styled(w.Dropdown(description="dtype", options=dtypes),
                            "lazymoe-dtype", "Precision of the merged weights")
        self.max_shard = styled(w.Text(description="Shard size", value=DEFAULT_MAX_SHARD), "lazymoe-shard",
                                _HELP["max_shard_bytes"], width="260px")
        self.overwrite = w.Checkbox(description=_HELP["overwrite"], value=_DEFAULTS.overwrite, indent=False)
        self.low_disk = w.Checkbox(description=LOW_DISK_LABEL,
                                   value=_DEFAULTS.low_disk, indent=False)
        set_tooltip(self.low_disk, "Disk needed: the output plus the base's tensors and one shard of fetched tensors, instead of the output plus every tensor fetched")
        self.seed = styled(w.Text(description="Seed", placeholder="random"), "lazymoe-seed",
                           "Pins the randomness (noise, random gates); empty picks one and records it", width="260px")
        self.allow_same = w.Checkbox(description=ALLOW_SAME_LABEL,
                                     value=False, indent=False)
        self.upload = w.Checkbox(description=_HELP["upload"], value=_DEFAULTS.upload, indent=False)
        self.private = w.Checkbox(description=_HELP["private"], value=_DEFAULTS.private, indent=False)
        self.hf_secret = styled(w.Text(description="Colab secret", value=_DEFAULTS.hf_secret), "lazymoe-secret",
                                _HELP["hf_secret"], width="360px")
        self.token_box = styled(w.Password(description=TOKEN_LABEL, placeholder="hf_… (kept in memory only)",
                                           continuous_update=False), "lazymoe-token",
                                "Used only if the secret is missing; never printed, never saved in the notebook",
                                width="360px")
        self.token_box.observe(self._take_token, names="value")
        self.token_status = w.HTML()
        self.forget_token = w.Button(description="Forget token", layout=w.Layout(width="120px", display="none"))
        self.forget_token.on_click(lambda _: self._set_token(None))
        self.gguf = w.Checkbox(description=_HELP["gguf"], value=_DEFAULTS.gguf, indent=False)
        self.quants = styled(w.SelectMultiple(description="Quantisations", options=list(QUANT_TYPES),
                                              value=_DEFAULTS.quants, rows=7), "lazymoe-quants",
                             _HELP["quants"], width="360px")
        self.quants_note = w.HTML()  # the selection in words: a multi-select list hides what is picked
        self.quants.observe(self._show_quants, names="value")
        self.gguf.observe(self._show_quants, names="value")
        self.yaml_box = styled(w.Textarea(rows=16, placeholder="Paste a mergekit-moe YAML here, then press Load"),
                               "lazymoe-yaml", "", width="100%")
        auto = w.Layout(width="auto")  # a fixed width cuts labels off ("Load YAML into t…")
        self.yaml_load = w.Button(description="Load YAML into the form", layout=auto)
        self.yaml_load.on_click(lambda _: self.import_yaml(self.yaml_box.value))
        self.yaml_show = w.Button(description="Show the recipe as YAML", layout=auto)
        self.yaml_show.on_click(lambda _: self._show_yaml())
        self.yaml_links = w.HTML()  # Download YAML / Copy YAML: the full recipe, refreshed on every edit
        self.yaml_links.add_class("lazymoe-yaml-links")
        self.saved_note = w.HTML()  # where the edits are saved
        self.saved_note.add_class("lazymoe-saved")
        self.check_button = w.Button(description="Check", button_style="info")
        self.check_button.on_click(lambda _: self.check())
        self.build_button = w.Button(description="Build", button_style="success")
        self.build_button.on_click(lambda _: self._on_build and self._on_build())
        self.reset_button = w.Button(description="Reset to preset")
        self.reset_button.on_click(lambda _: self._reset_clicked())
        set_tooltip(self.build_button, "Plan, merge, try, then upload and GGUF if ticked: as running the next cells")
        self.extras_note = w.HTML()
        self.messages = w.Output(layout=w.Layout(width="100%"))
        self.messages.add_class("lazymoe-messages")
        self._set_token(None)

        def section(title: str) -> widgets.HTML:
            return w.HTML(f"<b style='font-size:1.05em'>{title}</b>")

        # what every expert field means, once for all experts (the same words as each field's tooltip)
        names = {"source_model": "Model", "positive_prompts": "Positive prompts",
                 "negative_prompts": "Negative prompts", "calibration_text": "Calibration text",
                 "noise_scale": "Noise scale", "residual_scale": "Residual scale"}
        experts_help = w.HTML("<div class='lazymoe-help' style='color:#666;font-size:12px;line-height:1.4;"
                              "white-space:normal;margin:0 0 4px 0'>" +
                              "<br>".join(f"<b>{label}</b>: {html.escape(EXPERT_HELP[key])}"
                                          for key, label in names.items()) + "</div>")
        checkbox_help = lambda box: w.VBox([box, help_text(tooltip_of(box), under_input=False)])  # noqa: E731

        self._error_labels: dict[int, widgets.HTML] = {}  # id(field) -> the line under it that says what is wrong
        self._marked: list[Any] = []
        field = self._with_error
        # one stylesheet for the form: red fields, and inputs that stay inside their box
        style = w.HTML("<style>.lazymoe-invalid input, .lazymoe-invalid textarea, .lazymoe-invalid select "
                       "{border-color:#b00020 !important; background:#fff5f5 !important}"
                       ".lazymoe-form input, .lazymoe-form textarea, .lazymoe-form select {box-sizing:border-box}"
                       "</style>")
        extra = w.Accordion(children=[
            w.VBox([field(self.max_shard), checkbox_help(self.low_disk), self.overwrite, field(self.seed),
                    self.allow_same, self.extras_note]),
            w.VBox([self.yaml_box, w.HBox([self.yaml_load, self.yaml_show, self.yaml_links])]),
        ])
        extra.set_title(0, "Advanced")
        extra.set_title(1, "YAML (mergekit-moe): import / export")
        extra.selected_index = None
        self.widget = w.VBox([
            style, section("Model"), field(self.model_name), field(self.license), field(self.base_model),
            section("Experts"), experts_help, self.experts_box, self.add_button,
            section("Routing"), field(self.gate_mode), field(self.experts_per_token), field(self.dtype),
            section("Hugging Face Hub"), self.upload, self.private,
            w.HBox([field(self.hf_secret, inline=True), field(self.token_box, inline=True)],
                   layout=w.Layout(flex_flow="row wrap")),
            w.HBox([self.token_status, self.forget_token]),
            section("GGUF"), self.gguf, field(self.quants), self.quants_note,
            extra, w.HBox([self.check_button, self.build_button, self.reset_button]), self.saved_note, self.messages,
        ], layout=w.Layout(width="100%", max_width="980px"))
        self.widget.add_class("lazymoe-form")
        for widget in (self.model_name, self.license, self.base_model, self.gate_mode, self.experts_per_token,
                       self.dtype, self.max_shard, self.overwrite, self.low_disk, self.seed, self.allow_same,
                       self.upload, self.private, self.hf_secret, self.gguf, self.quants):
            widget.observe(self._changed, names="value")  # never the token box: the token is never saved
        if preset is not None:
            self.load_preset(preset)
        self._refresh_yaml_links()
        self._show_quants()

    def _show_quants(self, _change: Any = None) -> None:
        self.quants.disabled = not self.gguf.value  # nothing to pick while GGUF is off
        picked = ", ".join(self.quants.value) or "none"
        self.quants_note.value = (f"<span style='color:#555;margin-left:158px'>Selected: <b>{html.escape(picked)}"
                                  "</b></span>" if self.gguf.value else
                                  "<span style='color:#555;margin-left:158px'>Tick GGUF to choose "
                                  "quantisations.</span>")

    # ------------------------------------------------------------------ problems beside their fields

    def _with_error(self, widget: Any, *, inline: bool = False) -> widgets.VBox:
        """``widget``, its help (its tooltip, shown: hovering is not how a newcomer reads a form) and the line
        that says what is wrong with it; the full form width unless ``inline`` (beside another field)."""
        label = widgets.HTML(layout=widgets.Layout(margin="0 0 0 158px"))
        self._error_labels[id(widget)] = label
        tip = tooltip_of(widget)
        parts = [widget, help_text(tip)] if tip else [widget]
        box = widgets.VBox([*parts, label], layout=widgets.Layout(width=(inline and widget.layout.width) or "100%"))
        return box

    def _label_for(self, widget: Any) -> widgets.HTML | None:
        if id(widget) in self._error_labels:
            return self._error_labels[id(widget)]
        return next((row.error for row in self.rows if any(widget is w for w in row.inputs)), None)

    def mark_problems(self, problems: list[tuple[Any, str]]) -> None:
        """Mark each problem's field red and write its message right under it; clear earlier marks."""
        for widget in self._marked:
            widget.remove_class("lazymoe-invalid")
        self._marked = []
        for label in [*self._error_labels.values(), *(row.error for row in self.rows)]:
            label.value = ""
        for widget, text in problems:
            label = self._label_for(widget) if widget is not None else None
            if label is None:
                continue
            widget.add_class("lazymoe-invalid")
            self._marked.append(widget)
            label.value += (f"<div class='lazymoe-field-error' style='color:#b00020;white-space:normal'>"
                            f"✖ {html.escape(text)}</div>")

    # ------------------------------------------------------------------ edits

    def on_before_reset(self, callback: Callable[[], str | None]) -> None:
        """Call ``callback()`` just before "Reset to preset" replaces the form's values; what it returns is
        shown with the reset."""
        self._before_reset.append(callback)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every edit (one call for a whole YAML load or reset)."""
        self._listeners.append(callback)

    def _changed(self, _change: Any = None) -> None:
        if self._loading_depth:
            self._changed_while_loading = True
            return
        self._refresh_yaml_links()
        for callback in self._listeners:
            callback()

    @contextmanager
    def _loading(self) -> Iterator[None]:
        """Many widget changes that are one edit (a YAML load, a reset): listeners hear of it once."""
        self._loading_depth += 1
        try:
            yield
        finally:
            self._loading_depth -= 1
        if not self._loading_depth and self._changed_while_loading:
            self._changed_while_loading = False
            self._changed()

    def recipe(self) -> dict:
        """Everything the form holds, as a preset: the mergekit-moe config plus the ``notebook:`` block.

        Never raises: a value that does not parse yet (a half-typed seed or scale) is left out. The token
        is never part of it."""
        data = self.raw_config(strict=False)
        preset = self._preset.notebook if self._preset else {}
        notebook: dict[str, Any] = {k: preset[k] for k in ("title", "description", "demo_dir") if preset.get(k)}
        notebook.update(model_name=self.model_name.value.strip(), upload=self.upload.value,
                        private=self.private.value, hf_secret=self.hf_secret.value.strip(), gguf=self.gguf.value,
                        quants=list(self.quants.value), max_shard_bytes=self.max_shard.value.strip(),
                        overwrite=self.overwrite.value, low_disk=self.low_disk.value)
        data["notebook"] = notebook
        return data

    def recipe_yaml(self) -> str:
        return dump_recipe(self.recipe())

    def _refresh_yaml_links(self) -> None:
        text = self.recipe_yaml()
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        name = recipe_filename(self.model_name.value.strip() or "recipe")
        # a data: link downloads without a server round trip; the copy button decodes UTF-8 in the page
        copy_js = ("navigator.clipboard.writeText(new TextDecoder().decode(Uint8Array.from(atob(this.dataset.yaml),"
                   "c=>c.charCodeAt(0)))).then(()=>{this.textContent='Copied ✔'},()=>{this.textContent="
                   "'Copy failed: use Show the recipe as YAML'})")
        self.yaml_links.value = (
            f'<a class="lazymoe-download" download="{html.escape(name)}" href="data:text/yaml;base64,{data}" '
            f'style="margin:0 8px;line-height:28px">Download YAML</a>'
            f'<button class="lazymoe-copy" data-yaml="{data}" onclick="{html.escape(copy_js)}" '
            f'style="height:28px">Copy YAML</button>')

    # ------------------------------------------------------------------ messages

    def _say(self, kind: str, text: str, html: str) -> None:
        self.last_message = (kind, text)
        # set the synced outputs directly: works inside callbacks, cells and tests, with or without a kernel
        self.messages.outputs = ({"output_type": "display_data", "metadata": {},
                                  "data": {"text/plain": text, "text/html": html}},)

    def show_error(self, text: str) -> None:
        self._say("error", text, error_html(text))

    def show_notice(self, text: str, kind: str = "info") -> None:
        self._say(kind, text, notice_html(text, kind))

    def clear_messages(self) -> None:
        self.last_message = None
        self.messages.outputs = ()

    # ------------------------------------------------------------------ experts

    def _relayout(self) -> None:
        for i, row in enumerate(self.rows):
            # the YAML index too: messages from the config checks name experts[i]
            row.title.value = f"<b>Expert {i + 1}</b> <span style='color:#777'>experts[{i}]</span>&nbsp;"
            row.up.disabled, row.down.disabled = i == 0, i == len(self.rows) - 1
        self.experts_box.children = tuple(r.box for r in self.rows)

    def add_expert(self, expert: dict | Any | None = None) -> ExpertRow:
        row = ExpertRow(on_up=lambda: self.move_expert(row, -1), on_down=lambda: self.move_expert(row, +1),
                        on_remove=lambda: self.remove_expert(row))
        if expert is not None:
            row.fill(expert)
        for widget in row.inputs:
            widget.observe(self._changed, names="value")
        self.rows.append(row)
        self._relayout()
        self._changed()
        return row

    def remove_expert(self, row: ExpertRow) -> None:
        self.rows.remove(row)
        self._relayout()
        self._changed()

    def move_expert(self, row: ExpertRow, delta: int) -> None:
        i = self.rows.index(row)
        j = min(max(i + delta, 0), len(self.rows) - 1)
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self._relayout()
        self._changed()

    # ------------------------------------------------------------------ config

    def set_config(self, config: MoEConfig) -> None:
        """Show ``config`` in the form (it may break semantic rules; its types must be right)."""
        self.base_model.value = config.base_model
        self.rows = []
        for expert in config.experts:
            self.add_expert(expert)
        self._relayout()
        self.gate_mode.value = config.gate_mode
        self.experts_per_token.value = config.experts_per_token
        self.dtype.value = config.dtype or ""
        self.seed.value = "" if config.seed is None else str(config.seed)
        self.allow_same.value = config.allow_all_same_experts
        self.license.value = config.license or ""
        self._extras = {k: v for k, v in config.model_dump(exclude_defaults=True).items() if k not in _FORM_FIELDS}
        shown = ", ".join(f"{k}: {v!r}" for k, v in self._extras.items())
        self.extras_note.value = (f"<span style='color:#555'>Also in the config (edit them in the YAML box): "
                                  f"{html.escape(shown)}</span>" if shown else "")

    def raw_config(self, *, strict: bool = True) -> dict:
        """The form's values as a config mapping, before validation (bad numbers raise ConfigError; with
        ``strict=False`` they are left out)."""
        data: dict[str, Any] = {
            "base_model": self.base_model.value.strip(),
            "gate_mode": self.gate_mode.value,
            "experts_per_token": self.experts_per_token.value,
            "experts": [row.values(i, strict=strict) for i, row in enumerate(self.rows)],
        }
        if self.dtype.value:
            data["dtype"] = self.dtype.value
        seed = self.seed.value.strip()
        if re.fullmatch(r"\d+", seed):
            data["seed"] = int(seed)
        elif seed and strict:
            raise ConfigError(f"Seed: {seed!r} is not a whole number; leave it empty for a random one.")
        if self.allow_same.value:
            data["allow_all_same_experts"] = True
        if self.license.value.strip():
            data["license"] = self.license.value.strip()
        data.update(self._extras)
        return data

    def to_config(self) -> MoEConfig:
        """The validated config, or :class:`ConfigError` saying what to change in the form."""
        problems = self._field_problems()
        if problems:
            raise ConfigError(problems[0][1])
        return parse_config(self.raw_config())

    def _field_problems(self) -> list[tuple[Any, str]]:
        """Problems of single config fields, each with its widget: all of them, not only the first."""
        found: list[tuple[Any, str]] = []
        if not self.base_model.value.strip():
            found.append((self.base_model, "Base model is empty: give a Hub id (org/name) or a local folder."))
        for i, row in enumerate(self.rows):
            if not row.source.value.strip():
                found.append((row.source, f"Expert {i + 1} has no model: give a Hub id (org/name) or a local "
                                          "folder, or remove it."))
            for widget, what in ((row.noise, "noise scale"), (row.residual, "residual scale")):
                try:
                    parse_number(widget.value, f"Expert {i + 1} {what}")
                except ConfigError as err:
                    found.append((widget, str(err)))
        seed = self.seed.value.strip()
        if seed and not re.fullmatch(r"\d+", seed):
            found.append((self.seed, f"Seed: {seed!r} is not a whole number; leave it empty for a random one."))
        return found

    def problems(self) -> list[tuple[Any, str]]:
        """Every problem the form has now, each with the widget it is about (None: the config as a whole).

        Field problems all at once; the config's own rules (which need well-formed fields) after them."""
        found = self._field_problems()
        if not found:
            try:
                parse_config(self.raw_config())
            except ConfigError as err:
                found.append((self._widget_named_in(str(err)), worded(err, form_words)))
        return found + self._settings_problems()

    def _widget_named_in(self, message: str) -> Any:
        """The widget a config error is about, from the field it names (experts[1], experts_per_token...)."""
        expert = re.search(r"experts\[(\d+)\]", message)
        if expert and int(expert.group(1)) < len(self.rows):
            row = self.rows[int(expert.group(1))]
            fields = (("noise_scale", row.noise), ("residual_scale", row.residual), ("negative_prompts", row.negative),
                      ("calibration_text", row.calibration), ("source_model", row.source))
            return next((widget for key, widget in fields if key in message), row.positive)
        for key, widget in (("experts_per_token", self.experts_per_token), ("license", self.license),
                            ("gate_mode", self.gate_mode), ("dtype", self.dtype), ("seed", self.seed),
                            ("base_model", self.base_model)):
            if message.startswith(key) or f" {key}" in message:
                return widget
        return None

    # ------------------------------------------------------------------ settings

    def _setting_widgets(self) -> dict[str, Any]:
        """The widget of each notebook setting the form shows (``NotebookSettings`` field -> widget)."""
        return {"model_name": self.model_name, "max_shard_bytes": self.max_shard, "overwrite": self.overwrite,
                "low_disk": self.low_disk, "upload": self.upload, "private": self.private,
                "hf_secret": self.hf_secret, "gguf": self.gguf, "quants": self.quants}

    def set_settings(self, notebook: dict) -> None:
        """Fill the notebook-only fields named in ``notebook`` (a preset's ``notebook:`` block)."""
        if notebook.get("quants") is not None:
            validated(NotebookSettings, {"quants": notebook["quants"]}, _LABELS)  # names an unknown type
        for key, widget in self._setting_widgets().items():
            value = notebook.get(key)
            if value is not None:
                widget.value = str(value) if key == "max_shard_bytes" else tuple(value) if key == "quants" else value

    def settings(self) -> NotebookSettings:
        """The validated notebook settings, or :class:`ConfigError` naming the field to fix."""
        problems = self._settings_problems()
        if problems:
            raise ConfigError(problems[0][1])
        values = {key: widget.value for key, widget in self._setting_widgets().items()}
        return validated(NotebookSettings, values, _LABELS)

    def _settings_problems(self) -> list[tuple[Any, str]]:
        """Every settings problem at once, with the widget to mark: ``NotebookSettings``' own rules."""
        widgets_by_field = self._setting_widgets()
        if not self.model_name.value.strip():
            return [(self.model_name, "New model name is empty: it names the output folder and the Hub repo.")]
        values = {key: widget.value for key, widget in widgets_by_field.items()}
        return [(widgets_by_field.get(field), text)
                for field, text in validation_problems(NotebookSettings, values, _LABELS)]

    # ------------------------------------------------------------------ token (never echoed, never synced back)

    @property
    def token(self) -> str | None:
        return self._token

    def _take_token(self, change: dict) -> None:
        value = (change.get("new") or "").strip()
        if value:
            self.token_box.value = ""  # out of the widget state at once: it can never be saved with the notebook
            try:
                check_token(value, "the token box")
            except LazyMoEError as err:  # the message names the fault, never the token
                self._set_token(None)
                self.token_status.value = error_html(str(err))
                return
            self._set_token(value)

    def _set_token(self, token: str | None) -> None:
        self._token = token
        if token:
            self.token_status.value = "<span style='color:#1b6e20'>✔ token kept in memory (hidden)</span>"
            self.forget_token.layout.display = ""
        else:
            self.token_status.value = ("<span style='color:#555'>No token typed: the Colab secret, then HF_TOKEN "
                                       "or a saved login is used.</span>")
            self.forget_token.layout.display = "none"

    # ------------------------------------------------------------------ presets and YAML

    def load_preset(self, preset: Preset | str) -> None:
        self._preset = preset if isinstance(preset, Preset) else parse_preset(preset)
        self.reset()

    def reset(self) -> str:
        """Back to the preset the form was made from; returns what the before-reset callbacks said."""
        if self._preset is None:
            self.show_notice("This form was not made from a preset: nothing to reset to.", "info")
            return ""
        notes = [note for callback in self._before_reset if (note := callback())]
        self.import_yaml(self._preset.text, quiet=True, reset=True)
        self.yaml_box.value = ""
        return " ".join(notes)

    def _reset_clicked(self) -> None:
        notes = self.reset()
        if self.last_message is None:  # the preset itself loaded cleanly
            self.show_notice(f"Back to the preset. {notes}".strip(), "info")

    def import_yaml(self, text: str, *, quiet: bool = False, reset: bool = False) -> bool:
        """Load a mergekit-moe YAML (or a preset) into the form; say what is wrong with it if anything."""
        with self._loading():
            return self._import_yaml(text, quiet=quiet, reset=reset)

    def _import_yaml(self, text: str, *, quiet: bool, reset: bool) -> bool:
        try:
            preset = parse_preset(text, name="pasted")
        except ConfigError as err:
            self.show_error(f"Nothing was loaded: {err}")
            return False
        try:
            config, problem = parse_config(preset.config), None
        except ConfigError as err:
            problem = worded(err, form_words)
            try:  # right types, wrong combination (e.g. one expert): load it so it can be fixed in the form
                config = MoEConfig.model_validate(preset.config)
            except ConfigError:
                self.show_error(f"Nothing was loaded: {problem}")
                return False
        try:  # a preset resets every setting; a pasted block changes only what it names
            self.set_settings(preset.notebook if reset else {k: preset.notebook[k] for k in preset.given})
        except ConfigError as err:
            self.show_error(f"Nothing was loaded: {err}")
            return False
        self.set_config(config)
        if problem:
            self.show_error(f"Loaded, but not valid yet: {problem}")
            return False
        if quiet:
            self.clear_messages()
        else:
            self.show_notice(f"Loaded {len(config.experts)} experts into the form.", "ok")
        return True

    def export_yaml(self) -> str:
        """The form as mergekit-moe YAML (validated config when valid, else the raw values)."""
        try:
            return self.to_config().to_yaml()
        except ConfigError:
            return yaml.safe_dump(self.raw_config(), sort_keys=False, allow_unicode=True, width=100)

    def _show_yaml(self) -> None:
        self.yaml_box.value = self.recipe_yaml()  # the full recipe: config plus the notebook: block
        try:
            self.to_config()
            self.settings()
            self.show_notice("The YAML box now shows the whole recipe (the config and the notebook: block).", "ok")
        except ConfigError as err:
            self.show_error(f"Shown as YAML, but not valid yet: {err}")

    # ------------------------------------------------------------------ checking

    def check(self) -> tuple[MoEConfig, NotebookSettings] | None:
        """Validate everything; show every problem at once, each also beside its field (marked red).
        Returns the values, or None after showing the problems."""
        problems = self.problems()
        self.mark_problems(problems)
        if len(problems) == 1:
            self.show_error(problems[0][1])
            return None
        if problems:
            self.show_error(f"{len(problems)} problems, marked in red in the form:\n" +
                            "\n".join(f"• {text}" for _, text in problems))
            return None
        try:
            config, settings = self.to_config(), self.settings()
        except LazyMoEError as err:  # problems() and these share every rule; kept as a guard
            self.show_error(worded(err, form_words))
            return None
        self.show_notice(f"Looks good: {settings.model_name}, {config.num_experts} experts "
                         f"({config.experts_per_token} per token), gate {config.gate_mode}. Next: the Plan step.", "ok")
        return config, settings

    def on_build(self, callback: Callable[[], None]) -> None:
        self._on_build = callback
