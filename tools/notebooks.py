"""The notebook generator: one Colab notebook per preset (``lazymoe.notebook.presets``), from one template.

``notebooks/LazyMoE.ipynb`` is the template: its cells are the notebook every preset gets. The generator
copies it once per preset in ``notebooks/presets/``, embeds the preset's YAML in the form cell, writes the
intro and (for presets built from local demo models) a cell that builds them, strips outputs and sets the
Colab metadata. The template itself is regenerated from the default preset, so it never drifts either.

    python tools/notebooks.py            # regenerate every notebook
    python tools/notebooks.py --check    # exit 1 if any notebook is out of date (what the tests run)
    python tools/notebooks.py --links    # the README's Open-in-Colab list
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the lazymoe of this checkout, not an installed copy

from lazymoe.errors import ConfigError, error_line  # noqa: E402
from lazymoe.notebook.presets import Preset, load_preset  # noqa: E402

#: the GitHub repository the notebooks install from and the Colab links point at: change it here only
OWNER_REPO = "lazymoe-dev/lazymoe"
BRANCH = "main"

DEFAULT_PRESET = "beyonder-4x7b-v3"
TEMPLATE = "notebooks/LazyMoE.ipynb"
PRESETS_DIR = "notebooks/presets"

_TAG = "lazymoe"  # cell metadata: {"lazymoe": "intro" | "setup" | "demo" | "form" | ...}
_PRESET_BLOCK = re.compile(r'(PRESET = r""")\n.*?\n(""")', re.S)
_PACKAGE_LINE = re.compile(r'^(LAZYMOE_PACKAGE = )"[^"\n]*"', re.M)


def package_spec() -> str:
    """What the setup cell pip-installs when lazymoe is not importable yet."""
    return f"lazymoe[notebook] @ git+https://github.com/{OWNER_REPO}@{BRANCH}"


def colab_url(path: str) -> str:
    return f"https://colab.research.google.com/github/{OWNER_REPO}/blob/{BRANCH}/{path}"


# ----------------------------------------------------------------------------- rendering


def _lines(text: str) -> list[str]:
    """Jupyter's on-disk form of a cell source: lines with their newlines, the last without."""
    return text.splitlines(keepends=True)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _role(cell: dict) -> str | None:
    return cell.get("metadata", {}).get(_TAG)


def intro_markdown(preset: Preset, path: str) -> str:
    description = preset.notebook["description"].strip()
    return f"""# {preset.title}

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(path)})

{description}

Build a Mixture of Experts ("frankenMoE") from dense Llama, Mistral, Qwen2/2.5 or Qwen3 models with
[lazymoe](https://github.com/{OWNER_REPO}): the base model gives attention, embeddings and norms, each expert
gives its MLPs, and a router learned from your prompts picks the experts for every token. The output is a
Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint, chosen from the experts' family (the Plan step says which).

1. **Set up** installs lazymoe (Colab's torch is never replaced) and shows this runtime's GPU, RAM and disk.
2. **Your MoE** is a form filled in from the preset: edit it, or paste a mergekit-moe YAML into it.
3. **Plan** checks every model from its headers and compares disk, RAM and GPU memory with this runtime.
4. **Merge**, 5. **Routing picture**, 6. **Try it**, 6b. **Skills kept** (did the MoE keep each expert's gain over
the base?), 6c. **Your questions, side by side**, 6d. **Benchmarks** (lm-evaluation-harness, optional),
7. **Upload**, 8. **GGUF**, 9. **Chat**: each step reads the
form as it is now.

*Runtime → Run all* works on the unedited preset. Your edits survive re-running the form cell (the form's
**Reset** button goes back to the preset). Problems appear as a short red message saying what to change.
"""


def demo_cell_source(demo_dir: str) -> str:
    return (
        "# @title 1b. Build the tiny demo models { display-mode: \"form\" }\n"
        "# @markdown A tokenizer, a dense base and four perturbed experts, built here in seconds (no download).\n"
        f"demo_dir = ui.prepare_demo({demo_dir!r})"
    )


def render(template: dict, preset: Preset, path: str) -> dict:
    """The notebook for ``preset`` (saved at repository path ``path``), built from the template."""
    if '"""' in preset.text:
        raise ConfigError(f"Preset {preset.name}: the YAML must not contain triple double quotes (\"\"\").")
    nb = copy.deepcopy(template)
    cells = []
    for cell in nb["cells"]:
        role = _role(cell)
        if role == "demo":
            continue  # re-inserted below when this preset needs it
        source = _source(cell)
        if role == "intro":
            source = intro_markdown(preset, path)
        elif role == "setup":
            source, n = _PACKAGE_LINE.subn(lambda m: f'{m.group(1)}"{package_spec()}"', source)
            if n != 1:
                raise ConfigError(f"{TEMPLATE}: the setup cell must contain one LAZYMOE_PACKAGE = \"...\" line.")
        elif role == "form":
            source, n = _PRESET_BLOCK.subn(lambda m: f"{m.group(1)}\n{preset.text.strip()}\n{m.group(2)}", source)
            if n != 1:
                raise ConfigError(f'{TEMPLATE}: the form cell must contain one PRESET = r"""...""" block.')
        cell = {key: value for key, value in cell.items() if key not in ("outputs", "execution_count", "source")}
        cell["source"] = _lines(source)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
        if role == "setup" and preset.demo_dir:
            source = _lines(demo_cell_source(preset.demo_dir))
            cells.append({"cell_type": "code", "execution_count": None, "id": "demo-models",
                          "metadata": {_TAG: "demo"}, "outputs": [], "source": source})
    roles = [_role(c) for c in cells]
    for needed in ("intro", "setup", "form"):
        if needed not in roles:
            raise ConfigError(f'{TEMPLATE} has no cell tagged "{_TAG}": "{needed}" in its metadata.')
    nb["cells"] = cells
    nb["metadata"] = {
        "accelerator": "GPU",
        "colab": {"name": Path(path).name, "provenance": []},
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb["nbformat"], nb["nbformat_minor"] = 4, 5
    return nb


def dumps(nb: dict) -> str:
    """The exact bytes on disk (Jupyter's own formatting: sorted keys, one-space indent)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def repo_root() -> Path:
    if not (ROOT / TEMPLATE).is_file():
        raise ConfigError(f"{TEMPLATE} not found under {ROOT}: run the generator from a lazymoe checkout.")
    return ROOT


def notebook_path(preset_name: str) -> str:
    return TEMPLATE if preset_name == DEFAULT_PRESET else f"{PRESETS_DIR}/{preset_name}.ipynb"


def expected(root: Path | None = None) -> dict[str, str]:
    """Repository path -> the text every generated notebook must have."""
    root = root or repo_root()
    template = json.loads((root / TEMPLATE).read_text(encoding="utf-8"))
    presets = sorted((root / PRESETS_DIR).glob("*.yaml"))
    if DEFAULT_PRESET not in {p.stem for p in presets}:
        raise ConfigError(f"The default preset {PRESETS_DIR}/{DEFAULT_PRESET}.yaml is missing.")
    out = {}
    for p in presets:
        preset = load_preset(p)
        out[notebook_path(preset.name)] = dumps(render(template, preset, notebook_path(preset.name)))
    return out


def stale(root: Path | None = None) -> list[str]:
    """Notebooks whose file differs from what the generator would write."""
    root = root or repo_root()
    return [path for path, text in expected(root).items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]


def write(root: Path | None = None) -> list[str]:
    root = root or repo_root()
    changed = []
    for path, text in expected(root).items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def readme_links(root: Path | None = None) -> str:
    """Markdown list of Open-in-Colab links, one per notebook, for the README."""
    root = root or repo_root()
    badge = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    lines = []
    presets = sorted((root / PRESETS_DIR).glob("*.yaml"), key=lambda p: (p.stem != DEFAULT_PRESET, p.stem))
    for p in presets:
        preset = load_preset(p)
        path = notebook_path(preset.name)
        summary = (preset.notebook["description"].strip().splitlines() or [""])[0]
        lines.append(f"- {badge}({colab_url(path)}) **{preset.title}** (`{path}`): {summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/notebooks.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a notebook is out of date; write nothing")
    parser.add_argument("--links", action="store_true", help="print the README's Open-in-Colab list")
    args = parser.parse_args(argv)
    try:
        if args.check:
            old = stale()
            for path in old:
                print(f"out of date: {path}")
            if old:
                print("run: python tools/notebooks.py")
            return 1 if old else 0
        if not args.links:
            for path in write():
                print(f"wrote {path}")
        print(readme_links())
    except ConfigError as err:
        print(error_line(str(err)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
