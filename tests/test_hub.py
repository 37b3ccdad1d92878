"""Pushing to the Hub and reading from it, with the real huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from colab_standin import install_colab
from hubserver import (
    ALICE_FINE_GRAINED_TOKEN,
    ALICE_READ_TOKEN,
    ALICE_WRITE_TOKEN,
    BOB_WRITE_TOKEN,
    UPLOAD_KINDS,
    HubServer,
)
from safetensors.torch import save_file

from lazymoe.errors import HubError
from lazymoe.cli import build_parser
from lazymoe.publish.hub import check_model_folder, push_to_hub, resolve_token

README = """---
license: apache-2.0
base_model:
- org/base
- org/coder
library_name: transformers
pipeline_tag: text-generation
tags:
- moe
- frankenmoe
- merge
- lazymoe
---
# tiny-moe

A 2-expert MoE of [org/base](https://huggingface.co/org/base) and [org/coder](https://huggingface.co/org/coder).
"""

# --------------------------------------------------------------------------- model folders


def write_model_folder(folder: Path) -> Path:
    """A small but complete model folder: config, two safetensors shards and their index, card, tokenizer.

    Stands in for a merged model until the merge engine's tiny MoE is swapped in; what the push tests check
    (every file, byte for byte, LFS for weights) does not depend on the weights' values.
    """
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": torch.randn(64, 32, generator=generator)},
        "model-00002-of-00002.safetensors": {"lm_head.weight": torch.randn(64, 32, generator=generator)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 2}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "README.md").write_text(README)
    vocab = {f"tok{i}": i for i in range(400)}  # > 4 KiB, so a lowered LFS threshold catches it
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 8)  # binary, LFS by the Hub's *.model rule
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_folder(tmp_path / "tiny-moe")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` with its sha256 and mtime: what 'the folder was not changed' compares."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_repo_matches(hub: HubServer, repo_id: str, folder: Path, tmp_path: Path) -> None:
    """Download the repo with the client and compare it with ``folder``, byte for byte."""
    downloaded = Path(snapshot_download(repo_id, local_dir=tmp_path / f"download-{repo_id.replace('/', '--')}"))
    local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    remote = {
        p.relative_to(downloaded).as_posix()
        for p in downloaded.rglob("*")
        if p.is_file() and ".cache" not in p.parts  # the client's own bookkeeping in local_dir
    }
    assert remote == local | {".gitattributes"}  # the Hub's own initial file, and nothing else
    for name in sorted(local):
        assert (downloaded / name).read_bytes() == (folder / name).read_bytes(), f"{name} differs after the round trip"


# --------------------------------------------------------------------------- pushing


def test_push_uploads_every_file_byte_identical_through_lfs(hub, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    before = snapshot(model_dir)

    pushed = push_to_hub(model_dir, "tiny-moe", progress=False)

    assert pushed.url == f"{hub.url}/alice/tiny-moe"  # namespace taken from whoami
    assert (pushed.repo_id, pushed.private) == ("alice/tiny-moe", False)
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert (pushed.files, pushed.bytes) == (len(files), sum(p.stat().st_size for p in files))
    assert len(hub.requests_of("create-repo", status=200)) == 1
    assert len(hub.requests_of("commit", status=200)) == 1
    assert_repo_matches(hub, "alice/tiny-moe", model_dir, tmp_path)
    stored = hub.files("alice/tiny-moe")
    lfs_files = {path for path, blob in stored.items() if blob.lfs}
    assert lfs_files == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model"}
    # large files went to the upload URLs (pre-signed: no Authorization header), the rest inline in the commit
    uploads = hub.requests_of("lfs-upload", status=200)
    assert sorted(r.body_bytes for r in uploads) == sorted(stored[p].size for p in lfs_files)
    assert all("authorization" not in r.headers for r in uploads)
    assert snapshot(model_dir) == before, "push must only read the local folder"


def test_card_front_matter_arrives_with_the_fields_the_hub_indexes(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    push_to_hub(model_dir, "tiny-moe", progress=False)

    readme = Path(hf_hub_download("alice/tiny-moe", "README.md")).read_text()
    front = yaml.safe_load(readme.split("---")[1])
    assert front["license"] == "apache-2.0"
    assert front["base_model"] == ["org/base", "org/coder"]
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "text-generation"
    assert {"moe", "frankenmoe", "merge", "lazymoe"} <= set(front["tags"])
    assert HfApi().model_info("alice/tiny-moe").card_data["license"] == "apache-2.0"  # the server parsed it too


def test_files_above_the_size_threshold_go_through_lfs_whatever_their_name(hub, model_dir, monkeypatch):
    hub.lfs_threshold_bytes = 4096
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    push_to_hub(model_dir, "tiny-moe", progress=False)

    stored = hub.files("alice/tiny-moe")
    assert (model_dir / "tokenizer.json").stat().st_size > 4096
    assert stored["tokenizer.json"].lfs
    assert not stored["config.json"].lfs


def test_pushing_again_creates_nothing_and_uploads_nothing(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    push_to_hub(model_dir, "tiny-moe", progress=False)
    uploads = len(hub.requests_of("lfs-upload"))

    push_to_hub(model_dir, "alice/tiny-moe", progress=False)

    assert [r.status for r in hub.requests_of("create-repo")] == [200, 409]  # created once, then "exists"
    assert len(hub.requests_of("lfs-upload")) == uploads
    assert len(hub.requests_of("commit")) == 1  # the client skips a commit that would change nothing


@pytest.mark.parametrize(
    ("kind", "nth", "mode", "received_before_failure"),
    [
        ("lfs-upload", 2, "drop", 1),  # the connection dies while the second of three large files is sent
        ("commit", 1, "500", 3),  # every large file arrived, the final commit does not go through
    ],
)
def test_rerun_after_a_network_failure_finishes_the_upload(
    hub, model_dir, tmp_path, monkeypatch, kind, nth, mode, received_before_failure
):
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    before = snapshot(model_dir)
    hub.fail(kind, nth=nth, times=None, mode=mode)  # an outage: outlasts the client's own retries

    with pytest.raises(HubError, match="interrupted") as failure:
        push_to_hub(model_dir, "tiny-moe", progress=False)
    assert "Run the same push again to resume" in str(failure.value)
    assert set(hub.files("alice/tiny-moe")) == {".gitattributes"}  # nothing half-committed
    received = {r.path for r in hub.requests_of("lfs-upload", status=200)}
    assert len(received) == received_before_failure
    if mode == "drop":
        assert len(hub.requests_of(kind, status=None)) > 1, "the client should have retried before giving up"

    hub.clear_failures()
    push_to_hub(model_dir, "tiny-moe", progress=False)

    assert_repo_matches(hub, "alice/tiny-moe", model_dir, tmp_path)
    second_run = [r.path for r in hub.requests_of("lfs-upload", status=200) if r.path in received]
    assert len(second_run) == len(received), "files the Hub already held were uploaded again"
    assert snapshot(model_dir) == before


def test_push_respects_hf_endpoint_set_after_import(hub, model_dir, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # what the client read at import
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # what the user set since
    url = push_to_hub(model_dir, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False).url
    assert url.startswith(hub.url)
    assert "alice/tiny-moe" in hub.repos


def test_push_to_an_organization_you_belong_to(hub, model_dir):
    url = push_to_hub(model_dir, "lazyorg/tiny-moe", token=ALICE_WRITE_TOKEN, progress=False).url
    assert url == f"{hub.url}/lazyorg/tiny-moe"
    assert "config.json" in hub.files("lazyorg/tiny-moe")


def test_private_push_creates_a_private_repo(hub, model_dir, tmp_path):
    push_to_hub(model_dir, "tiny-moe", private=True, token=ALICE_WRITE_TOKEN, progress=False)
    assert hub.repos["alice/tiny-moe"].private
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/tiny-moe", cache_dir=tmp_path / "anonymous")
    assert Path(hf_hub_download("alice/tiny-moe", "config.json", token=ALICE_WRITE_TOKEN)).is_file()


def test_private_push_refuses_to_fill_an_existing_public_repo(hub, model_dir):
    hub.create_repo("alice/tiny-moe", private=False)
    with pytest.raises(HubError, match="already exists and is public"):
        push_to_hub(model_dir, "tiny-moe", private=True, token=ALICE_WRITE_TOKEN, progress=False)
    assert hub.requests_of("preupload") == []


# --------------------------------------------------------------------------- failures a user can act on


def test_no_token_says_where_to_put_one(hub, model_dir):
    with pytest.raises(HubError) as failure:
        push_to_hub(model_dir, "tiny-moe", progress=False)
    message = str(failure.value)
    assert "No Hugging Face token found" in message
    assert "Colab secret" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert hub.requests == []


def test_invalid_token_is_named_by_its_source(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_ThisTokenWasRevokedLongAgo0000")
    with pytest.raises(HubError, match=r"401.*invalid, expired or revoked") as failure:
        push_to_hub(model_dir, "tiny-moe", progress=False)
    assert "HF_TOKEN environment variable" in str(failure.value)
    assert hub.requests_of("create-repo") == []


def test_read_only_token_is_refused_before_anything_is_created(hub, model_dir):
    with pytest.raises(HubError, match="read-only"):
        push_to_hub(model_dir, "tiny-moe", token=ALICE_READ_TOKEN, progress=False)
    assert hub.requests_of("create-repo") == []


def test_token_without_write_permission_gets_the_hubs_403_explained(hub, model_dir):
    with pytest.raises(HubError, match=r"403 Forbidden.*write permission on 'alice'"):
        push_to_hub(model_dir, "tiny-moe", token=ALICE_FINE_GRAINED_TOKEN, progress=False)
    assert "alice/tiny-moe" not in hub.repos


def test_namespace_that_is_not_yours(hub, model_dir):
    expected = r"'nobody' is neither your user \('alice'\) nor one of your organizations \('lazyorg'\)"
    with pytest.raises(HubError, match=expected):
        push_to_hub(model_dir, "nobody/tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert hub.requests_of("create-repo") == []


def test_repo_owned_by_someone_else(hub, model_dir):
    push_to_hub(model_dir, "tiny-moe", token=BOB_WRITE_TOKEN, progress=False)
    with pytest.raises(HubError, match=r"belongs to 'bob'.*Push to 'alice/tiny-moe' instead"):
        push_to_hub(model_dir, "bob/tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert len(hub.requests_of("commit")) == 1  # bob's own push only


def test_unreachable_hub_says_so(model_dir):
    # no `hub` fixture: the endpoint is the autouse fixture's dead port
    with pytest.raises(HubError, match=r"Could not reach the Hub at http://127.0.0.1:9"):
        push_to_hub(model_dir, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)


def test_invalid_repo_name(hub, model_dir):
    with pytest.raises(HubError, match="not a valid repo name"):
        push_to_hub(model_dir, "alice/bad name!", token=ALICE_WRITE_TOKEN, progress=False)


def _drop(name: str):
    return lambda folder: (folder / name).unlink()


def _truncate(name: str):
    def cut(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return cut


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop("config.json"), "config.json is missing"),
        (_drop("model-00002-of-00002.safetensors"), "lists weight files that are missing: model-00002-of-00002"),
        (_truncate("model-00001-of-00002.safetensors"), "model-00001-of-00002.safetensors is truncated"),
        (lambda f: [p.unlink() for p in f.glob("model*")], "holds no weights"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid"),
    ],
    ids=["no-config", "missing-shard", "truncated-shard", "no-weights", "bad-config"],
)
def test_unfinished_folders_are_refused_before_any_request(hub, model_dir, damage, message):
    damage(model_dir)
    with pytest.raises(HubError, match=message):
        push_to_hub(model_dir, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert hub.requests == []


def test_a_gguf_folder_can_be_pushed_but_not_a_fake_one(hub, tmp_path):
    folder = tmp_path / "tiny-moe-GGUF"
    folder.mkdir()
    (folder / "README.md").write_text(README)
    (folder / "tiny-moe.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    url = push_to_hub(folder, "tiny-moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False).url
    assert url == f"{hub.url}/alice/tiny-moe-GGUF"
    assert hub.files("alice/tiny-moe-GGUF")["tiny-moe.Q4_K_M.gguf"].lfs

    (folder / "broken.gguf").write_bytes(b"<html>not a model</html>")
    with pytest.raises(HubError, match=r"broken\.gguf is not a GGUF file"):
        check_model_folder(folder)


def test_a_gguf_card_edited_by_hand_is_kept_by_publish_card_and_push(hub, tmp_path, capsys, caplog):
    """The NAME-GGUF folder's card gets the same protection as a merged model's: lazymoe records what it wrote,
    and once the user edits it, publish leaves it (with a warning), `card --gguf-of` refuses without
    --overwrite, and a push uploads it as it is."""
    from helpers import one_line_error

    from lazymoe.cli import main
    from lazymoe.io.folder import CARD_RECORD, card_edited
    from lazymoe.publish.gguf_card import write_gguf_card

    folder = tmp_path / "tiny-moe-GGUF"
    folder.mkdir()
    (folder / "tiny-moe.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    written = write_gguf_card(folder, base_repo_id="alice/tiny-moe", repo_id="alice/tiny-moe-GGUF")
    assert written == folder / "README.md" and (folder / CARD_RECORD).is_file() and not card_edited(folder)

    mine = written.read_text(encoding="utf-8").replace("# ", "# My notes on this model\n\n# ", 1)
    written.write_text(mine, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert write_gguf_card(folder, base_repo_id="alice/tiny-moe") is None
    assert written.read_text(encoding="utf-8") == mine
    assert "was edited since lazymoe wrote it, so it is left as it is" in caplog.text

    message = one_line_error(capsys, ["card", str(folder), "--gguf-of", "alice/tiny-moe"])
    assert message == (f"{written} was edited since lazymoe wrote it; add --overwrite to replace it with lazymoe's "
                       "card (print it instead with --stdout).")
    assert written.read_text(encoding="utf-8") == mine

    push_to_hub(folder, "tiny-moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False)
    remote = hub.files("alice/tiny-moe-GGUF")
    assert remote["README.md"].data.decode() == mine and CARD_RECORD not in remote

    assert main(["-q", "card", str(folder), "--gguf-of", "alice/tiny-moe", "--overwrite"]) == 0
    assert "My notes" not in written.read_text(encoding="utf-8") and not card_edited(folder)


def test_a_path_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(HubError, match="is not a folder"):
        check_model_folder(tmp_path / "nowhere")


def test_the_token_never_leaks_into_logs_output_folder_or_errors(hub, model_dir, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", ALICE_WRITE_TOKEN)
    push_to_hub(model_dir, "tiny-moe", progress=True)
    hub.fail(UPLOAD_KINDS, times=None)
    with pytest.raises(HubError) as failure:
        push_to_hub(model_dir, "lazyorg/tiny-moe", progress=True)

    captured = capsys.readouterr()
    error_text = "".join(traceback.format_exception(failure.value))
    outputs = {"logs": caplog.text, "stdout": captured.out, "stderr": captured.err, "error": error_text}
    for where, text in outputs.items():
        assert ALICE_WRITE_TOKEN not in text, f"token leaked into {where}"
    for path in model_dir.rglob("*"):
        assert not path.is_file() or ALICE_WRITE_TOKEN.encode() not in path.read_bytes(), f"token written into {path}"
    assert not Path(constants.HF_TOKEN_PATH).exists(), "push must not save the token as a login"
    assert hub.requests_of("whoami")[0].headers["authorization"] == f"Bearer {ALICE_WRITE_TOKEN}"  # it was used


# --------------------------------------------------------------------------- token resolution


def test_token_order_argument_then_colab_then_env_then_saved_login(monkeypatch):
    Path(constants.HF_TOKEN_PATH).write_text("hf_saved\n")
    assert resolve_token() == "hf_saved"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token() == "hf_env"
    install_colab(monkeypatch, {"MY_SECRET": " hf_colab\n"})
    assert resolve_token(colab_secret="MY_SECRET") == "hf_colab"
    assert resolve_token(colab_secret="OTHER") == "hf_env"  # a missing secret falls through
    assert resolve_token("hf_explicit", colab_secret="MY_SECRET") == "hf_explicit"


def test_outside_colab_the_colab_module_is_never_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert resolve_token() is None
    assert "google.colab" not in sys.modules


def test_a_colab_secret_without_notebook_access_is_explained(hub, model_dir, monkeypatch):
    install_colab(monkeypatch, {"HF_TOKEN": "hf_x"}, no_access=("HF_TOKEN",))
    with pytest.raises(HubError, match="switch on 'Notebook access'"):
        push_to_hub(model_dir, "tiny-moe", progress=False)


def test_a_colab_secret_is_used_to_push(hub, model_dir, monkeypatch):
    install_colab(monkeypatch, {"HF_TOKEN": ALICE_WRITE_TOKEN})
    pushed = push_to_hub(model_dir, "tiny-moe", progress=False)
    assert (pushed.repo_id, pushed.url) == ("alice/tiny-moe", f"{hub.url}/alice/tiny-moe")


# --------------------------------------------------------------------------- CLI


def test_cli_push(hub, model_dir, capsys):
    parser = build_parser()
    args = parser.parse_args(["push", str(model_dir), "lazyorg/tiny-moe", "--private", "--token", ALICE_WRITE_TOKEN])

    assert args.func(args) == 0

    out = capsys.readouterr().out
    assert f"{hub.url}/lazyorg/tiny-moe" in out
    assert ALICE_WRITE_TOKEN not in out
    assert hub.repos["lazyorg/tiny-moe"].private


# --------------------------------------------------------------------------- reading: what the merge engine uses


@pytest.fixture
def published(hub, tmp_path) -> dict[str, str]:
    """org/base published twice: main, then a 'dev' branch with another config; a tag on the first commit."""
    folder = write_model_folder(tmp_path / "base")
    first = hub.publish_folder("org/base", folder)
    hub.create_tag("org/base", "v1.0", revision=first)
    (folder / "config.json").write_text(json.dumps({"model_type": "mixtral", "revision": "dev"}))
    dev = hub.publish_folder("org/base", folder, revision="dev")
    return {"main": first, "dev": dev, "folder": str(folder)}


def test_snapshot_download_with_revision_and_patterns(published, tmp_path):
    folder = Path(snapshot_download("org/base", revision="dev", allow_patterns=["*.json"]))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json"]
    assert json.loads((folder / "config.json").read_text())["revision"] == "dev"
    assert folder.name == published["dev"]  # the cache is keyed by the commit sha the server reported

    by_sha = Path(snapshot_download("org/base", revision=published["main"], allow_patterns=["config.json"]))
    assert "revision" not in json.loads((by_sha / "config.json").read_text())


def test_safetensors_metadata_is_read_from_headers_with_ranges(hub, published):
    meta = HfApi().get_safetensors_metadata("org/base", revision="v1.0")
    assert meta.sharded
    assert meta.weight_map == {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }
    tensor = meta.files_metadata["model-00002-of-00002.safetensors"].tensors["lm_head.weight"]
    assert (tensor.dtype, tensor.shape) == ("F32", [64, 32])
    shard_reads = [r for r in hub.requests_of("resolve", status=206) if r.path.endswith(".safetensors")]
    assert shard_reads and all(r.headers["range"].startswith("bytes=0-") for r in shard_reads)  # headers only


def test_hf_hub_download_by_tag_and_what_is_missing(published):
    path = Path(hf_hub_download("org/base", "tokenizer.model", revision="v1.0"))
    assert path.read_bytes() == (Path(published["folder"]) / "tokenizer.model").read_bytes()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/base", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/base", "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/absent", "config.json")


def test_private_published_repo_needs_a_token_of_its_namespace(hub, tmp_path):
    hub.publish_folder("bob/secret", write_model_folder(tmp_path / "secret"), private=True)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("bob/secret", "config.json", token=ALICE_WRITE_TOKEN)
    assert Path(hf_hub_download("bob/secret", "config.json", token=BOB_WRITE_TOKEN)).is_file()
