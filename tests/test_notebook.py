"""The notebooks: generated from the template and the presets, Colab-ready, and runnable top to bottom offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lazymoe.config import load_config
from lazymoe.errors import ConfigError
from lazymoe.notebook.presets import load_preset, parse_preset

ROOT = Path(__file__).resolve().parent.parent


def _load_generator():
    """tools/notebooks.py, the generator (not part of the package)."""
    spec = importlib.util.spec_from_file_location("lazymoe_tools_notebooks", ROOT / "tools" / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


notebooks = _load_generator()
OWNER_REPO, colab_url, package_spec = notebooks.OWNER_REPO, notebooks.colab_url, notebooks.package_spec
DEMO = ROOT / "notebooks" / "presets" / "demo-tiny.ipynb"


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"])


def test_generated_notebooks_are_up_to_date():
    assert notebooks.stale(ROOT) == [], "a notebook is out of date with its preset or the template: run `python tools/notebooks.py`"


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the notebooks folder, to change presets and the template freely."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    return tmp_path


def test_editing_a_preset_makes_its_notebook_stale(checkout):
    preset = checkout / "notebooks" / "presets" / "demo-tiny.yaml"
    preset.write_text(preset.read_text().replace("LazyMoE-Demo-4x", "Other-Name"))
    assert notebooks.stale(checkout) == ["notebooks/presets/demo-tiny.ipynb"]
    assert notebooks.write(checkout) == ["notebooks/presets/demo-tiny.ipynb"]
    assert notebooks.stale(checkout) == []
    assert "model_name: Other-Name" in "".join(_src(c) for c in _cells(checkout / "notebooks/presets/demo-tiny.ipynb"))


def test_editing_the_template_makes_every_notebook_stale(checkout):
    template = checkout / notebooks.TEMPLATE
    nb = json.loads(template.read_text())
    plan_cell = next(c for c in nb["cells"] if c["metadata"].get("lazymoe") == "plan")
    plan_cell["source"].append("\nprint('checked')")
    template.write_text(json.dumps(nb, indent=1))
    every = [f"{notebooks.PRESETS_DIR}/{p.stem}.ipynb" for p in (checkout / notebooks.PRESETS_DIR).glob("*.yaml")
             if p.stem != notebooks.DEFAULT_PRESET]
    assert "notebooks/presets/demo-tiny.ipynb" in every and len(every) >= 3  # demo, Llama-3.1, Qwen2.5
    assert sorted(notebooks.stale(checkout)) == sorted([notebooks.TEMPLATE, *every])
    notebooks.write(checkout)
    assert "print('checked')" in _src(next(c for c in _cells(checkout / "notebooks/presets/demo-tiny.ipynb") if c["id"] == "plan"))


def test_a_notebook_saved_with_outputs_is_stale(checkout):
    path = checkout / "notebooks/presets/demo-tiny.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    nb["cells"][1]["execution_count"] = 1
    path.write_text(notebooks.dumps(nb))
    assert notebooks.stale(checkout) == ["notebooks/presets/demo-tiny.ipynb"]


def test_template_without_its_tagged_cells_is_refused(checkout):
    template = checkout / notebooks.TEMPLATE
    nb = json.loads(template.read_text())
    nb["cells"] = [c for c in nb["cells"] if c["metadata"].get("lazymoe") != "form"]
    template.write_text(json.dumps(nb))
    with pytest.raises(ConfigError, match='"lazymoe": "form"'):
        notebooks.expected(checkout)


@pytest.mark.parametrize("path", [notebooks.TEMPLATE, "notebooks/presets/demo-tiny.ipynb"])
def test_notebooks_are_colab_ready_and_stripped(path):
    import nbformat

    raw = json.loads((ROOT / path).read_text())
    ids = [c.get("id") for c in raw["cells"]]
    assert len(set(ids)) == len(ids), f"duplicate cell ids (nbformat would silently rename them): {ids}"
    nb = nbformat.read(str(ROOT / path), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["accelerator"] == "GPU"
    assert nb.metadata["colab"]["name"] == Path(path).name
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    for cell in code:
        first = cell.source.splitlines()[0]
        assert first.startswith("# @title ") and first.endswith('{ display-mode: "form" }'), first
    setup = next(c for c in code if c.metadata.get("lazymoe") == "setup")
    assert f'LAZYMOE_PACKAGE = "{package_spec()}"  # @param' in setup.source
    assert f"github.com/{OWNER_REPO}@" in package_spec()
    assert "torch==" not in setup.source and "--upgrade" not in setup.source, "never reinstall torch"
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and colab_url(path) in intro.source


def test_preset_yaml_is_embedded_verbatim_in_the_form_cell():
    for preset_file in sorted((ROOT / "notebooks" / "presets").glob("*.yaml")):
        preset = load_preset(preset_file)
        form = next(c for c in _cells(ROOT / notebooks.notebook_path(preset.name)) if c["metadata"].get("lazymoe") == "form")
        assert f'PRESET = r"""\n{preset.text.strip()}\n"""' in _src(form)


def test_beyonder_preset_is_the_seed_recipe():
    config = load_config(load_preset(ROOT / "notebooks/presets/beyonder-4x7b-v3.yaml").config)
    assert config.base_model == "mlabonne/AlphaMonarch-7B"
    assert [(e.source_model, e.positive_prompts) for e in config.experts] == [
        ("mlabonne/AlphaMonarch-7B", ["chat", "assistant", "tell me", "explain", "I want"]),
        ("beowolx/CodeNinja-1.0-OpenChat-7B", ["code", "python", "javascript", "programming", "algorithm"]),
        ("SanjiWatsuki/Kunoichi-DPO-v2-7B", ["storywriting", "write", "scene", "story", "character"]),
        ("mlabonne/NeuralDaredevil-7B", ["reason", "math", "mathematics", "solve", "count"]),
    ]
    assert (config.experts_per_token, config.gate_mode) == (2, "hidden")


def test_demo_preset_matches_what_build_demo_builds():
    from lazymoe.demo import DEMO_EXPERTS

    preset = load_preset(ROOT / "notebooks/presets/demo-tiny.yaml")
    config = load_config(preset.config)
    folder = preset.demo_dir
    assert config.base_model == f"{folder}/base"
    assert [e.source_model for e in config.experts] == [f"{folder}/{name}" for name in DEMO_EXPERTS]
    assert [(e.positive_prompts, e.negative_prompts) for e in config.experts] == list(DEMO_EXPERTS.values())
    assert (preset.notebook["upload"], preset.notebook["gguf"]) == (False, False), "the demo must run offline"
    demo_cell = next(c for c in _cells(DEMO) if c["metadata"].get("lazymoe") == "demo")
    assert f"ui.prepare_demo({folder!r})" in _src(demo_cell)


def test_readme_links_point_at_every_notebook():
    lines = notebooks.readme_links(ROOT).splitlines()
    assert len(lines) == len(list((ROOT / "notebooks/presets").glob("*.yaml")))
    assert f"(https://colab.research.google.com/github/{OWNER_REPO}/blob/main/notebooks/LazyMoE.ipynb)" in lines[0]
    assert any("notebooks/presets/demo-tiny.ipynb" in line for line in lines)


@pytest.mark.parametrize("text, phrase", [
    ("base_model: a\nnotebook: {upload: 'yes'}\n", "notebook.upload in the preset must be true or false"),
    ("base_model: a\nnotebook: {quants: Q4_K_M}\n", "notebook.quants in the preset must be a list of names"),
    ("base_model: a\nnotebook: {gguf_quants: [Q4_K_M]}\n", "Unknown key 'gguf_quants'"),
    ("base_model: a\nnotebook: [x]\n", "must be a mapping"),
])
def test_bad_preset_settings_are_named(text, phrase):
    with pytest.raises(ConfigError, match=phrase.replace("(", r"\(")):
        parse_preset(text)


def test_a_plain_mergekit_yaml_is_a_preset_with_default_settings():
    preset = parse_preset(yaml.safe_dump({"base_model": "a/b", "experts": []}))
    assert preset.config == {"base_model": "a/b", "experts": []} and preset.given == ()
    assert preset.notebook["model_name"] == "my-frankenmoe" and preset.notebook["quants"] == ["Q4_K_M", "Q5_K_M"]


def test_setup_cell_installs_lazymoe_only_when_missing_and_pins_torch(monkeypatch):
    import importlib.util
    import subprocess
    import sys
    from importlib.metadata import version

    setup = next(c for c in _cells(DEMO) if c["metadata"].get("lazymoe") == "setup")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, check: calls.append(args))
    exec(compile(_src(setup), "setup-cell", "exec"), {})  # lazymoe importable: nothing is installed
    assert calls == []

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lazymoe" else real(name, *a))
    exec(compile(_src(setup), "setup-cell", "exec"), {})
    (args,) = calls
    assert args[:4] == [sys.executable, "-m", "pip", "install"] and args[-1] == package_spec()
    assert "--upgrade" not in args and "-U" not in args
    pins = Path(args[args.index("-c") + 1]).read_text().splitlines()
    assert f"torch=={version('torch')}" in pins, "pip may add packages but must keep this runtime's torch"


# ----------------------------------------------------------------------------- executed notebooks


def _outputs(nb, role: str) -> list:
    return next(c for c in nb.cells if c.metadata.get("lazymoe") == role).outputs


def _html(outputs) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in outputs)


# The demo notebook itself runs top to bottom as part of `python -m pytest`, under nbval (pyproject.toml's testpaths
# and addopts; notebooks/conftest.py keeps its kernel offline and in a temporary folder). The browser tests run it in
# JupyterLab and Colab's front end; tests/test_ui_steps.py checks what each step shows.


@pytest.mark.slow
def test_a_failing_step_shows_a_red_message_and_stops_run_all(run_notebook, tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(str(DEMO), as_version=4)
    nb.cells = [c for c in nb.cells if c.metadata.get("lazymoe") not in ("demo",)]  # the demo models are never built
    nbformat.write(nb, str(tmp_path / "broken.ipynb"))
    with pytest.raises(CellExecutionError):
        run_notebook(tmp_path / "broken.ipynb", tmp_path)
    nb = nbformat.read(str(tmp_path / "executed-broken.ipynb"), as_version=4)

    plan = _outputs(nb, "plan")
    assert "lazymoe-error" in _html(plan) and "lazymoe-demo/base" in _html(plan)
    (error,) = [o for o in plan if o.output_type == "error"]
    assert error.ename == "StepFailed"
    assert error.traceback == ["Stopped at “Plan”: see the red message above, change what it says, and run this cell again."]
    assert next(c for c in nb.cells if c.metadata.get("lazymoe") == "merge").execution_count is None, "Run all must stop"
