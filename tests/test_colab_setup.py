"""The notebook's first cell, run as Colab runs it, installing a wheel built from this checkout.

The environment is the Colab stand-in ``tools/colab_env.sh`` builds (set LAZYMOE_COLAB_PYTHON to its
interpreter; ``.ci/run`` does): torch 2.13.0+cpu, ipywidgets 7.7.1 and the libraries Colab preinstalls,
but no lazymoe. torchvision and torchaudio are installed beside torch for this test only (PyPI's builds
cannot load beside a CPU torch, and transformers would import them in the browser test's kernel). The torch there carries a local build label
(``+cpu``) that no package index offers, so any replacement would show. Only the ``LAZYMOE_PACKAGE`` line
of the cell is changed (a ``file://`` wheel instead of the GitHub URL); the rest runs exactly as committed,
with pip's network and the machine's pip configuration switched off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "LazyMoE.ipynb"
COLAB_PYTHON = os.environ.get("LAZYMOE_COLAB_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not COLAB_PYTHON, reason="set LAZYMOE_COLAB_PYTHON to the Python tools/colab_env.sh builds")]

_SNAPSHOT = """
import hashlib, json
from importlib.metadata import PackageNotFoundError, distribution
out = {}
for name in ("torch", "torchvision", "torchaudio", "lazymoe"):
    try:
        d = distribution(name)
    except PackageNotFoundError:
        continue
    record = d._path / "RECORD"
    out[name] = [d.version, str(d._path), record.stat().st_mtime_ns, hashlib.sha256(record.read_bytes()).hexdigest()]
print(json.dumps(out))
"""


def _colab_env() -> dict[str, str]:
    """The test's environment without anything that points Python or pip elsewhere (this checkout, a config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    return env


def _installed() -> dict[str, list]:
    """Version, dist-info folder, and the RECORD file's mtime and hash of each package that matters here."""
    run = subprocess.run([COLAB_PYTHON, "-c", _SNAPSHOT], capture_output=True, text=True, check=True, cwd="/",
                         env=_colab_env())
    return json.loads(run.stdout)


def _setup_cell() -> str:
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["metadata"].get("lazymoe") == "setup"]
    assert len(cells) == 1
    return "".join(cells[0]["source"])


@pytest.fixture
def wheel(tmp_path) -> Path:
    """lazymoe built from this checkout's files (copied, so the checkout gets no build/ or egg-info)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("lazymoe", "templates"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, cwd=tmp_path)
    (found,) = dist.glob("lazymoe-*.whl")
    return found


@pytest.fixture
def colab_image():
    """The stand-in image with torchvision and torchaudio beside torch, and no lazymoe; restored afterwards."""
    pip = [COLAB_PYTHON, "-m", "pip"]
    uninstall = [*pip, "uninstall", "-q", "-y", "lazymoe", "torchvision", "torchaudio"]
    subprocess.run(uninstall, capture_output=True, env=_colab_env())
    wheels = sorted((Path(COLAB_PYTHON).parent.parent / "extra-wheels").glob("torch*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["torchaudio", "torchvision"], "run tools/colab_env.sh"
    subprocess.run([*pip, "install", "-q", "--no-deps", *map(str, wheels)], capture_output=True, check=True,
                   env=_colab_env())
    assert "lazymoe" not in _installed()
    yield
    subprocess.run(uninstall, capture_output=True, check=True, env=_colab_env())


def test_the_setup_cell_installs_lazymoe_beside_colabs_torch_and_skips_when_run_again(colab_image, wheel, tmp_path):
    cell, n = re.subn(r'^LAZYMOE_PACKAGE = "[^"\n]*"', f'LAZYMOE_PACKAGE = "lazymoe[notebook] @ {wheel.as_uri()}"',
                      _setup_cell(), flags=re.M)
    assert n == 1
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    env = {**_colab_env(), "COLAB_RELEASE_TAG": "release-colab-stand-in"}
    before = _installed()
    assert {"torch", "torchvision", "torchaudio"} <= before.keys()
    assert before["torch"][0].endswith("+cpu")

    first = subprocess.run([COLAB_PYTHON, "-c", cell], capture_output=True, text=True, cwd=content, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    keep = ", ".join(f"{name}=={before[name][0]}" for name in ("torch", "torchvision", "torchaudio"))
    assert f"Installing lazymoe[notebook] @ {wheel.as_uri()} (keeping {keep})..." in first.stdout
    after = _installed()
    for name in ("torch", "torchvision", "torchaudio"):
        assert after[name] == before[name], f"{name} was touched by the setup cell"
    assert after["lazymoe"][0] == "0.1.0"

    where = subprocess.run([COLAB_PYTHON, "-c", "import lazymoe, lazymoe.ui, lazymoe.card; print(lazymoe.__file__)"],
                           capture_output=True, text=True, cwd=content, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(Path(after["lazymoe"][1]).parent), "lazymoe must come from the installed wheel"

    again = subprocess.run([COLAB_PYTHON, "-c", cell], capture_output=True, text=True, cwd=content, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Installing" not in again.stdout
    assert _installed() == after  # nothing reinstalled, lazymoe included
