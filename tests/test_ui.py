"""The notebook form: config ⇄ form ⇄ YAML round trips, and bad values shown as messages in the form."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")

from lazymoe.config import load_config  # noqa: E402
from lazymoe.errors import ConfigError  # noqa: E402
from lazymoe.notebook.presets import load_preset  # noqa: E402
from lazymoe.notebook.form import MoEForm  # noqa: E402
from lazymoe.notebook.widgets import IPYWIDGETS_MAJOR, NEWLINE_MARK, set_tooltip  # noqa: E402

PRESETS = Path(__file__).resolve().parent.parent / "notebooks" / "presets"

RICH = {
    "base_model": "org/base@v1.0",
    "gate_mode": "cheap_embed",
    "dtype": "float16",
    "experts_per_token": 1,
    "seed": 1234,
    "architecture": "mixtral",
    "router_chat_template": True,
    "experts": [
        {"source_model": "org/chat", "positive_prompts": ["Hello there", "  leading spaces kept"],
         "negative_prompts": ["def f():\n    return 1"], "noise_scale": 0.01},
        {"source_model": "./local/code", "positive_prompts": ["def add(a, b):\n    return a + b"],
         "residual_scale": 0.5},
        {"source_model": "org/math", "positive_prompts": ["Solve 2x = 4", "¿Qué tal? 東京"]},
    ],
}


def _form_with(config) -> MoEForm:
    form = MoEForm()
    form.set_config(load_config(config))
    return form


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(load_preset(PRESETS / "demo-tiny.yaml").config, id="demo preset"),
        pytest.param(load_preset(PRESETS / "beyonder-4x7b-v3.yaml").config, id="beyonder preset"),
        pytest.param(RICH, id="scales, negatives, multi-line prompts, seed, extras"),
        pytest.param({**RICH, "allow_all_same_experts": True, "gate_mode": "random", "dtype": None,
                      "experts": [{"source_model": "org/same"}, {"source_model": "org/same"}]}, id="random gate, same experts"),
    ],
)
def test_config_to_form_to_config_and_yaml_is_identity(source):
    config = load_config(source)
    form = _form_with(config)
    assert form.to_config() == config
    # YAML in, form, YAML out gives the same config
    form2 = MoEForm()
    assert form2.import_yaml(config.to_yaml()) is True
    assert load_config(form2.export_yaml()) == config
    assert form2.last_message[0] == "ok"


def test_multiline_prompts_use_a_visible_mark_and_come_back_intact():
    form = _form_with(RICH)
    assert form.rows[1].positive.value == f"def add(a, b):{NEWLINE_MARK}    return a + b"
    assert form.to_config().experts[1].positive_prompts == ["def add(a, b):\n    return a + b"]


def test_fields_without_a_widget_travel_unchanged_and_are_listed():
    form = _form_with(RICH)
    assert "router_chat_template: True" in form.extras_note.value
    assert form.to_config().router_chat_template is True


def test_preset_fills_settings_and_the_token_is_never_part_of_them():
    form = MoEForm(load_preset(PRESETS / "beyonder-4x7b-v3.yaml"))
    s = form.settings()
    assert (s.model_name, s.upload, s.private, s.gguf) == ("Beyonder-4x7B-v3", True, False, False)
    assert form.license.value == "cc-by-nc-4.0" and form.to_config().license == "cc-by-nc-4.0"
    assert s.quants == ("Q4_K_M", "Q5_K_M") and s.max_shard_bytes == 2_000_000_000 and s.hf_secret == "HF_TOKEN"
    assert s.low_disk is True, "the 4x7B preset must fit Colab's disk"
    form.token_box.value = "hf_TopSecretValue123"
    assert form.token == "hf_TopSecretValue123"
    assert form.token_box.value == "", "the typed token must leave the synced widget state at once"
    assert "TopSecret" not in repr(form.settings()) + form.export_yaml() + form.token_status.value
    form.forget_token.click()
    assert form.token is None


def test_edit_the_form_and_the_config_follows():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    form.model_name.value = "My-Edited-MoE"
    form.rows[1].positive.value = "write a python function\ncode"
    form.rows[3].remove.click()
    form.add_expert({"source_model": "lazymoe-demo/extra", "positive_prompts": ["poems"]})
    form.rows[0].down.click()  # chat <-> code
    form.gate_mode.value = "hidden_avg"
    form.experts_per_token.value = 3
    form.dtype.value = ""
    config = form.to_config()
    assert [e.source_model for e in config.experts] == ["lazymoe-demo/code", "lazymoe-demo/chat", "lazymoe-demo/math",
                                                        "lazymoe-demo/extra"]
    assert config.experts[0].positive_prompts == ["write a python function", "code"]
    assert (config.gate_mode, config.experts_per_token, config.dtype) == ("hidden_avg", 3, None)
    assert form.settings().model_name == "My-Edited-MoE"
    assert [r.up.disabled for r in form.rows] == [True, False, False, False]
    assert [r.down.disabled for r in form.rows] == [False, False, False, True]
    assert form.rows[2].title.value.startswith("<b>Expert 3</b>") and "experts[2]" in form.rows[2].title.value


def test_reset_goes_back_to_the_preset():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    before = form.to_config()
    form.model_name.value = "x"
    form.rows[0].remove.click()
    form.reset_button.click()
    assert form.to_config() == before and form.settings().model_name == "LazyMoE-Demo-4x"


# each case: how to break the form, a phrase the message must contain (it names the field and the fix)
BAD_VALUES = [
    ("experts per token 0", lambda f: setattr(f.experts_per_token, "value", 0), "between 1 and the number of experts"),
    ("experts per token > experts", lambda f: setattr(f.experts_per_token, "value", 5), "experts_per_token is 5"),
    ("name with a space", lambda f: setattr(f.model_name, "value", "my model"), "New model name: 'my model' is not a valid repo name"),
    ("empty name", lambda f: setattr(f.model_name, "value", " "), "New model name is empty"),
    ("shard size in words", lambda f: setattr(f.max_shard, "value", "2 gigs"), "Shard size (Advanced): '2 gigs' is not a size"),
    ("noise not a number", lambda f: setattr(f.rows[1].noise, "value", "abc"), "Expert 2 noise scale: 'abc' is not a number"),
    ("negative noise", lambda f: setattr(f.rows[0].noise, "value", "-1"), "noise_scale must be >= 0"),
    ("seed not a number", lambda f: setattr(f.seed, "value", "x1"), "Seed: 'x1' is not a whole number"),
    ("no base model", lambda f: setattr(f.base_model, "value", ""), "Base model is empty"),
    ("expert without model", lambda f: setattr(f.rows[2].source, "value", ""), "Expert 3 has no model"),
    ("only one expert", lambda f: [r.remove.click() for r in list(f.rows[1:])], "at least 2 experts"),
    ("no positive prompts", lambda f: setattr(f.rows[0].positive, "value", "\n  \n"), "has no positive_prompts"),
    ("same prompts everywhere", lambda f: [setattr(r.positive, "value", "same") or setattr(r.negative, "value", "")
                                           for r in f.rows], "identical for every expert"),
    ("all experts the same model", lambda f: [setattr(r.source, "value", "org/same") for r in f.rows], "Every expert is the same model"),
    ("GGUF without a quant", lambda f: setattr(f.gguf, "value", True) or setattr(f.quants, "value", ()), "no quantisation is selected"),
    ("bad secret name", lambda f: setattr(f.upload, "value", True) or setattr(f.hf_secret, "value", "my secret"), "is not a secret name"),
]


@pytest.mark.parametrize("break_it, phrase", [pytest.param(b, p, id=i) for i, b, p in BAD_VALUES])
def test_bad_values_become_a_red_message_in_the_form(break_it, phrase):
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    break_it(form)
    form.check_button.click()  # the button's callback: must not raise, must say what to fix
    kind, text = form.last_message
    assert kind == "error" and phrase in text, text
    (output,) = form.messages.outputs
    assert "lazymoe-error" in output["data"]["text/html"] and "#b00020" in output["data"]["text/html"]
    assert "Traceback" not in output["data"]["text/html"]


def test_a_license_that_is_not_a_hub_id_is_refused_in_the_form():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    form.license.value = "my own license!"
    assert form.check() is None
    assert form.last_message[1].startswith("license: is not a Hub license id"), form.last_message


def test_a_valid_form_says_so_and_what_comes_next():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    config, settings = form.check()
    assert form.last_message == ("ok", "Looks good: LazyMoE-Demo-4x, 4 experts (2 per token), gate expert_classifier. Next: the Plan step.")
    assert config.num_experts == 4 and settings.folder_name == "LazyMoE-Demo-4x"


IMPORTS = [
    ("broken YAML", "base_model: [unclosed\n", "Nothing was loaded: The preset is not valid YAML at line"),
    ("unknown gate mode", "base_model: a/b\ngate_mode: hiden\nexperts:\n- source_model: c/d\n  positive_prompts: [x]\n"
                          "- source_model: e/f\n  positive_prompts: [y]\n", "Did you mean 'hidden'?"),
    ("unknown key", "base_model: a/b\nexpert: []\n", "Unknown key 'expert' in the config. Did you mean 'experts'?"),
    ("not a mapping", "- a\n- b\n", "must be a mapping"),
    ("unknown notebook key", "base_model: a/b\nexperts: []\nnotebook: {modelname: x}\n", "Did you mean 'model_name'?"),
]


@pytest.mark.parametrize("text, phrase", [pytest.param(t, p, id=i) for i, t, p in IMPORTS])
def test_importing_bad_yaml_changes_nothing_and_says_why(text, phrase):
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    before = (form.to_config(), form.settings())
    form.yaml_box.value = text
    form.yaml_load.click()
    assert form.last_message[0] == "error" and phrase in form.last_message[1], form.last_message
    assert form.last_message[1].startswith("Nothing was loaded")
    assert (form.to_config(), form.settings()) == before


def test_importing_a_fixable_config_loads_it_and_says_what_to_fix():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    assert form.import_yaml("base_model: a/b\nexperts:\n- source_model: c/d\n  positive_prompts: [x]\n") is False
    assert form.last_message[1].startswith("Loaded, but not valid yet: A MoE needs at least 2 experts")
    assert [r.source.value for r in form.rows] == ["c/d"]
    form.add_expert({"source_model": "e/f", "positive_prompts": ["y"]})
    assert [e.source_model for e in form.to_config().experts] == ["c/d", "e/f"]


def test_a_pasted_notebook_block_changes_only_the_settings_it_names():
    form = MoEForm(load_preset(PRESETS / "beyonder-4x7b-v3.yaml"))
    text = load_preset(PRESETS / "demo-tiny.yaml").config
    import yaml

    assert form.import_yaml(yaml.safe_dump({**text, "notebook": {"gguf": True, "quants": ["Q8_0"]}}))
    s = form.settings()
    assert (s.gguf, s.quants, s.model_name) == (True, ("Q8_0",), "Beyonder-4x7B-v3")
    assert form.to_config().license is None, "the pasted config has no licence"


def test_show_yaml_button_exports_the_form_even_when_invalid():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    form.experts_per_token.value = 9
    form.yaml_show.click()
    assert "experts_per_token: 9" in form.yaml_box.value
    assert form.last_message[0] == "error" and "experts_per_token is 9" in form.last_message[1]
    form.experts_per_token.value = 2
    form.yaml_show.click()
    assert load_config(form.yaml_box.value) == form.to_config() and form.last_message[0] == "ok"


def test_tooltips_use_the_attribute_of_the_installed_ipywidgets():
    import ipywidgets as widgets

    text, button = widgets.Text(), widgets.Button()
    set_tooltip(text, "help")
    set_tooltip(button, "press")
    assert button.tooltip == "press"
    if IPYWIDGETS_MAJOR >= 8:
        assert text.tooltip == "help"
    else:
        assert text.description_tooltip == "help"


def test_config_errors_are_config_errors():
    form = MoEForm()
    with pytest.raises(ConfigError, match="Base model is empty"):
        form.to_config()


def test_every_problem_shows_at_once_beside_its_field():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    form.model_name.value = "my model"
    form.base_model.value = ""
    form.rows[1].noise.value = "abc"
    form.seed.value = "x1"
    form.gguf.value, form.quants.value = True, ()
    form.check_button.click()
    kind, text = form.last_message
    assert kind == "error" and text.startswith("5 problems, marked in red in the form:")
    for phrase in ("Base model is empty", "Expert 2 noise scale: 'abc'", "Seed: 'x1'", "New model name: 'my model'",
                   "no quantisation is selected"):
        assert phrase in text
    for widget in (form.model_name, form.base_model, form.rows[1].noise, form.seed, form.quants):
        assert "lazymoe-invalid" in widget._dom_classes
    assert "Base model is empty" in form._label_for(form.base_model).value
    assert "noise scale: &#x27;abc&#x27;" in form.rows[1].error.value and form.rows[0].error.value == ""
    form.model_name.value, form.base_model.value, form.rows[1].noise.value = "ok-name", "lazymoe-demo/base", ""
    form.seed.value, form.quants.value = "", ("Q8_0",)
    assert form.check() is not None  # fixed: the marks and the lines beside the fields are gone
    assert not any("lazymoe-invalid" in w._dom_classes for w in (form.model_name, form.base_model, form.seed))
    assert form._label_for(form.base_model).value == "" and form.rows[1].error.value == ""


def test_a_config_rule_marks_the_field_it_names():
    form = MoEForm(load_preset(PRESETS / "demo-tiny.yaml"))
    form.experts_per_token.value = 9
    form.rows[2].positive.value = ""
    form.check()
    assert "lazymoe-invalid" in form.rows[2].positive._dom_classes or \
        "lazymoe-invalid" in form.experts_per_token._dom_classes
