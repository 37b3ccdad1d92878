"""A merged folder damaged after the merge, and output paths the OS cannot take: one line each, exit 2.

Found by a hostile review: ``lazymoe route`` printed tracebacks for a broken config.json, a broken recipe and a
missing tokenizer; a 300-character path or a mount point as the output folder failed late or wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import moe_config

import lazymoe
from lazymoe.io.outdir import OutputTarget
from lazymoe.errors import LazyMoEError, OutputExistsError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def merged(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "moe"
    experts = [tiny_world["chat"], tiny_world["code"]]
    lazymoe.merge(moe_config(tiny_world["base"], experts, gate_mode="random"), out, progress=False)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lazymoe", "-q", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def damaged_copy(merged: Path, tmp_path: Path, damage) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(merged, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text("{bad"), "config.json is not valid JSON"),
    (lambda f: (f / "config.json").write_text("[1]"), "config.json"),
    (lambda f: (f / "lazymoe_config.yml").write_text("garbage: [\n"), "lazymoe_config.yml is damaged"),
    (lambda f: [p.unlink() for p in f.glob("tokenizer*")], "has no usable tokenizer"),
], ids=["bad-json", "json-list", "bad-recipe", "no-tokenizer"])
def test_route_on_a_damaged_folder_is_one_line(merged, tmp_path, damage, message):
    folder = damaged_copy(merged, tmp_path, damage)
    result = cli("route", str(folder), "--text", "hello there")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def test_the_library_raises_lazymoe_errors_for_the_same_damage(merged, tmp_path):
    from lazymoe.router import routing

    folder = damaged_copy(merged, tmp_path, lambda f: (f / "config.json").write_text("{bad"))
    with pytest.raises(LazyMoEError, match="not valid JSON"):
        routing.routing_report(folder, extra_texts=["hello"])


def test_an_output_path_too_long_for_the_filesystem_is_refused_before_any_work(tmp_path):
    with pytest.raises(LazyMoEError, match="cannot be the output folder"):
        OutputTarget(tmp_path / ("y" * 300))


def test_a_mount_point_as_output_is_refused_before_any_work(tmp_path, monkeypatch):
    target = tmp_path / "disk"
    target.mkdir()
    real = Path.is_mount
    monkeypatch.setattr(Path, "is_mount", lambda self: self == target or real(self))
    with pytest.raises(OutputExistsError, match=r"is a mount point .* give a folder inside it"):
        OutputTarget(target)


def test_a_config_path_too_long_is_one_line():
    result = cli("plan", "/tmp/" + "y" * 300 + ".yaml")
    assert result.returncode == 2 and "cannot be used" in result.stderr and "Traceback" not in result.stderr


def test_quiet_merge_shows_no_bars_not_even_transformers_own(tiny_world, tmp_path):
    """-q: no progress bar at all, including transformers' "Loading weights" when a gate mode loads the base."""
    import yaml

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="classifier")
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    result = cli("merge", str(recipe), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr, result.stderr


def test_a_path_the_system_refuses_is_one_line_in_every_command():
    long = "/tmp/" + "y" * 300
    for args in (("route", long), ("card", long)):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_chat_on_a_folder_names_the_gguf_files_in_it(tmp_path):
    (tmp_path / "m-Q8_0.gguf").write_bytes(b"GGUF")
    result = cli("chat", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2 and "is a folder, not a GGUF file" in result.stderr and "m-Q8_0.gguf" in result.stderr


def test_a_merged_folder_whose_shards_were_deleted_by_hand_is_one_line_in_every_step(merged, tmp_path, capsys):
    """No record says the weights went to the Hub (merge --push --no-keep writes one): every step that reads them
    says which files are missing and to merge again, instead of "the download is incomplete" or a traceback."""
    from helpers import one_line_error

    from lazymoe.runtime.load import LoadChoice, load_merged

    folder = damaged_copy(merged, tmp_path, lambda f: [p.unlink() for p in f.glob("*.safetensors")])
    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
    told = (f"{folder} lacks its weight files ({shown}): they were deleted or never copied here. Merge again "
            "(add --overwrite to replace this folder).")
    for argv in (["route", str(folder)], ["eval", str(folder)], ["gguf", str(folder)], ["card", str(folder)],
                 ["push", str(folder), "someone/moe"], ["publish", str(folder), "--gguf"]):
        assert one_line_error(capsys, argv) == told, argv
    with pytest.raises(LazyMoEError) as caught:
        load_merged(folder, LoadChoice("cpu", "test"))
    assert str(caught.value) == told.replace("add --overwrite", "pass overwrite=True")
