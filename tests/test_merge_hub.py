"""Merging models given as Hub ids, against the local Hub server with the real huggingface_hub client."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import moe_config
from test_merge import raw_bytes

import lazymoe
from lazymoe.errors import ModelNotFoundError


@pytest.fixture
def published(hub, tiny_world):
    shas = {}
    for name in ("base", "chat", "code"):
        shas[name] = hub.publish_folder(f"lazyorg/tiny-{name}", tiny_world[name])
    return shas


def hub_config(tiny_world, shas, **kw):
    cfg = moe_config("lazyorg/tiny-base", ["lazyorg/tiny-chat", f"lazyorg/tiny-code@{shas['code']}"], **kw)
    local = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], **kw)
    return cfg, local


def test_plan_reads_only_headers_from_the_hub(hub, published, tiny_world):
    from test_hub_stream import needed_bytes

    cfg, _ = hub_config(tiny_world, published, gate_mode="random", seed=1)
    plan = lazymoe.make_plan(cfg, progress=False)
    # what the merge will fetch: the base's tensors but its MLPs (random routers read nothing), the experts' MLPs
    assert plan.download_bytes == needed_bytes(tiny_world)
    ranged = [r for r in hub.requests if r.path.endswith(".safetensors") and r.method == "GET"]
    assert ranged and all("range" in {k.lower() for k in r.headers} for r in ranged), "weights must not be downloaded"


def test_a_plan_reads_an_indexed_header_in_one_request_and_no_experts_tokenizer(hub, published, tiny_world):
    from lazymoe.io.sources import ModelRef, describe

    cfg, _ = hub_config(tiny_world, published, gate_mode="hidden")
    plan = lazymoe.make_plan(cfg, progress=False)
    gets = [r for r in hub.requests_of("resolve") if r.method == "GET"]

    def fetched(name: str) -> list[str]:
        return sorted(r.path.rsplit("/", 1)[1] for r in gets if f"/tiny-{name}/" in r.path)

    shards = sorted(f.name for f in tiny_world["base"].glob("*.safetensors"))
    assert len(shards) == 12 and (tiny_world["base"] / "model.safetensors.index.json").is_file()
    # the base: its config, generation config, tokenizer and index, then one request per shard (length + header)
    assert fetched("base") == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                                      "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                                      "tokenizer_config.json", *shards])
    assert all(r.range.startswith("bytes=0-") for r in gets if "/tiny-base/" in r.path and r.path.endswith(".safetensors"))
    # an expert: its config, and its one file's length, then header (no index to guess the header's length from)
    for name in ("chat", "code"):
        assert fetched(name) == ["config.json", "model.safetensors", "model.safetensors"]
    # what the plan knows is what the local folders say, offsets included
    for name in ("base", "chat", "code"):
        local = describe(ModelRef.parse(str(tiny_world[name])))
        remote = plan.models[cfg["base_model"] if name == "base" else next(e["source_model"] for e in cfg["experts"]
                                                                            if f"tiny-{name}" in e["source_model"])]
        assert {n: (t.dtype, t.shape, t.offset, t.file.name) for n, t in remote.tensors.items()} == \
               {n: (t.dtype, t.shape, t.offset, t.file.name) for n, t in local.tensors.items()}
    read = sum(r.response_bytes for r in gets if r.path.endswith(".safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for name in ("base", "chat", "code")
                  for f in tiny_world[name].glob("*.safetensors"))
    assert headers <= read <= headers + 12 * 2048, "a guess over-reads at most a couple of KB per shard"


def test_a_header_longer_than_its_guess_is_read_in_two_requests(hub, published, tiny_world, monkeypatch):
    from lazymoe.io import sources
    from lazymoe.io.sources import ModelRef, describe

    monkeypatch.setattr(sources, "header_bytes_guess", lambda names: 40)  # far too short: the rest comes next
    remote = describe(ModelRef.parse("lazyorg/tiny-base"))
    local = describe(ModelRef.parse(str(tiny_world["base"])))
    assert {n: (t.shape, t.offset) for n, t in remote.tensors.items()} == \
           {n: (t.shape, t.offset) for n, t in local.tensors.items()}
    reads = [r.range for r in hub.requests_of("resolve") if r.path.endswith(".safetensors")]
    assert len(reads) == 24 and reads.count("bytes=0-47") == 12 and all(
        r == "bytes=0-47" or r.startswith("bytes=48-") for r in reads)


def test_a_small_file_sent_whole_for_a_header_read_is_taken_and_a_large_one_refused(monkeypatch):
    from huggingface_hub import utils as hf_utils

    from lazymoe.io import ranges

    small = (2).to_bytes(8, "little") + b"{}"

    class WholeFile:  # a server may answer a range that covers the whole file with 200 and the file
        status_code, headers = 200, {}

        def __init__(self, content: bytes):
            self.content = content

    for content, end in ((small, 4096), (small, len(small)), (small * 500, 4096)):
        monkeypatch.setattr(hf_utils, "http_backoff", lambda *a, content=content, **k: WholeFile(content))
        monkeypatch.setattr(hf_utils, "hf_raise_for_status", lambda response: None)
        if len(content) <= end:
            assert ranges.read_range("o/m", "0" * 40, "model.safetensors", 0, end, to_eof=True) == (small, len(small))
        else:  # more than was asked for: a range the server ignored, never taken as the start of the file
            with pytest.raises(ranges.RangeError, match="got HTTP 200 with 5000 bytes"):
                ranges.read_range("o/m", "0" * 40, "model.safetensors", 0, end, to_eof=True)


@pytest.mark.parametrize("short", [0, 1])
def test_a_header_exactly_its_guess_is_one_read_and_one_byte_more_two(hub, published, tiny_world, monkeypatch,
                                                                       short):
    from lazymoe.io import sources
    from lazymoe.io.safetensors import scan_file
    from lazymoe.io.sources import ModelRef, describe

    lengths = {}  # each shard's tensor names -> its header's length, from the local copy
    for f in tiny_world["base"].glob("*.safetensors"):
        lengths[frozenset(scan_file(f))] = int.from_bytes(f.read_bytes()[:8], "little")
    monkeypatch.setattr(sources, "header_bytes_guess", lambda names: lengths[frozenset(names)] - short)
    remote = describe(ModelRef.parse("lazyorg/tiny-base"))
    assert {n: t.offset for n, t in remote.tensors.items()} == \
           {n: t.offset for n, t in describe(ModelRef.parse(str(tiny_world["base"]))).tensors.items()}
    reads = [r for r in hub.requests_of("resolve") if r.path.endswith(".safetensors")]
    assert len(reads) == 12 * (1 + short)
    assert all(r.response_bytes == 1 for r in reads if not r.range.startswith("bytes=0-")), "the one byte missing"


def test_a_sharded_hub_repo_without_an_index_is_read_as_its_folder_is(hub, tiny_world, tmp_path):
    import shutil

    from lazymoe.io.sources import ModelRef, describe

    folder = tmp_path / "no-index"
    shutil.copytree(tiny_world["base"], folder)
    (folder / "model.safetensors.index.json").unlink()
    hub.publish_folder("lazyorg/no-index", folder)
    remote, local = describe(ModelRef.parse("lazyorg/no-index")), describe(ModelRef.parse(str(folder)))
    assert len({t.file.name for t in local.tensors.values()}) == 12
    assert {n: (t.offset, t.file.name) for n, t in remote.tensors.items()} == \
           {n: (t.offset, t.file.name) for n, t in local.tensors.items()}


def test_a_shard_the_index_lists_but_the_repo_lacks_is_named(hub, tiny_world, tmp_path):
    import shutil

    from lazymoe.io.sources import ModelRef, describe

    folder = tmp_path / "missing"
    shutil.copytree(tiny_world["base"], folder)
    (folder / "model-00005-of-00012.safetensors").unlink()
    commit = hub.publish_folder("lazyorg/missing", folder)
    with pytest.raises(ModelNotFoundError) as caught:
        describe(ModelRef.parse("lazyorg/missing"))
    assert str(caught.value) == (
        f"lazyorg/missing: its index lists model-00005-of-00012.safetensors, which the repo does not hold (commit "
        f"{commit[:12]}): its upload is incomplete. Ask its owner to upload the file, or use another revision "
        "(REPO@REVISION).")


def test_a_hugging_face_cache_that_cannot_be_written_is_named(hub, published, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lazymoe.io.sources import ModelRef, describe

    blocked = tmp_path / "afile"
    blocked.write_text("not a folder", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(blocked / "hub"))
    with pytest.raises(ModelNotFoundError, match=re.escape(
            "lazyorg/tiny-base could not be saved in the Hugging Face cache at ")) as caught:
        describe(ModelRef.parse("lazyorg/tiny-base"))
    assert str(caught.value).endswith("(Not a directory): set HF_HOME (or HF_HUB_CACHE) to a folder you can write "
                                      "to, with free space, and run again.")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is 0 bytes long, too short for a safetensors file"),
    (b"\x05\x00\x00", "is 3 bytes long, too short for a safetensors file"),
    ((5000).to_bytes(8, "little") + b'{"a": {', "is truncated inside its header (7 of 5000 header bytes)"),
    ((50_000_000).to_bytes(8, "little") + bytes(30_000), "is truncated inside its header (30000 of 50000000 header bytes)"),
])
def test_a_damaged_weight_file_on_the_hub_is_named(hub, tiny_world, tmp_path, content, message):
    from lazymoe.errors import ModelFormatError
    from lazymoe.io.sources import ModelRef, describe
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_world["base"], folder)
    (folder / "model-00003-of-00012.safetensors").write_bytes(content)
    hub.publish_folder("lazyorg/damaged", folder)
    with pytest.raises(ModelFormatError, match=re.escape(f"cannot use model-00003-of-00012.safetensors: it {message}.")):
        describe(ModelRef.parse("lazyorg/damaged"))
    read = sum(r.response_bytes for r in hub.requests_of("resolve") if r.path.endswith("model-00003-of-00012.safetensors"))
    assert read < 8192, "a header length past the file's end is not read up to the end"


@pytest.mark.parametrize(("low_disk", "gate_mode"), [(False, "hidden"), (True, "hidden"), (False, "classifier"),
                                                      (True, "classifier")])
def test_merge_from_hub_ids_equals_the_local_merge(hub, published, tiny_world, tmp_path, low_disk, gate_mode):
    from huggingface_hub import constants

    cfg, local = hub_config(tiny_world, published, gate_mode=gate_mode, seed=1, router_continuation_tokens=4)
    from_hub = lazymoe.merge(cfg, tmp_path / "hub", progress=False, low_disk=low_disk)
    from_local = lazymoe.merge(local, tmp_path / "local", progress=False, low_disk=low_disk)
    assert raw_bytes(from_hub) == raw_bytes(from_local)
    from lazymoe.io.fetch import range_cache_dir

    cached = list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))
    ranges = [p for p in range_cache_dir().rglob("*") if p.is_file()]
    whole_base = gate_mode == "classifier"  # the base continues the prompts as a whole model: its files are whole
    if low_disk:  # every range and file is deleted once written
        assert cached == [] and ranges == []
    else:
        assert ranges and len(cached) == (len(list(tiny_world["base"].glob("*.safetensors"))) if whole_base else 0)


@pytest.mark.parametrize(("gate_mode", "low_disk"), [("random", False), ("cheap_embed", True), ("hidden", False)])
def test_one_repo_named_twice_at_one_commit_is_fetched_once_and_merges(hub, published, tiny_world, tmp_path,
                                                                       gate_mode, low_disk):
    """``org/m`` and ``org/m@<its commit>`` are one set of files: their ranges were two chunks fetching into one
    file, and the second waited for ever once the first had renamed it."""
    chat = published["chat"]
    cfg = moe_config("lazyorg/tiny-base", ["lazyorg/tiny-chat", f"lazyorg/tiny-chat@{chat}",
                                           f"lazyorg/tiny-base@{published['base']}"], gate_mode=gate_mode, seed=3)
    local = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["chat"], tiny_world["base"]],
                       gate_mode=gate_mode, seed=3)
    from_hub = lazymoe.merge(cfg, tmp_path / "hub", progress=False, low_disk=low_disk)
    assert raw_bytes(from_hub) == raw_bytes(lazymoe.merge(local, tmp_path / "local", progress=False, low_disk=low_disk))
    chat_bytes = sum(f.stat().st_size for f in tiny_world["chat"].glob("*.safetensors"))
    fetched = sum(r.response_bytes for r in hub.weight_reads() if "/tiny-chat/" in r.path)
    assert 0 < fetched < chat_bytes, "the chat expert's MLPs once, not twice"


def test_a_chunk_that_cannot_be_written_fails_its_reader_instead_of_hanging(hub, published, tiny_world, tmp_path):
    from lazymoe.errors import WriteError
    from lazymoe.io.fetch import RangedWeights, Read

    plan = lazymoe.make_plan(hub_config(tiny_world, published, gate_mode="random", seed=1)[0], progress=False)
    ref, name = "lazyorg/tiny-chat", "model.layers.0.mlp.up_proj.weight"
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the range cache's folder must go", encoding="utf-8")
    with RangedWeights(plan.models, [Read(ref, name, 0, 0)], cache=blocked, progress=False) as store:
        with pytest.raises(WriteError) as caught:
            store.resolve(ref, name)
    assert str(caught.value) == (
        f"Cannot keep the fetched ranges in {blocked} (Not a directory): make that folder writable (it is under "
        "HF_HOME; set HF_HOME to a folder you can write to), then run the merge again.")


def test_a_range_cache_that_cannot_be_written_stops_a_push_before_its_repo_is_made(hub, published, tiny_world,
                                                                                    tmp_path, monkeypatch):
    from huggingface_hub import constants
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import WriteError
    from lazymoe.pipeline.merge import merge_and_push

    blocked = tmp_path / "afile"
    blocked.write_text("HF_HOME set to a file by mistake", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HOME", str(blocked))  # the range cache lives under it
    cfg, _ = hub_config(tiny_world, published, gate_mode="random", seed=1)
    with pytest.raises(WriteError, match=re.escape(f"Cannot keep the fetched ranges in {blocked / 'lazymoe' / 'ranges'} "
                                                   "(Not a directory)")):
        merge_and_push(cfg, tmp_path / "moe", "blocked-moe", keep=False, token=ALICE_WRITE_TOKEN, progress=False)
    assert "alice/blocked-moe" not in hub.repos and hub.weight_reads() == [], "no repo made, no weight fetched"


def test_a_full_disk_while_fetching_says_so(hub, published, tiny_world, tmp_path, monkeypatch):
    import builtins
    import errno

    from lazymoe.errors import InsufficientResourcesError
    from lazymoe.io.fetch import RangedWeights, Read

    plan = lazymoe.make_plan(hub_config(tiny_world, published, gate_mode="random", seed=1)[0], progress=False)
    ref, name = "lazyorg/tiny-chat", "model.layers.0.mlp.up_proj.weight"
    real_open = builtins.open

    def full(path, *args, **kwargs):  # the range cache's partial file cannot be made: the disk is full
        if str(path).endswith(".incomplete"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    cache = tmp_path / "ranges"
    with RangedWeights(plan.models, [Read(ref, name, 0, 0)], cache=cache, progress=False) as store:
        with pytest.raises(InsufficientResourcesError, match=re.escape(
                f"The disk at {cache} filled up while writing (No space left on device). Free space there")):
            store.resolve(ref, name)


def test_low_disk_keeps_what_was_cached_before(hub, published, tiny_world, tmp_path):
    from huggingface_hub import constants, snapshot_download

    snapshot_download("lazyorg/tiny-chat")  # the user had this model already
    cfg, _ = hub_config(tiny_world, published, gate_mode="random", seed=1)
    lazymoe.merge(cfg, tmp_path / "moe", progress=False, low_disk=True)
    left = {p.parts[-4] for p in Path(constants.HF_HUB_CACHE).rglob("*.safetensors")}
    assert left == {"models--lazyorg--tiny-chat"}


def test_unknown_repo_and_revision_are_named(hub, published, tiny_world):
    cfg, _ = hub_config(tiny_world, published, gate_mode="random")
    cfg["experts"][0]["source_model"] = "lazyorg/nope"
    with pytest.raises(ModelNotFoundError, match="lazyorg/nope does not exist on the Hub"):
        lazymoe.make_plan(cfg, progress=False)
    cfg["experts"][0]["source_model"] = "lazyorg/tiny-chat@v9"
    with pytest.raises(ModelNotFoundError, match="has no revision 'v9'"):
        lazymoe.make_plan(cfg, progress=False)


def test_unreachable_hub_is_explained(tiny_world):
    # the autouse fixture points the client at a closed port
    cfg = moe_config("lazyorg/tiny-base", ["lazyorg/a", "lazyorg/b"], gate_mode="random")
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        lazymoe.make_plan(cfg, progress=False)


def test_merge_then_push_round_trip_names_the_repo_in_the_card(hub, tiny_world, tmp_path):
    from huggingface_hub import snapshot_download
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.publish.hub import push_to_hub

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=2)
    out = lazymoe.merge(cfg, tmp_path / "tiny-moe", progress=False)
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    pushed = push_to_hub(out, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert pushed.repo_id == "alice/tiny-moe" and pushed.url.endswith("alice/tiny-moe")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == local, "pushing never changes the local folder"
    back = Path(snapshot_download("alice/tiny-moe", token=ALICE_WRITE_TOKEN))
    remote = {p.name: p.read_bytes() for p in back.iterdir() if p.is_file() and p.name != ".gitattributes"}
    assert set(remote) == {n for n in local if not n.startswith(".")}  # hidden files (the card's record) stay local
    assert all(remote[n] == local[n] for n in remote if n != "README.md")
    assert "alice/tiny-moe" in remote["README.md"].decode()
    assert "your-username" not in remote["README.md"].decode() and "your-username" in local["README.md"].decode()

    # once `lazymoe gguf` has written NAME-GGUF beside it, the pushed card links those files
    gguf_dir = out.parent / "tiny-moe-GGUF"
    gguf_dir.mkdir()
    (gguf_dir / "tiny-moe.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(100))
    push_to_hub(out, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    card = Path(snapshot_download("alice/tiny-moe", token=ALICE_WRITE_TOKEN)).joinpath("README.md").read_text()
    assert "alice/tiny-moe-GGUF" in card and "tiny-moe.Q4_K_M.gguf" in card


def test_pushing_gguf_files_makes_the_quantized_repo_card(hub, tmp_path):
    import yaml
    from huggingface_hub import hf_hub_download
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import HubError
    from lazymoe.publish.hub import push_to_hub

    folder = tmp_path / "tiny-moe-GGUF"
    folder.mkdir()
    for quant in ("Q4_K_M", "Q8_0"):
        (folder / f"tiny-moe.{quant}.gguf").write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(HubError, match="-GGUF"):
        push_to_hub(folder, "tiny-moe", token=ALICE_WRITE_TOKEN, progress=False)
    assert not hub.requests_of("create-repo"), "a refused push creates nothing"
    push_to_hub(folder, "tiny-moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False)
    card = Path(hf_hub_download("alice/tiny-moe-GGUF", "README.md", token=ALICE_WRITE_TOKEN)).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] in ("alice/tiny-moe", ["alice/tiny-moe"])
    assert meta["base_model_relation"] == "quantized"
    assert "tiny-moe.Q4_K_M.gguf" in card and "tiny-moe.Q8_0.gguf" in card
    assert not (folder / "README.md").exists()


def test_cli_publish_uploads_a_merged_model_and_refuses_nothing_to_do(hub, tiny_world, tmp_path, capsys):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.cli import main

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=3)
    out = lazymoe.merge(cfg, tmp_path / "tiny-pub", progress=False)
    assert main(["publish", str(out)]) == 2
    assert "Nothing to publish" in capsys.readouterr().err
    assert main(["-q", "publish", str(out), "tiny-pub", "--token", ALICE_WRITE_TOKEN]) == 0
    printed = capsys.readouterr().out
    assert f"{hub.url}/alice/tiny-pub" in printed and ALICE_WRITE_TOKEN not in printed
    assert {"config.json", "lazymoe_config.yml", "README.md"} <= set(hub.files("alice/tiny-pub"))
    assert main(["publish", str(tmp_path), "tiny-pub", "--token", ALICE_WRITE_TOKEN]) == 2  # not a merged folder
    assert "no merged model" in capsys.readouterr().err
