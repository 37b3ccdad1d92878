"""The notebook form: core ipywidgets only, working with ipywidgets 7.7 (Colab) and 8.x (Jupyter).

The form holds no logic of its own: it fills in a :class:`~lazymoe.config.MoEConfig` (validated by the
same code as YAML and the CLI) plus the notebook-only :class:`Settings`. Problems are shown in the form's
message area as one short red line; they never raise out of a widget callback.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Callable

import ipywidgets as widgets
import yaml
from pydantic import ValidationError

from .config import DTYPES, GATE_MODES, RECOMMENDED_GATE_MODE, MoEConfig, parse_config
from .errors import ConfigError, LazyMoEError
from .hub import repo_name_problem
from .notebooks import Preset, parse_preset
from .plan import parse_bytes
from .ui_runtime import error_html, notice_html
from .ui_widgets import GATE_LABELS, LICENSES, QUANT_TYPES, ExpertRow, set_tooltip, styled

_FORM_FIELDS = frozenset({"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "seed",
                          "allow_all_same_experts", "license"})
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Settings:
    """What the notebook does with the config, beyond merging it. The token is never part of it."""

    model_name: str
    max_shard_bytes: int
    overwrite: bool
    low_disk: bool
    upload: bool
    private: bool
    hf_secret: str
    gguf: bool
    quants: tuple[str, ...]

    @property
    def folder_name(self) -> str:
        return self.model_name.rsplit("/", 1)[-1]


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

        self.model_name = styled(w.Text(description="New model name"), "lazymoe-model-name",
                                 "Name of the merged model: the output folder and the Hub repo (in your namespace "
                                 "unless you write namespace/name)")
        self.license = styled(w.Combobox(description="License", options=list(LICENSES), ensure_option=False,
                                         placeholder="apache-2.0 when empty"), "lazymoe-license",
                              "Hub licence id for the model card; one the licences of the merged models allow")
        self.base_model = styled(w.Text(description="Base model", placeholder="org/name or a local folder"),
                                 "lazymoe-base-model", "Gives embeddings, attention, norms and lm_head")
        self.experts_box = w.VBox(layout=w.Layout(width="100%"))
        self.add_button = w.Button(description="+ Add expert", button_style="")
        self.add_button.on_click(lambda _: self.add_expert())
        gates = [(GATE_LABELS.get(m, m), m) for m in GATE_MODES]
        self.gate_mode = styled(w.Dropdown(description="Gate mode", options=gates, value=RECOMMENDED_GATE_MODE),
                                "lazymoe-gate-mode", "How each layer's router is initialised")
        self.experts_per_token = styled(w.IntText(description="Experts per token", value=2), "lazymoe-ept",
                                        "How many experts run for every token (2 is usual)", width="260px")
        dtypes = [("same as the base model", "")] + [(d, d) for d in DTYPES]
        self.dtype = styled(w.Dropdown(description="dtype", options=dtypes),
                            "lazymoe-dtype", "Precision of the merged weights")
        self.max_shard = styled(w.Text(description="Shard size", value="2GB"), "lazymoe-shard",
                                "Largest safetensors file, in bytes with a unit: 2GB, 500MB, 1.5GiB", width="260px")
        self.overwrite = w.Checkbox(description="Replace an earlier lazymoe build with the same name", value=True,
                                    indent=False)
        self.low_disk = w.Checkbox(description="Low-disk mode: delete each downloaded expert once it is written",
                                   value=False, indent=False)
        set_tooltip(self.low_disk, "Disk needed: the output plus two models instead of the output plus all of them")
        self.seed = styled(w.Text(description="Seed", placeholder="random"), "lazymoe-seed",
                           "Pins the randomness (noise, random gates); empty picks one and records it", width="260px")
        self.allow_same = w.Checkbox(description="Allow every expert to be the same model (only if you will train it)",
                                     value=False, indent=False)
        self.upload = w.Checkbox(description="Upload to the Hugging Face Hub", value=False, indent=False)
        self.private = w.Checkbox(description="Private repo", value=False, indent=False)
        self.hf_secret = styled(w.Text(description="Colab secret", value="HF_TOKEN"), "lazymoe-secret",
                                "Name of the Colab secret (key icon, left bar) holding a write token", width="360px")
        self.token_box = styled(w.Password(description="…or a token", placeholder="hf_… (kept in memory only)",
                                           continuous_update=False), "lazymoe-token",
                                "Used only if the secret is missing; never printed, never saved in the notebook",
                                width="360px")
        self.token_box.observe(self._take_token, names="value")
        self.token_status = w.HTML()
        self.forget_token = w.Button(description="Forget token", layout=w.Layout(width="120px", display="none"))
        self.forget_token.on_click(lambda _: self._set_token(None))
        self.gguf = w.Checkbox(description="Also make GGUF files (llama.cpp)", value=False, indent=False)
        self.quants = styled(w.SelectMultiple(description="Quantisations", options=list(QUANT_TYPES),
                                              value=("Q4_K_M", "Q5_K_M"), rows=7), "lazymoe-quants",
                             "Ctrl/Cmd-click to pick several", width="360px")
        self.yaml_box = styled(w.Textarea(rows=16, placeholder="Paste a mergekit-moe YAML here, then press Load"),
                               "lazymoe-yaml", "", width="100%")
        self.yaml_load = w.Button(description="Load YAML into the form")
        self.yaml_load.on_click(lambda _: self.import_yaml(self.yaml_box.value))
        self.yaml_show = w.Button(description="Show the form as YAML")
        self.yaml_show.on_click(lambda _: self._show_yaml())
        self.check_button = w.Button(description="Check", button_style="info")
        self.check_button.on_click(lambda _: self.check())
        self.build_button = w.Button(description="Build", button_style="success")
        self.build_button.on_click(lambda _: self._on_build and self._on_build())
        self.reset_button = w.Button(description="Reset to preset")
        self.reset_button.on_click(lambda _: self.reset())
        set_tooltip(self.build_button, "Plan, merge, try, then upload and GGUF if ticked: as running the next cells")
        self.extras_note = w.HTML()
        self.messages = w.Output(layout=w.Layout(width="100%"))
        self.messages.add_class("lazymoe-messages")
        self._set_token(None)

        def section(title: str) -> widgets.HTML:
            return w.HTML(f"<b style='font-size:1.05em'>{title}</b>")

        extra = w.Accordion(children=[
            w.VBox([self.max_shard, self.low_disk, self.overwrite, self.seed, self.allow_same, self.extras_note]),
            w.VBox([self.yaml_box, w.HBox([self.yaml_load, self.yaml_show])]),
        ])
        extra.set_title(0, "Advanced")
        extra.set_title(1, "YAML (mergekit-moe): import / export")
        extra.selected_index = None
        self.widget = w.VBox([
            section("Model"), self.model_name, self.license, self.base_model,
            section("Experts"), self.experts_box, self.add_button,
            section("Routing"), self.gate_mode, self.experts_per_token, self.dtype,
            section("Hugging Face Hub"), self.upload, self.private, w.HBox([self.hf_secret, self.token_box]),
            w.HBox([self.token_status, self.forget_token]),
            section("GGUF"), self.gguf, self.quants,
            extra, w.HBox([self.check_button, self.build_button, self.reset_button]), self.messages,
        ], layout=w.Layout(width="100%", max_width="980px"))
        self.widget.add_class("lazymoe-form")
        if preset is not None:
            self.load_preset(preset)

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
        self.rows.append(row)
        self._relayout()
        return row

    def remove_expert(self, row: ExpertRow) -> None:
        self.rows.remove(row)
        self._relayout()

    def move_expert(self, row: ExpertRow, delta: int) -> None:
        i = self.rows.index(row)
        j = min(max(i + delta, 0), len(self.rows) - 1)
        self.rows[i], self.rows[j] = self.rows[j], self.rows[i]
        self._relayout()

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

    def raw_config(self) -> dict:
        """The form's values as a config mapping, before validation (bad numbers raise ConfigError)."""
        data: dict[str, Any] = {
            "base_model": self.base_model.value.strip(),
            "gate_mode": self.gate_mode.value,
            "experts_per_token": self.experts_per_token.value,
            "experts": [row.values(i) for i, row in enumerate(self.rows)],
        }
        if self.dtype.value:
            data["dtype"] = self.dtype.value
        seed = self.seed.value.strip()
        if seed:
            if not re.fullmatch(r"\d+", seed):
                raise ConfigError(f"Seed: {seed!r} is not a whole number; leave it empty for a random one.")
            data["seed"] = int(seed)
        if self.allow_same.value:
            data["allow_all_same_experts"] = True
        if self.license.value.strip():
            data["license"] = self.license.value.strip()
        data.update(self._extras)
        return data

    def to_config(self) -> MoEConfig:
        """The validated config, or :class:`ConfigError` saying what to change in the form."""
        if not self.base_model.value.strip():
            raise ConfigError("Base model is empty: give a Hub id (org/name) or a local folder.")
        for i, row in enumerate(self.rows):
            if not row.source.value.strip():
                raise ConfigError(f"Expert {i + 1} has no model: give a Hub id (org/name) or a local folder, "
                                  "or remove it.")
        return parse_config(self.raw_config())

    # ------------------------------------------------------------------ settings

    def set_settings(self, notebook: dict) -> None:
        """Fill the notebook-only fields named in ``notebook`` (a preset's ``notebook:`` block)."""
        unknown = [q for q in notebook.get("quants") or () if q not in QUANT_TYPES]
        if unknown:
            raise ConfigError(f"Unknown quantisation type {unknown[0]!r}; choose from {', '.join(QUANT_TYPES)}.")
        fields = {"model_name": self.model_name, "upload": self.upload,
                  "private": self.private, "hf_secret": self.hf_secret, "gguf": self.gguf,
                  "max_shard_bytes": self.max_shard, "overwrite": self.overwrite, "low_disk": self.low_disk}
        for key, value in notebook.items():
            if key in fields and value is not None:
                fields[key].value = str(value) if key == "max_shard_bytes" else value
        if notebook.get("quants") is not None:
            self.quants.value = tuple(notebook["quants"])

    def settings(self) -> Settings:
        """The validated notebook settings, or :class:`ConfigError` naming the field to fix."""
        name = self.model_name.value.strip()
        if not name:
            raise ConfigError("New model name is empty: it names the output folder and the Hub repo.")
        problem = repo_name_problem(name)  # it names the Hub repo too: the Hub's rule, checked in one place
        if problem:
            raise ConfigError(f"New model name: {problem}.")
        try:
            shard = parse_bytes(self.max_shard.value)
        except ConfigError as err:
            raise ConfigError(f"Shard size (Advanced): {err}") from None
        secret = self.hf_secret.value.strip()
        if self.upload.value and secret and not _SECRET_NAME.match(secret):
            raise ConfigError(f"Colab secret {secret!r} is not a secret name (letters, digits and _), e.g. HF_TOKEN.")
        if self.gguf.value and not self.quants.value:
            raise ConfigError("GGUF is ticked but no quantisation is selected: pick at least one (e.g. Q4_K_M).")
        return Settings(model_name=name, max_shard_bytes=shard, overwrite=self.overwrite.value,
                        low_disk=self.low_disk.value,
                        upload=self.upload.value, private=self.private.value,
                        hf_secret=secret, gguf=self.gguf.value, quants=tuple(self.quants.value))

    # ------------------------------------------------------------------ token (never echoed, never synced back)

    @property
    def token(self) -> str | None:
        return self._token

    def _take_token(self, change: dict) -> None:
        value = (change.get("new") or "").strip()
        if value:
            self._set_token(value)
            self.token_box.value = ""  # out of the widget state at once: it can never be saved with the notebook

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

    def reset(self) -> None:
        """Back to the preset the form was made from."""
        if self._preset is None:
            self.show_notice("This form was not made from a preset: nothing to reset to.", "info")
            return
        self.import_yaml(self._preset.text, quiet=True, reset=True)

    def import_yaml(self, text: str, *, quiet: bool = False, reset: bool = False) -> bool:
        """Load a mergekit-moe YAML (or a preset) into the form; say what is wrong with it if anything."""
        try:
            preset = parse_preset(text, name="pasted")
        except ConfigError as err:
            self.show_error(f"Nothing was loaded: {err}")
            return False
        try:
            config, problem = parse_config(preset.config), None
        except ConfigError as err:
            problem = str(err)
            try:  # right types, wrong combination (e.g. one expert): load it so it can be fixed in the form
                config = MoEConfig.model_validate(preset.config)
            except (ValidationError, TypeError):
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
        try:
            self.yaml_box.value = self.export_yaml()
            self.to_config()
            self.show_notice("The YAML box now shows the form's config.", "ok")
        except ConfigError as err:
            self.show_error(f"Shown as YAML, but not valid yet: {err}")

    # ------------------------------------------------------------------ checking

    def check(self) -> tuple[MoEConfig, Settings] | None:
        """Validate everything; show a one-line verdict. Returns the values, or None after showing the error."""
        try:
            config, settings = self.to_config(), self.settings()
        except LazyMoEError as err:
            self.show_error(str(err))
            return None
        self.show_notice(f"Looks good: {settings.model_name}, {config.num_experts} experts "
                         f"({config.experts_per_token} per token), gate {config.gate_mode}. Next: the Plan step.", "ok")
        return config, settings

    def on_build(self, callback: Callable[[], None]) -> None:
        self._on_build = callback
