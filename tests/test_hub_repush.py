"""Pushing again to a repo that already holds a model, and what an interrupted push leaves there, with the real
huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import moe_config
from hubserver import ALICE_WRITE_TOKEN

import lazymoe
from lazymoe.errors import HubError
from lazymoe.publish.hub import StreamingPush, push_to_hub

#: what the user added to the repo by hand between two pushes: none of it is lazymoe's to delete
USER_FILES = {
    "notes.txt": b"my notes\n",
    "adapter_model.safetensors": b"not ours",
    "extra/model-00001-of-00002.safetensors": b"a copy in a subfolder",
    "model-1-of-2.safetensors": b"another tool's naming",
    "tiny-moe.Q4_K_M.gguf": b"GGUF" + bytes(64),
}
#: layouts of the same merge: max_shard_bytes (one model.safetensors at 1GB)
SINGLE, SHARDS, MORE_SHARDS = "1GB", "150KB", "100KB"


def config(tiny_world) -> dict:
    return moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="hidden", seed=1)


def visible(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def add_user_files(hub, repo_id: str, tmp_path: Path) -> None:
    folder = tmp_path / "by-hand"
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    hub.publish_folder(repo_id, folder, message="the user's own files")


def weights(names) -> set[str]:
    return {n for n in names if n.endswith(".safetensors") or n.endswith(".index.json")}


def assert_loads_as(repo_id: str, local: Path, tmp_path: Path) -> None:
    """The repo, downloaded, loads in transformers and gives the local model's logits."""
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    downloaded = snapshot_download(repo_id, local_dir=tmp_path / f"download-{repo_id.replace('/', '--')}")
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(downloaded).eval()(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize(("first", "second"), [
    (SHARDS, SINGLE),  # shards and their index, then one model.safetensors: the index must go too
    (SINGLE, SHARDS),  # one file, then shards: model.safetensors must go
    (SHARDS, MORE_SHARDS),  # model-0000i-of-00004 names, then -of-00006 names
])
def test_a_push_with_another_shard_layout_leaves_only_the_new_weights(hub, tiny_world, tmp_path, first, second):
    cfg = config(tiny_world)
    a = lazymoe.merge(cfg, tmp_path / "a" / "tiny-moe", max_shard_bytes=first, progress=False)
    b = lazymoe.merge(cfg, tmp_path / "b" / "tiny-moe", max_shard_bytes=second, progress=False)
    assert weights(visible(a)) != weights(visible(b))
    push_to_hub(a, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    add_user_files(hub, "alice/tiny-moe", tmp_path)
    before = dict(hub.files("alice/tiny-moe"))
    commits = len(hub.requests_of("commit", status=200))

    pushed = push_to_hub(b, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)

    assert len(hub.requests_of("commit", status=200)) == commits + 1, "one commit: never the old and the new model"
    remote = hub.files("alice/tiny-moe")
    assert set(remote) == visible(b) | set(USER_FILES) | {".gitattributes"}
    assert all(remote[n].data == USER_FILES[n] for n in USER_FILES)
    assert hub.repos["alice/tiny-moe"].resolve(pushed.commit).files == remote
    assert hub.files("alice/tiny-moe", revision=hub.repos["alice/tiny-moe"].resolve(pushed.commit).parent) == before
    assert_loads_as("alice/tiny-moe", b, tmp_path)


def test_a_gguf_push_deletes_no_weight_file(hub, tiny_world, tmp_path):
    """A folder of GGUF files names no model weights: pushed to a repo that holds some, it replaces none."""
    a = lazymoe.merge(config(tiny_world), tmp_path / "tiny-moe", max_shard_bytes=SHARDS, progress=False)
    hub.publish_folder("alice/tiny-moe-GGUF", a)
    before = set(hub.files("alice/tiny-moe-GGUF"))
    assert weights(before)
    gguf = tmp_path / "tiny-moe-GGUF"
    gguf.mkdir()
    (gguf / "tiny-moe.Q8_0.gguf").write_bytes(b"GGUF" + bytes(128))
    push_to_hub(gguf, "tiny-moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False)
    assert set(hub.files("alice/tiny-moe-GGUF")) == before | {"tiny-moe.Q8_0.gguf"}


def streamed(cfg, tmp_path: Path, name: str, repo: str, shard_bytes: str, **options):
    from lazymoe.pipeline.merge import merge_and_push

    return merge_and_push(cfg, tmp_path / name, repo, token=ALICE_WRITE_TOKEN, max_shard_bytes=shard_bytes,
                          progress=False, **options)


def contents(hub, repo_id: str) -> dict[str, str]:
    """Each file's sha256, the card left out (it names its repo)."""
    return {n: b.sha256 for n, b in hub.files(repo_id).items() if n != "README.md"}


@pytest.mark.parametrize("failing", ["lfs-upload", "commit"])
def test_a_resumed_streamed_repush_converges_to_the_files_of_an_uninterrupted_one(hub, tiny_world, tmp_path,
                                                                                  failing):
    cfg = config(tiny_world)
    for repo in ("straight", "resumed"):
        streamed(cfg, tmp_path / repo, "one", repo, SINGLE)
        add_user_files(hub, f"alice/{repo}", tmp_path / repo)
    before = hub.files("alice/resumed")
    streamed(cfg, tmp_path / "straight", "two", "straight", SHARDS, keep=False)

    hub.fail(failing, nth=3 if failing == "lfs-upload" else 1, times=None)
    with pytest.raises(HubError) as caught:
        streamed(cfg, tmp_path / "resumed", "two", "resumed", SHARDS, keep=False)
    message = str(caught.value)
    assert "the repo shows no half model" in message and "empty" not in message, "it still holds the first model"
    assert hub.files("alice/resumed") == before
    hub.clear_failures()
    streamed(cfg, tmp_path / "resumed", "two", "resumed", SHARDS, keep=False)

    assert contents(hub, "alice/resumed") == contents(hub, "alice/straight")
    assert "model.safetensors" not in hub.files("alice/resumed") and "model.safetensors.index.json" in contents(
        hub, "alice/resumed")


# --------------------------------------------------------------------------- an interrupted push into a new repo


def test_an_upload_failure_says_the_new_repo_is_empty_and_a_rerun_completes_it(hub, tiny_world, tmp_path):
    cfg = config(tiny_world)
    hub.fail("lfs-upload", nth=2, times=None)
    with pytest.raises(HubError) as caught:
        streamed(cfg, tmp_path, "tiny-moe", "tiny-moe", SHARDS, keep=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("The upload to 'alice/tiny-moe' was interrupted (")
    assert ("nothing was committed, so the repo exists but is empty (it was created for this upload). Run the same "
            "merge and upload again to resume: shards the Hub already received are not sent again.") in message
    assert set(hub.files("alice/tiny-moe")) == {".gitattributes"}

    hub.clear_failures()
    out, pushed = streamed(cfg, tmp_path, "tiny-moe", "tiny-moe", SHARDS, keep=False)
    assert pushed.repo_id == "alice/tiny-moe" and visible(out) <= set(hub.files("alice/tiny-moe"))


def stop_at_second_shard(monkeypatch, error: BaseException) -> None:
    """The first merge that hands over a second shard stops there with ``error``; later ones go on."""
    seen = []
    original = StreamingPush.add_shard

    def add_shard(self, path):
        seen.append(path)
        if len(seen) == 2:
            raise error
        original(self, path)

    monkeypatch.setattr(StreamingPush, "add_shard", add_shard)


def test_ctrl_c_during_a_streamed_push_says_the_new_repo_is_empty(hub, tiny_world, tmp_path, monkeypatch, capsys,
                                                                 caplog):
    import yaml

    from lazymoe.cli import main

    recipe = tmp_path / "moe.yaml"
    recipe.write_text(yaml.safe_dump(config(tiny_world)))
    argv = ["-q", "merge", str(recipe), str(tmp_path / "tiny-moe"), "--push", "tiny-moe", "--token", ALICE_WRITE_TOKEN,
            "--max-shard-size", SHARDS]
    stop_at_second_shard(monkeypatch, KeyboardInterrupt())
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 130
    assert capsys.readouterr().err == "interrupted: no output folder was left behind\n"
    (record,) = [r for r in caplog.records if "empty" in r.getMessage()]
    assert record.levelno == logging.WARNING and record.getMessage() == (
        "The merge stopped before its upload was committed. The repo 'alice/tiny-moe' exists but is empty (it was "
        "created for this upload, and nothing is committed before the whole model is): run the same merge and upload "
        f"again to resume it (what the Hub already received is not sent again), or delete it at {hub.url}/alice/"
        "tiny-moe/settings.")
    assert set(hub.files("alice/tiny-moe")) == {".gitattributes"}
    assert main(argv) == 0  # the rerun completes it
    assert "config.json" in hub.files("alice/tiny-moe")


def test_a_failed_merge_into_a_repo_holding_a_model_says_nothing_about_an_empty_repo(hub, tiny_world, tmp_path,
                                                                                    monkeypatch, caplog):
    cfg = config(tiny_world)
    streamed(cfg, tmp_path, "one", "tiny-moe", SINGLE)
    stop_at_second_shard(monkeypatch, KeyboardInterrupt())
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        streamed(cfg, tmp_path, "two", "tiny-moe", SHARDS)
    assert "empty" not in caplog.text
    assert "model.safetensors" in hub.files("alice/tiny-moe"), "the first model is still there"


def test_a_plain_push_that_fails_into_a_new_repo_says_it_is_empty(hub, tiny_world, tmp_path):
    out = lazymoe.merge(config(tiny_world), tmp_path / "tiny-moe", progress=False)
    hub.fail("commit", nth=1, times=None, mode="500")
    with pytest.raises(HubError) as caught:
        push_to_hub(out, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert ("the Hub keeps the files it already received, in the repo, which exists but is empty until the push "
            "completes. Run the same push again to resume") in str(caught.value)


def test_ctrl_c_during_a_plain_push_into_a_new_repo_says_it_is_empty(hub, tiny_world, tmp_path, monkeypatch, caplog):
    from huggingface_hub import HfApi

    out = lazymoe.merge(config(tiny_world), tmp_path / "tiny-moe", progress=False)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        push_to_hub(out, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert "The push stopped before its commit. The repo 'alice/tiny-moe' exists but is empty" in caplog.text
    assert "run the same push again to resume it" in caplog.text
    assert set(hub.files("alice/tiny-moe")) == {".gitattributes"}
