"""Colab's own APIs through a stand-in ``google.colab`` (tests/colab_standin.py), and ``plan`` set against the
free Colab runtime and the runtime it runs on.

The Beyonder-4x7B-v3 recipe is planned from header-only models shaped like Mistral-7B (sparse files: no
weights exist), presented as Hub models whose weights are not downloaded yet, as ``describe`` reports them.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml
from colab_standin import install_colab
from test_hub import write_model_folder
from test_plan import MISTRAL_7B, header_only_model

from lazymoe import cli
from lazymoe.notebook import recipe as ui_recipe
from lazymoe.notebook import ui
from lazymoe.notebook.form import MoEForm
from lazymoe.colab import CONTENT_DIR, has_user_secrets, in_colab, read_secret
from lazymoe.errors import ConfigError, HubError
from lazymoe.publish.hub import push_to_hub, resolve_token
from lazymoe.notebook.presets import load_preset
from lazymoe.io.sources import ModelInfo, ModelRef, describe
from lazymoe.runtime import machine
from lazymoe.runtime.fit import fit
from lazymoe.runtime.machine import FREE_COLAB, Runtime, probe

merge = importlib.import_module("lazymoe.pipeline.merge")  # the module (lazymoe.merge is the function)
ROOT = Path(__file__).resolve().parent.parent
BEYONDER = ROOT / "notebooks" / "presets" / "beyonder-4x7b-v3.yaml"


@pytest.fixture(autouse=True)
def _not_colab(monkeypatch):
    """Start every test outside Colab, whatever the machine says."""
    for name in ("COLAB_RELEASE_TAG", "VERTEX_PRODUCT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)


# --------------------------------------------------------------------------- detection and secrets


def test_colab_is_detected_from_its_kernel_module_or_its_environment(monkeypatch):
    assert not in_colab() and not probe().in_colab and not has_user_secrets()
    install_colab(monkeypatch)
    assert in_colab() and probe().in_colab and has_user_secrets()
    monkeypatch.delitem(sys.modules, "google.colab")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20260801-060118_RC00")  # set in every Colab runtime
    assert in_colab() and has_user_secrets()
    monkeypatch.setenv("VERTEX_PRODUCT", "COLAB_ENTERPRISE")  # Colab Enterprise: a Colab runtime, no Secrets panel
    assert in_colab() and not has_user_secrets()


@pytest.mark.parametrize(("secrets", "no_access", "value", "note"), [
    ({"HF_TOKEN": " hf_abc\n"}, (), "hf_abc", None),  # found: surrounding whitespace from a paste is dropped
    ({}, (), None, "there is no Colab secret named 'HF_TOKEN'"),  # SecretNotFoundError
    ({"HF_TOKEN": "hf_abc"}, ("HF_TOKEN",), None, "switch on 'Notebook access' for it"),  # NotebookAccessError
    ({"HF_TOKEN": "  "}, (), None, "the Colab secret 'HF_TOKEN' is empty"),
])  # fmt: skip
def test_a_colab_secret_is_read_or_the_reason_is_named(monkeypatch, secrets, no_access, value, note):
    install_colab(monkeypatch, secrets, no_access=no_access)
    got, why = read_secret("HF_TOKEN")
    assert got == value
    assert (why is None) if note is None else (note in why)


def test_outside_colab_there_is_no_secret_to_read():
    assert read_secret("HF_TOKEN") == (None, None)  # google.colab does not import here
    assert "google.colab" not in sys.modules


def test_a_missing_secret_falls_through_to_hf_token_and_the_push_error_names_both(monkeypatch, tmp_path):
    install_colab(monkeypatch, {})
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token() == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError) as err:
        push_to_hub(write_model_folder(tmp_path / "tiny-moe"), "tiny-moe", progress=False)
    message = str(err.value)
    assert message.startswith("No Hugging Face token found (there is no Colab secret named 'HF_TOKEN')")
    assert "store it as a Colab secret named 'HF_TOKEN'" in message


# --------------------------------------------------------------------------- /content


def test_in_colab_setup_reports_the_runtime_and_the_disk_of_the_working_directory(monkeypatch, tmp_path):
    content = tmp_path / "content"  # Colab starts every notebook in /content
    content.mkdir()
    monkeypatch.chdir(content)
    install_colab(monkeypatch)
    shown = []
    runtime = ui.setup(show=shown.append)
    html = shown[0].data
    assert runtime.in_colab and runtime.disk_path == content
    assert "Google Colab" in html and f"free at {content}" in html
    if not runtime.has_gpu:
        assert "Runtime → Change runtime type → T4 GPU" in html
    builder = ui.Builder.from_preset(BEYONDER.read_text(), show=shown.append)
    assert builder.output_dir == content / "Beyonder-4x7B-v3"  # the model lands in /content, next to the notebook


def test_edits_saved_to_drive_mount_it_once_and_stay_under_mydrive(monkeypatch, tmp_path):
    assert ui_recipe.DRIVE_MOUNT == Path(CONTENT_DIR, "drive") == Path("/content/drive")  # where Colab mounts it
    mount = tmp_path / "content" / "drive"
    monkeypatch.setattr(ui_recipe, "DRIVE_MOUNT", mount)
    monkeypatch.setattr(ui_recipe, "DRIVE_FOLDER", mount / "MyDrive" / "lazymoe")
    with pytest.raises(ConfigError, match="Google Drive works in Colab only"):
        ui_recipe.recipe_folder("drive", in_colab=in_colab())
    colab = install_colab(monkeypatch)
    assert ui_recipe.recipe_folder("drive", in_colab=in_colab()) == mount / "MyDrive" / "lazymoe"
    assert ui_recipe.recipe_folder("drive", in_colab=in_colab()) == mount / "MyDrive" / "lazymoe"
    assert colab.drive.mounted == [str(mount)]  # mounted once: the second call finds MyDrive there


# --------------------------------------------------------------------------- plan against free Colab


@pytest.fixture
def beyonder_on_the_hub(monkeypatch, tmp_path, tiny_world):
    """``describe`` answers for the Beyonder recipe's four Hub models: Mistral-7B headers, weights not downloaded."""
    preset = load_preset(BEYONDER)
    infos = {}
    for ref in {preset.config["base_model"], *(e["source_model"] for e in preset.config["experts"])}:
        local = describe(ModelRef.parse(str(header_only_model(tmp_path / ref.replace("/", "--"), MISTRAL_7B,
                                                              tokenizer=tiny_world["tokenizer"]))))
        later = tmp_path / "hub-cache" / ref / "model.safetensors"  # where fetch_weights will put it
        tensors = {n: dataclasses.replace(t, file=later, offset=-1) for n, t in local.tensors.items()}
        infos[ref] = ModelInfo(ModelRef.parse(ref), local.config, tensors, local.folder, local.weight_bytes)
    monkeypatch.setattr(merge, "describe", lambda ref, tokenizer=True: infos[str(ref)])
    path = tmp_path / "beyonder.yaml"
    path.write_text(yaml.safe_dump(preset.config))
    return path


def test_beyonder_fits_free_colab_since_only_the_bytes_it_reads_are_fetched(beyonder_on_the_hub):
    plan = merge.make_plan(beyonder_on_the_hub, progress=False)
    assert round(plan.total_params / 1e9, 2) == 24.15 and plan.output_bytes == 2 * plan.total_params
    # the base whole (it is expert 0 too), and the three other experts' MLPs, in bf16: not 4 x 7.24B parameters
    mlp = 32 * 3 * 4096 * 14336 * 2
    assert plan.download_bytes == 2 * 7_241_732_096 + 3 * mlp == 48_306_331_648
    line = str(fit(plan, "Free Colab", FREE_COLAB))
    assert line.startswith("Free Colab: fits (Disk: merge 96.7 GB of 100.0 GB; ")

    low = merge.make_plan(beyonder_on_the_hub, low_disk=True, progress=False)
    line = str(fit(low, "Free Colab", FREE_COLAB))
    # output + what the router pass reads of the base + one shard of ranges fetched ahead
    assert line.startswith("Free Colab: fits (Disk: merge 64.2 GB of 100.0 GB; RAM: merge (peak) ")
    assert "GPU memory: router pass 698.4 MB of 16.1 GB" in line


def test_an_8x7b_fits_free_colab_only_when_each_shard_is_uploaded_and_deleted(monkeypatch, tmp_path, tiny_world):
    """The README's 8x7B figures: eight distinct Mistral-7B models on the Hub (headers only), the first as base."""
    preset = load_preset(BEYONDER).config
    refs = [f"org/mistral-7b-ft{i}" for i in range(8)]
    infos = {}
    for ref in refs:
        local = describe(ModelRef.parse(str(header_only_model(tmp_path / ref.replace("/", "--"), MISTRAL_7B,
                                                              tokenizer=tiny_world["tokenizer"]))))
        snapshot = tmp_path / "hub-cache" / ref / ("0" * 40)
        tensors = {n: dataclasses.replace(t, file=snapshot / "model.safetensors") for n, t in local.tensors.items()}
        infos[ref] = ModelInfo(ModelRef.parse(ref), local.config, tensors, local.folder, local.weight_bytes)
    monkeypatch.setattr(merge, "describe", lambda ref, tokenizer=True: infos[str(ref)])
    experts = [{**preset["experts"][i % 4], "source_model": ref} for i, ref in enumerate(refs)]
    config = {**preset, "base_model": refs[0], "experts": experts}
    plan = merge.make_plan(config, progress=False)
    low = merge.make_plan(config, low_disk=True, progress=False)
    disk = FREE_COLAB.disk_free
    assert round(plan.output_bytes / 1e9, 1) == 93.4 and plan.download_bytes == plan.output_bytes - 32 * 8 * 4096 * 2
    assert plan.disk_bytes > disk and low.disk_bytes > disk  # 186.9 GB and 109.3 GB: merging to disk cannot fit
    streamed = plan.streamed_disk_bytes()
    assert round(streamed / 1e9, 1) == 21.8 and streamed < disk / 4
    assert round(plan.peak_ram_bytes / 1e9, 1) == 2.1 < FREE_COLAB.ram_available / 6e9  # router pass + writer at once


def test_cli_plan_gives_the_verdict_for_free_colab_and_for_this_runtime(beyonder_on_the_hub, monkeypatch, capsys):
    big = Runtime(in_colab=True, python="3.12", disk_path=Path("/content"), disk_free=235 * 1000**3,
                  ram_available=80 * 1000**3, ram_total=85 * 1000**3, gpu_name="NVIDIA A100-SXM4-40GB",
                  vram_free=40 * 1000**3, vram_total=40 * 1000**3, bf16=True)
    monkeypatch.setattr(machine, "probe", lambda path=".": big)
    assert cli.main(["-q", "plan", str(beyonder_on_the_hub)]) == 0
    out = capsys.readouterr().out
    fits = out[out.index("\nFits?\n"):].splitlines()[2:]
    assert fits[0].startswith("  Free Colab (T4, 12.7 GiB RAM, ~100 GB disk): fits (Disk: merge 96.7 GB of 100.0 GB")
    assert fits[1].startswith("  This runtime (Colab): fits (Disk: merge 96.7 GB of 235.0 GB;")



def _verdicts_shown(markup: str) -> list[str]:
    """The lines under the Plan step's "Fits?" heading, as the user reads them (marks and tags dropped)."""
    section = markup.split('class="lazymoe-fits"', 1)[1].split("</div></div>", 1)[0]
    text = html.unescape(re.sub(r"<[^>]+>", "\n", section))
    return [line.strip()[2:] for line in text.splitlines() if line.strip()[:1] in ("✔", "⚠")]


def test_notebook_plan_shows_the_free_colab_verdict_beside_this_runtimes(beyonder_on_the_hub, monkeypatch, tmp_path):
    """The Plan step of the Beyonder notebook: the same two verdicts as ``lazymoe plan``; where the disk is short,
    the low-disk hint names the form's switch instead of the CLI flag."""
    def runtime(disk_gb: int) -> Runtime:
        return Runtime(in_colab=True, python="3.12", disk_path=tmp_path, disk_free=disk_gb * 1000**3,
                       ram_available=80 * 1000**3, ram_total=85 * 1000**3, gpu_name="NVIDIA A100-SXM4-40GB",
                       vram_free=40 * 1000**3, vram_total=40 * 1000**3, bf16=True)

    here = runtime(235)
    monkeypatch.setattr(ui, "probe", lambda path=".": here)
    shown = []
    builder = ui.Builder(MoEForm(BEYONDER.read_text()), workdir=tmp_path, show=shown.append)
    builder.form.upload.value = False  # no token here; the upload's own checks are tested elsewhere
    assert builder.form.low_disk.value is True  # as the preset ships it
    builder.plan()
    free, mine = _verdicts_shown(shown[-1].data)
    assert free.startswith("Free Colab (T4, 12.7 GiB RAM, ~100 GB disk): fits (Disk: merge 64.2 GB of 100.0 GB;")
    assert "GPU memory: router pass 698.4 MB of 16.1 GB" in free
    assert mine.startswith("This runtime (Colab): fits (Disk: merge 64.2 GB of 235.0 GB;")

    builder.form.low_disk.value = False  # every fetched byte kept until the end
    builder.plan()
    free, mine = _verdicts_shown(shown[-1].data)
    assert free.startswith("Free Colab (T4, 12.7 GiB RAM, ~100 GB disk): fits (Disk: merge 96.7 GB of 100.0 GB;")
    assert mine.startswith("This runtime (Colab): fits (Disk: merge 96.7 GB of 235.0 GB;")

    here = runtime(80)  # a runtime with less disk than free Colab: the plan is blocked, both verdicts still shown
    with pytest.raises(ui.StepFailed):
        builder.plan()
    free, mine = _verdicts_shown(shown[-1].data)
    assert free.startswith("Free Colab (T4, 12.7 GiB RAM, ~100 GB disk): fits (Disk: merge 96.7 GB of 100.0 GB;")
    assert mine == ("This runtime (Colab): does NOT fit (Disk: merge needs 96.7 GB, has 80.0 GB). "
                    "With Low-disk mode (Advanced) the disk needed is 64.2 GB; uploading each shard while merging "
                    "and deleting it (tick Upload), 21.7 GB")
