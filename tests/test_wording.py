"""Each front end says its own words (issue 13): a message that asks the user to change a setting names it as a
keyword argument for Python users, as a flag for CLI users and as the form field for notebook users. Messages
carry the setting (errors.Setting in an errors.Text); each front end words it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import moe_config

import lazymoe
from lazymoe import cli
from lazymoe.errors import OutputExistsError, Setting, Text, python_words, worded
from lazymoe.notebook.form import MoEForm
from lazymoe.notebook.words import CELL_PARAMETERS, FORM_FIELDS, NOTEBOOK_PHRASES, SET_BY_THE_NOTEBOOK, form_words
from lazymoe.pipeline.preflight import check_upload

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lazymoe"


def _settings_named_in_messages() -> list[Setting]:
    """Every ``Setting(...)`` the package builds, from its source (name, value and role as written there)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Setting" and node.args:
                args = [ast.literal_eval(a) for a in node.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
                found.append(Setting(*args, **kwargs))
    return found


def test_every_setting_a_message_names_has_each_front_ends_words():
    settings = _settings_named_in_messages()
    assert {s.name for s in settings} >= {"overwrite", "token", "low_disk", "download", "allow_all_same_experts",
                                          "base_repo_id", "private", "layout", "tasks", "device"}
    words = cli.cli_words()
    for setting in settings:
        assert words(setting) != python_words(setting), f"the CLI has no flag for {setting.name}"
        assert "--" in words(setting) and "=" not in words(setting)
        known = {*FORM_FIELDS, *CELL_PARAMETERS, *NOTEBOOK_PHRASES, *SET_BY_THE_NOTEBOOK}
        assert setting.name in known, f"no notebook words for {setting.name}, and the notebook does not set it itself"
        if setting.name not in SET_BY_THE_NOTEBOOK:
            assert "=" not in form_words(setting) and "--" not in form_words(setting)


def test_the_notebook_words_are_the_labels_the_form_shows():
    form = MoEForm()
    shown = {"overwrite": form.overwrite, "low_disk": form.low_disk, "allow_all_same_experts": form.allow_same,
             "token": form.token_box, "private": form.private}
    assert set(shown) == set(FORM_FIELDS)
    for name, widget in shown.items():
        assert FORM_FIELDS[name][0] == widget.description
    template = json.loads((ROOT / "notebooks" / "LazyMoE.ipynb").read_text())
    for name, (param, step) in CELL_PARAMETERS.items():
        cell = next("".join(c["source"]) for c in template["cells"] if f"# @title {step}." in "".join(c["source"]))
        assert re.search(rf"^{param} = .*# @param", cell, re.M), f"step {step} has no {param} parameter ({name})"


def test_no_message_speaks_to_two_front_ends_at_once():
    mixed = re.compile(r"\w=\s*/\s*--|--[\w-]+\s*/\s*\w+=|\(CLI: |\(--[\w-]+\)|\w= / ")
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and mixed.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:80]!r}")
    assert found == []


def test_a_text_is_the_python_wording_and_keeps_its_settings_when_joined():
    replace = Setting("overwrite", True)
    hint = Text(f"{replace.placeholder} to replace it", (replace,))
    assert hint == "pass overwrite=True to replace it" and isinstance(hint, str)
    joined = Text.join(["out/ is not empty: ", hint, "."])
    assert joined.worded(cli.cli_words("merge")) == "out/ is not empty: add --overwrite to replace it."
    error = OutputExistsError(joined)
    assert str(error) == "out/ is not empty: pass overwrite=True to replace it."
    assert worded(error, form_words) == ("out/ is not empty: tick “Replace an earlier lazymoe build with the same "
                                         "name” in the form's Advanced section to replace it.")
    assert worded(ValueError("plain"), form_words) == "plain"
    # one setting twice with different values or roles: each keeps its own words
    device, cpu = Setting("device", ..., noun=True), Setting("device", "cpu")
    text = Text(f"{device.placeholder} asks for cuda; {cpu.placeholder}.", (device, cpu))
    assert text.worded(cli.cli_words("route")) == "your --device argument asks for cuda; add --device cpu."


def test_replacing_an_earlier_build_is_worded_for_each_front_end(tiny_world, tmp_path, capsys):
    config = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    out = lazymoe.merge(config, tmp_path / "moe", progress=False)

    with pytest.raises(OutputExistsError) as python:  # Python: the keyword argument
        lazymoe.merge(config, out, progress=False)
    assert str(python.value).endswith("already exists and is not empty: pass overwrite=True to replace it.")

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    assert cli.main(["merge", str(recipe), str(out), "-q"]) == 2  # CLI: the flag
    err = capsys.readouterr().err
    assert err.endswith("already exists and is not empty: add --overwrite to replace it.\n") and "=True" not in err

    notebook = worded(python.value, form_words)  # the notebook: the form field, where it is
    assert notebook.endswith("tick “Replace an earlier lazymoe build with the same name” in the form's Advanced "
                             "section to replace it.")
    assert MoEForm().overwrite.description == "Replace an earlier lazymoe build with the same name"


def test_a_missing_token_is_worded_for_each_front_end(hub, tiny_world, tmp_path, capsys):
    (check,) = check_upload("tiny-moe")
    assert check.ok is False
    assert check.message.endswith("run `hf auth login`, or pass token=....")  # Python
    assert worded(check.message, form_words).endswith(
        "run `hf auth login`, or type it into “…or a token” in the form's Hugging Face Hub section.")

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]])))
    assert cli.main(["plan", str(recipe), "--push", "tiny-moe", "-q"]) == 2
    out = capsys.readouterr().out
    assert "run `hf auth login`, or add --token TOKEN." in out and "token=" not in out


def test_a_bad_device_is_worded_for_python_and_the_cli():
    from lazymoe.router.device import pick_device

    with pytest.raises(lazymoe.errors.ConfigError) as caught:
        pick_device("nowhere")
    assert str(caught.value) == "your device= argument 'nowhere' is not a device; use auto, cpu, cuda or cuda:N."
    assert worded(caught.value, cli.cli_words("route")).startswith("your --device argument 'nowhere' is not")
