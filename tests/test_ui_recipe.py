"""Form edits are durable (issue 13, problem 2): saved on every change, restored when the cell runs again."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")

from lazymoe.errors import ConfigError  # noqa: E402
from lazymoe.notebook.presets import parse_preset  # noqa: E402
from lazymoe.notebook.ui import Builder  # noqa: E402
from lazymoe.notebook.recipe import RecipeFile, recipe_folder, restore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESET = (ROOT / "notebooks" / "presets" / "demo-tiny.yaml").read_text()
SAVED = "LazyMoE-Demo-4x.lazymoe.yaml"


@pytest.fixture(autouse=True)
def _fresh_builders():
    Builder._instances.clear()
    yield
    Builder._instances.clear()


def new_kernel() -> None:
    """What a kernel restart does to the form: every Python object is gone, files stay."""
    Builder._instances.clear()


def open_form(folder: Path, preset: str = PRESET) -> Builder:
    return Builder.from_preset(preset, save_to=folder, show=lambda _: None)


def test_every_edit_is_saved_as_a_full_recipe_and_restored_after_a_restart(tmp_path):
    form = open_form(tmp_path).form
    saved = tmp_path / SAVED
    assert saved.is_file() and "Every edit is saved to" in form.saved_note.value and str(saved) in form.saved_note.value
    form.model_name.value = "my-edited-moe"
    assert "model_name: my-edited-moe" in saved.read_text()
    form.rows[1].positive.value = "functions\nclasses"
    form.gguf.value, form.quants.value = True, ("Q8_0",)
    form.remove_expert(form.rows[3])
    form.token_box.value = "hf_SecretTokenNeverSaved123"
    text = saved.read_text()
    assert "hf_SecretTokenNeverSaved123" not in text and "SecretToken" not in "".join(p.read_text() for p in
                                                                                       tmp_path.glob(".*"))
    recipe = parse_preset(text)  # the file is a complete preset: config plus the notebook: block
    assert recipe.notebook["model_name"] == "my-edited-moe" and recipe.notebook["gguf"] is True
    assert recipe.notebook["quants"] == ["Q8_0"] and recipe.notebook["title"].startswith("LazyMoE demo")
    assert [e["positive_prompts"] for e in recipe.config["experts"]][1] == ["functions", "classes"]
    assert len(recipe.config["experts"]) == 3

    new_kernel()
    again = open_form(tmp_path).form
    assert again.model_name.value == "my-edited-moe" and again.gguf.value and again.quants.value == ("Q8_0",)
    assert len(again.rows) == 3 and again.rows[1].positive.value == "functions\nclasses"
    assert again.token is None  # never restored: it was never saved
    kind, message = again.last_message
    assert kind == "info" and message.startswith(f"Restored your edits from {saved} (saved ")
    assert again.to_config() == form.to_config() and again.settings() == form.settings()


def test_editing_the_preset_text_replaces_only_the_fields_changed_there(tmp_path):
    form = open_form(tmp_path).form
    form.model_name.value = "mine"  # edited in the form only: kept
    form.gate_mode.value = "hidden"  # edited in the form AND below in the cell: the cell's later edit wins
    edited = re.sub(r"(?m)^gate_mode: .*$", "gate_mode: centroid", PRESET).replace(
        "experts_per_token: 2", "experts_per_token: 1")
    assert edited.count("gate_mode: centroid") == 1 and "experts_per_token: 1" in edited
    new_kernel()
    again = open_form(tmp_path, edited).form
    assert again.model_name.value == "mine"
    assert again.gate_mode.value == "centroid" and again.experts_per_token.value == 1
    message = again.last_message[1]
    assert "these come from it: gate_mode, experts_per_token; your other edits are kept" in message
    assert "replaced your form edits of gate_mode" in message
    backup = tmp_path / "LazyMoE-Demo-4x.lazymoe.before-preset-edit.yaml"
    assert backup.is_file() and "gate_mode: hidden" in backup.read_text()  # nothing the user made is lost
    # the same kernel, the cell re-run with the edited PRESET again: the form as it is now
    assert open_form(tmp_path, edited).form is again


def test_renaming_the_model_in_the_preset_text_still_finds_the_edits(tmp_path):
    form = open_form(tmp_path).form
    form.rows[0].source.value = "lazymoe-demo/code"
    renamed = PRESET.replace("model_name: LazyMoE-Demo-4x", "model_name: Renamed-4x")
    again = open_form(tmp_path, renamed).form
    assert again.rows[0].source.value == "lazymoe-demo/code" and again.model_name.value == "Renamed-4x"


def test_reset_keeps_a_copy_and_clears_the_yaml_box(tmp_path):
    form = open_form(tmp_path).form
    form.model_name.value = "before-reset"
    form._show_yaml()
    assert "model_name: before-reset" in form.yaml_box.value and "notebook:" in form.yaml_box.value
    form.reset_button.click()
    assert form.model_name.value == "LazyMoE-Demo-4x" and form.yaml_box.value == ""
    copy = tmp_path / "LazyMoE-Demo-4x.lazymoe.before-reset.yaml"
    assert "model_name: before-reset" in copy.read_text()
    assert form.last_message == ("info", f"Back to the preset. Your edits before the reset are kept in {copy}.")


def test_an_unreadable_saved_file_is_kept_aside_and_said(tmp_path):
    (tmp_path / SAVED).write_text("base_model: [unclosed\n")
    form = open_form(tmp_path).form
    kind, message = form.last_message
    assert kind == "error" and "could not be read" in message and "the form shows the preset" in message
    assert (tmp_path / "LazyMoE-Demo-4x.lazymoe.unreadable.yaml").read_text() == "base_model: [unclosed\n"
    assert form.model_name.value == "LazyMoE-Demo-4x"


def test_half_typed_values_never_stop_the_saving(tmp_path):
    form = open_form(tmp_path).form
    form.seed.value = "12a"
    form.rows[0].noise.value = "0.0"
    form.rows[0].noise.value = "0.0x"
    form.model_name.value = "still-saved"
    assert "model_name: still-saved" in (tmp_path / SAVED).read_text()


def test_download_and_copy_give_the_full_recipe(tmp_path):
    form = open_form(tmp_path).form
    form.model_name.value = "downloaded"
    links = form.yaml_links.value
    href = re.search(r'href="data:text/yaml;base64,([^"]+)"', links).group(1)
    assert base64.b64decode(href).decode() == form.recipe_yaml()
    assert 'download="downloaded.lazymoe.yaml"' in links
    assert re.search(r'data-yaml="([^"]+)"', links).group(1) == href and "Copy YAML" in links


def test_restore_rule_field_by_field():
    base = "base_model: a\ngate_mode: hidden\nexperts: [1]\nnotebook: {model_name: x}\n"
    saved = "base_model: mine\ngate_mode: hidden\nexperts: [1, 2]\nnotebook: {model_name: x, gguf: true}\n"
    preset = "base_model: a\ngate_mode: random\nexperts: [1]\nnotebook: {model_name: y}\n"
    got = restore(saved, base, preset)
    assert got.recipe == {"base_model": "mine", "gate_mode": "random", "experts": [1, 2],
                          "notebook": {"model_name": "y", "gguf": True}}
    assert got.from_preset == ("gate_mode", "notebook.model_name") and got.replaced_edits == ()
    assert restore(saved, preset, preset).recipe["base_model"] == "mine"  # PRESET unchanged: all edits back


def test_files_are_written_whole(tmp_path):
    file = RecipeFile(tmp_path / "x.lazymoe.yaml")
    file.save("a: 1\n", "p: 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.lazymoe.preset.yaml", "x.lazymoe.yaml"]


def test_google_drive_is_colab_only(tmp_path):
    with pytest.raises(ConfigError, match="Google Drive works in Colab only"):
        recipe_folder("drive", in_colab=False)
    assert recipe_folder("here") == Path.cwd() and recipe_folder(tmp_path) == tmp_path
