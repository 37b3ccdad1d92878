"""Plan checks what the ticked later steps need before anything is downloaded (issue 13, problem 1).

The Hub checks run the real huggingface_hub client against tests/hubserver.py; every test also asserts that
nothing was created or uploaded while checking.
"""

from __future__ import annotations

import importlib.util
import time
from types import SimpleNamespace

import pytest
from hubserver import (
    ALICE_FINE_GRAINED_TOKEN,
    ALICE_ORG_ONLY_TOKEN,
    ALICE_READ_TOKEN,
    ALICE_WRITE_TOKEN,
    BOB_WRITE_TOKEN,
    UPLOAD_KINDS,
)
from test_hub import write_model_folder

from lazymoe import cli
from lazymoe.errors import HubError, NotReadyError
from lazymoe.options import repo_name_problem
from lazymoe.pipeline import preflight
from lazymoe.pipeline.preflight import Check, check_ahead, check_gguf_disk, check_llama_cpp, check_upload
from lazymoe.publish.hub import push_to_hub


def assert_nothing_written(hub) -> None:
    assert hub.requests_of("create-repo") == []
    assert [r for r in hub.requests if r.kind in UPLOAD_KINDS] == []


def only(checks: list[Check]) -> Check:
    assert len(checks) == 1, checks
    return checks[0]


# --------------------------------------------------------------------------- Upload


def test_no_token_blocks_the_upload_at_plan_time(hub):
    check = only(check_upload("tiny-moe"))
    assert check.ok is False and check.step == "Upload"
    assert "No Hugging Face token found" in check.message and "HF_TOKEN" in check.message
    assert hub.requests == []  # nothing to ask the Hub without a token


def test_write_token_and_a_free_name_pass_and_create_nothing(hub):
    check = only(check_upload("tiny-moe", token=ALICE_WRITE_TOKEN))
    assert check.ok is True
    assert check.message.startswith("alice/tiny-moe is free: it will be created")
    assert "alice" in check.message and ALICE_WRITE_TOKEN not in check.message
    assert_nothing_written(hub)


def test_read_only_token_is_refused(hub):
    check = only(check_upload("tiny-moe", token=ALICE_READ_TOKEN))
    assert check.ok is False and "read-only" in check.message and "'Write' token" in check.message
    assert_nothing_written(hub)


def test_fine_grained_token_is_judged_by_the_scopes_whoami_reports(hub, tmp_path):
    # alice's org-only token may write to lazyorg but only read her own repos
    mine = only(check_upload("tiny-moe", token=ALICE_ORG_ONLY_TOKEN))
    assert mine.ok is False
    assert "fine-grained token" in mine.message and "no 'repo.write' permission there" in mine.message
    assert "'alice'" in mine.message
    assert only(check_upload("lazyorg/tiny-moe", token=ALICE_ORG_ONLY_TOKEN)).ok is True
    assert_nothing_written(hub)
    # and the push itself agrees with the check, both ways
    folder = write_model_folder(tmp_path / "tiny-moe")
    with pytest.raises(HubError, match="no 'repo.write' permission"):
        push_to_hub(folder, "tiny-moe", token=ALICE_ORG_ONLY_TOKEN, progress=False)
    push_to_hub(folder, "lazyorg/tiny-moe", token=ALICE_ORG_ONLY_TOKEN, progress=False)
    assert "lazyorg/tiny-moe" in hub.repos and "alice/tiny-moe" not in hub.repos


def test_fine_grained_token_without_reported_scopes_is_left_to_the_hub(hub):
    # whoami says "fineGrained" but lists no scopes: nothing to judge by, so the check does not guess
    assert only(check_upload("tiny-moe", token=ALICE_FINE_GRAINED_TOKEN)).ok is True


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("my model", "no spaces"),
        ("my--model", "'--'"),
        ("a/b/c", "namespace/name"),
        ("-model", "letters, digits"),
        ("model.git", ".git"),
        ("x" * 97, "at most 96"),
    ],
)
def test_invalid_repo_names_are_refused_before_the_hub_is_asked(hub, name, why):
    check = only(check_upload(name, token=ALICE_WRITE_TOKEN))
    assert check.ok is False and "not a valid repo name" in check.message and why in check.message
    assert hub.requests == []


def test_valid_names_pass_the_name_rule():
    for name in ("Beyonder-4x7B-v3", "lazyorg/my_model.v2", "a"):
        assert repo_name_problem(name) is None


@pytest.mark.parametrize("name", ["me/" + "m" * 96, "me/" + "m" * 97, "n" * 96 + "/m", "n" * 97 + "/m", "m" * 96,
                                  "m" * 97])
def test_the_length_limit_is_the_hubs_for_a_name_and_for_a_model_reference(name):
    """The form/CLI name rule and ``ModelRef.parse`` accept exactly what huggingface_hub's own validator does."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lazymoe.errors import ModelNotFoundError
    from lazymoe.io.sources import ModelRef

    try:
        validate_repo_id(name)
        hub_ok = True
    except HFValidationError:
        hub_ok = False
    assert hub_ok is (max(len(part) for part in name.split("/")) <= 96)  # each part, not the whole id
    assert (repo_name_problem(name) is None) is hub_ok
    if "/" in name:
        try:
            ModelRef.parse(name)
            ref_ok = True
        except ModelNotFoundError:
            ref_ok = False
        assert ref_ok is hub_ok


def test_someone_elses_repo_and_foreign_namespace_are_refused(hub, tmp_path):
    push_to_hub(write_model_folder(tmp_path / "m"), "tiny-moe", token=BOB_WRITE_TOKEN, progress=False)
    before = len(hub.requests)
    check = only(check_upload("bob/tiny-moe", token=ALICE_WRITE_TOKEN))
    assert check.ok is False and "belongs to 'bob'" in check.message
    check = only(check_upload("nobody/tiny-moe", token=ALICE_WRITE_TOKEN))
    assert check.ok is False and "neither your user" in check.message
    assert {r.kind for r in hub.requests[before:]} <= {"whoami", "model-info"}


def test_a_name_taken_by_other_work_is_refused_and_an_earlier_lazymoe_upload_is_ours(hub, tmp_path):
    other = write_model_folder(tmp_path / "other")
    (other / "README.md").write_text("---\nlicense: mit\ntags: [text-generation]\n---\n# someone's model\n")
    hub.publish_folder("alice/taken", other)
    check = only(check_upload("taken", token=ALICE_WRITE_TOKEN))
    assert check.ok is False
    assert "already exists and holds files lazymoe did not upload" in check.message
    assert "Choose another model name" in check.message

    ours = write_model_folder(tmp_path / "ours")
    (ours / "README.md").write_text("---\nlicense: mit\ntags: [moe, lazymoe]\n---\n# an earlier lazymoe upload\n")
    hub.publish_folder("alice/ours", ours)
    check = only(check_upload("ours", token=ALICE_WRITE_TOKEN))
    assert check.ok is True and "exists and will be updated" in check.message

    hub.create_repo("alice/empty")  # created by an interrupted push, nothing uploaded yet: free to fill
    assert only(check_upload("empty", token=ALICE_WRITE_TOKEN)).ok is True


def test_private_upload_into_an_existing_public_repo_is_refused_at_plan_time(hub):
    hub.create_repo("alice/tiny-moe", private=False)
    check = only(check_upload("tiny-moe", token=ALICE_WRITE_TOKEN, private=True))
    assert check.ok is False and "already exists and is public" in check.message


def test_gguf_upload_checks_the_gguf_repo_too(hub, tmp_path):
    other = write_model_folder(tmp_path / "other")
    (other / "README.md").write_text("---\nlicense: mit\n---\n# not ours\n")
    hub.publish_folder("alice/tiny-moe-GGUF", other)
    checks = check_upload("tiny-moe", token=ALICE_WRITE_TOKEN, gguf=True)
    assert [c.ok for c in checks] == [True, False]
    assert checks[1].message.startswith("GGUF files: The repo 'alice/tiny-moe-GGUF' already exists")
    # a name whose -GGUF sibling would be too long
    checks = check_upload("x" * 94, token=ALICE_WRITE_TOKEN, gguf=True)
    assert [c.ok for c in checks] == [True, False] and "Shorten the model name" in checks[1].message


# --------------------------------------------------------------------------- GGUF


def test_missing_llama_cpp_blocks_outside_colab_and_is_a_timed_note_in_colab(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    blocked = check_llama_cpp(in_colab=False)[0]
    assert blocked.ok is False and "pip install llama-cpp-python==0.3.36" in blocked.message
    assert "about 3 minutes" in blocked.message
    note = check_llama_cpp(in_colab=True, has_gpu=True)[0]
    assert note.ok is None and "compiles it with CUDA" in note.message and "once per runtime" in note.message


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_installed_llama_cpp_passes_and_an_uncached_converter_is_announced(monkeypatch, tmp_path):
    monkeypatch.setenv("LAZYMOE_CACHE", str(tmp_path / "empty-cache"))
    checks = check_llama_cpp(in_colab=False)
    assert checks[0].ok is True and "is installed" in checks[0].message
    assert checks[1].ok is None and "fetches llama.cpp's converter" in checks[1].message


def test_gguf_disk_counts_the_merge_plus_every_file(monkeypatch, tmp_path):
    plan = SimpleNamespace(total_params=1_000_000_000, disk_bytes=5_000_000_000)
    # f16 (2 bytes/param) + Q8_0 (8.5 bits) = 3.0625 GB, on top of the merge's 5 GB
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 8_000_000_000)
    check = check_gguf_disk(plan, ["Q8_0"], tmp_path)
    assert check.ok is False and "= 8.1 GB; 8.0 GB free" in check.message and "untick GGUF" in check.message
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 9_000_000_000)
    assert check_gguf_disk(plan, ["Q8_0"], tmp_path).ok is True


def test_nothing_ticked_checks_nothing(hub):
    assert check_ahead(None) == []
    assert hub.requests == []


def test_every_problem_is_listed_at_once():
    checks = [Check("Upload", False, "no token"), Check("GGUF", None, "a note"), Check("GGUF", False, "no disk")]
    with pytest.raises(NotReadyError) as failure:
        preflight.raise_if_blocked(checks)
    assert str(failure.value) == "Not ready (2 problems):\n- Upload: no token\n- GGUF: no disk"


# --------------------------------------------------------------------------- the CLI


def test_cli_plan_with_push_and_no_token_fails_in_seconds_before_any_model_is_read(hub, tiny_world, tmp_path,
                                                                                     capsys, monkeypatch):
    from helpers import moe_config

    import yaml

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]])))
    start = time.monotonic()
    code = cli.main(["plan", str(recipe), "--push", "tiny-moe", "-q"])
    elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 2 and elapsed < 10
    assert "✖ Upload: No Hugging Face token found" in out
    assert err.startswith("error: ") and "above" in err
    assert hub.requests_of("create-repo") == []

    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    code = cli.main(["plan", str(recipe), "--push", "tiny-moe", "--gguf", "Q8_0", "-q",
                     "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert "✔ Upload: alice/tiny-moe is free: it will be created" in out
    assert "✔ GGUF: disk: merge" in out
    if importlib.util.find_spec("llama_cpp") is not None:
        assert code == 0
    else:  # an install without llama-cpp-python (e.g. the Python 3.12/3.13 runs of tools/pythons.sh): the one ✖
        assert code == 2 and "✖ GGUF: GGUF is ticked, but GGUF conversion, quantisation and chat needs " \
                             "llama-cpp-python, which is not installed" in out and "1 problem(s)" in err
    assert_nothing_written(hub)


# --------------------------------------------------------------------------- the notebook's Plan step


@pytest.fixture
def notebook_builder(tiny_world, tmp_path):
    pytest.importorskip("ipywidgets")
    import yaml
    from helpers import moe_config
    from test_ui_steps import Screen

    from lazymoe.notebook.ui import Builder
    from lazymoe.notebook.form import MoEForm

    config = moe_config(tiny_world["base"], [tiny_world[n] for n in ("chat", "code", "math")])
    preset = yaml.safe_dump({**config, "notebook": {"model_name": "tiny-moe", "upload": True}})
    screen = Screen()
    builder = Builder(MoEForm(preset), workdir=tmp_path, show=screen.append)
    builder.screen = screen
    return builder


def test_notebook_plan_refuses_a_ticked_upload_without_a_token_and_the_merge_checks_again(notebook_builder, hub,
                                                                                          tmp_path):
    from lazymoe.notebook.ui import StepFailed

    with pytest.raises(StepFailed, match="Upload: No Hugging Face token found"):
        notebook_builder.plan()
    shown = notebook_builder.screen.html()
    assert "lazymoe-ahead" in shown and "lazymoe-error" in shown and "No Hugging Face token found" in shown
    assert "ready to merge" not in shown
    notebook_builder.screen.clear()
    with pytest.raises(StepFailed, match="Upload: No Hugging Face token found"):
        notebook_builder.merge()  # run without a passing Plan: checks first, downloads nothing
    assert not (tmp_path / "tiny-moe").exists()

    notebook_builder.form.token_box.value = ALICE_WRITE_TOKEN
    notebook_builder.screen.clear()
    notebook_builder.plan()
    shown = notebook_builder.screen.html()
    assert "alice/tiny-moe is free: it will be created" in shown and "ready to merge" in shown
    assert ALICE_WRITE_TOKEN not in shown
    assert_nothing_written(hub)
