"""Hub to Hub: a merge fetches only the bytes it reads, by ranges, with the real huggingface_hub client against
tests/hubserver.py (which counts the bytes it sends and receives)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from helpers import moe_config
from test_merge import raw_bytes

import lazymoe
from lazymoe.errors import HubError
from lazymoe.io.fetch import range_cache_dir
from lazymoe.io.safetensors import scan_file

MODELS = ("base", "chat", "code")


@pytest.fixture
def published(hub, tiny_world):
    return {name: hub.publish_folder(f"lazyorg/tiny-{name}", tiny_world[name]) for name in MODELS}


def hub_and_local(tiny_world, **kw):
    hub = moe_config("lazyorg/tiny-base", ["lazyorg/tiny-chat", "lazyorg/tiny-code"], **kw)
    local = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], **kw)
    return hub, local


def tensors_of(folder: Path) -> dict:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(scan_file(f))
    return out


def needed_bytes(tiny_world) -> int:
    """What a random-router merge of base + chat + code reads, from the local copies' headers: every tensor of
    the base but its MLPs (the base is no expert), and the experts' MLPs."""
    base = sum(t.nbytes for n, t in tensors_of(tiny_world["base"]).items() if ".mlp." not in n)
    return base + sum(t.nbytes for m in ("chat", "code") for n, t in tensors_of(tiny_world[m]).items() if ".mlp." in n)


def tensor_ranges(hub) -> list:
    """The ranged weight reads that are not header reads (``describe`` reads each file's length and header)."""
    return hub.weight_reads()


def test_weight_reads_are_the_ranges_from_a_files_data_on(hub, published, tiny_world):
    import urllib.error
    import urllib.request

    shard = sorted(tiny_world["base"].glob("*.safetensors"))[0]
    data_start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    url = f"{hub.url}/lazyorg/tiny-base/resolve/main/"
    for name, first in ((shard.name, 0), (shard.name, data_start - 1), (shard.name, data_start),
                        ("missing.safetensors", 0)):
        request = urllib.request.Request(url + name, headers={"Range": f"bytes={first}-{first + 9}"})
        try:
            urllib.request.urlopen(request).read()
        except urllib.error.HTTPError as err:
            assert err.code == 404 and name == "missing.safetensors"
    with urllib.request.urlopen(url + shard.name) as whole:  # a whole file: counted only when asked for
        whole.read()
    ranges = [r.range for r in hub.weight_reads()]
    assert ranges == [f"bytes={data_start}-{data_start + 9}", "bytes=0-9"], "a header read is not a weight read"
    assert len(hub.weight_reads(whole=True)) == 3


def test_a_merge_fetches_exactly_the_bytes_it_reads_and_equals_the_local_merge(hub, published, tiny_world, tmp_path):
    from huggingface_hub import constants

    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=1)
    plan = lazymoe.make_plan(cfg, progress=False)
    headers = hub.downloaded_bytes  # config, tokenizer and safetensors headers
    assert not tensor_ranges(hub), "planning reads headers only"
    out = lazymoe.merge(cfg, tmp_path / "hub", progress=False, plan=plan)

    need = needed_bytes(tiny_world)
    whole = sum(p.stat().st_size for n in MODELS for p in tiny_world[n].glob("*.safetensors"))
    fetched = sum(r.response_bytes for r in tensor_ranges(hub))
    assert plan.download_bytes == need and fetched == need < 0.7 * whole
    assert hub.downloaded_bytes - headers == need, "nothing but the planned tensors moved"
    tensors = sum(len([n for n in tensors_of(tiny_world[m]) if m == "base" or ".mlp." in n]) for m in MODELS)
    assert len(tensor_ranges(hub)) < tensors / 2, "adjacent tensors are coalesced into one range"
    assert all(r.status == 206 for r in tensor_ranges(hub))
    assert list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors")) == [], "no whole file was downloaded"
    assert raw_bytes(out) == raw_bytes(lazymoe.merge(local, tmp_path / "local", progress=False))


def test_a_second_merge_downloads_no_weight_again(hub, published, tiny_world, tmp_path):
    cfg, _ = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    first = lazymoe.merge(cfg, tmp_path / "one", progress=False)
    assert tensor_ranges(hub)
    ranges = sorted(p.name for p in range_cache_dir().rglob("*") if p.is_file())
    hub.reset_counters()
    second = lazymoe.merge(cfg, tmp_path / "two", progress=False)
    assert tensor_ranges(hub) == [], "every range comes from the range cache"
    assert sorted(p.name for p in range_cache_dir().rglob("*") if p.is_file()) == ranges, "and is stored once"
    assert raw_bytes(first) == raw_bytes(second)


def test_files_already_in_the_hf_cache_are_read_there(hub, published, tiny_world, tmp_path):
    from huggingface_hub import snapshot_download

    snapshot_download("lazyorg/tiny-chat")  # the user had this model already
    hub.reset_counters()
    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=3)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert {r.path.split("/")[2] for r in tensor_ranges(hub)} == {"tiny-base", "tiny-code"}
    assert not [p for p in range_cache_dir().rglob("*") if "tiny-chat" in str(p) and p.is_file()]
    assert raw_bytes(out) == raw_bytes(lazymoe.merge(local, tmp_path / "local", progress=False))


def test_low_disk_keeps_no_fetched_range(hub, published, tiny_world, tmp_path):
    from huggingface_hub import constants

    cfg, local = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False, low_disk=True, max_shard_bytes="200KB")
    assert [p for p in range_cache_dir().rglob("*") if p.is_file()] == []
    assert list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors")) == []
    assert raw_bytes(out) == raw_bytes(lazymoe.merge(local, tmp_path / "local", progress=False, low_disk=True,
                                                     max_shard_bytes="200KB"))


def test_a_network_failure_while_fetching_is_one_line_and_leaves_nothing(hub, published, tiny_world, tmp_path):
    cfg, _ = hub_and_local(tiny_world, gate_mode="random", seed=1)
    plan = lazymoe.make_plan(cfg, progress=False)
    hub.fail("resolve", nth=3, times=None)  # an outage longer than the client's retries
    with pytest.raises(HubError, match=r"^Downloading model.*safetensors of lazyorg/tiny-\w+ failed .*Check the "
                                       r"network, then run the merge again") as caught:
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, plan=plan)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert not [p for p in range_cache_dir().rglob("*.incomplete")], "no partial range is left"


def test_hubserver_paces_downloads_at_its_bandwidth(hub, published):
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    size, path = max((b.size, p) for p, b in hub.files("lazyorg/tiny-chat").items())
    hub.set_bandwidth(download_bps=size / 0.5)  # the largest file takes half a second
    start = time.monotonic()
    body = get_session().get(hf_hub_url("lazyorg/tiny-chat", path)).content
    assert len(body) == size and time.monotonic() - start >= 0.45
    assert hub.downloaded_bytes == size


def test_a_small_chunk_is_fetched_alone_by_every_worker_before_the_next(hub, tmp_path, monkeypatch):
    """Chunks smaller than WORKERS x PART are cut into WORKERS equal requests, so that the chunk the reader waits
    for is alone on the link, on every worker, instead of sharing it with the next chunk's first requests."""
    import threading

    import torch
    from safetensors.torch import save_file

    from lazymoe.io import fetch
    from lazymoe.io.sources import ModelRef, describe

    workers = 4
    monkeypatch.setattr(fetch, "MIN_PART", 1024)
    # two tensors of one file, read by two groups (two shards): two chunks, neither coalesced into the other
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.arange(8192, dtype=torch.int32), "b": torch.arange(4096, dtype=torch.int32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    hub.publish_folder("lazyorg/two-chunks", folder)
    info = describe(ModelRef.parse("lazyorg/two-chunks"))
    a, b = info.tensors["a"], info.tensors["b"]

    # the first chunk's requests are held until all of them are in flight: fewer than `workers` would never
    # get there, and a worker that took the second chunk's first part would leave one of them unsent
    calls, all_in_flight, real = [], threading.Barrier(workers, timeout=10), fetch.read_range

    def held(repo_id, revision, filename, start, end):
        calls.append((start, end))
        if start < b.offset:
            all_in_flight.wait()
        return real(repo_id, revision, filename, start, end)

    monkeypatch.setattr(fetch, "read_range", held)
    reads = [fetch.Read("m", "a", 0, 0), fetch.Read("m", "b", 1, 1)]
    with fetch.RangedWeights({"m": info}, reads, workers=workers, cache=tmp_path / "ranges", progress=False) as store:
        for t in (a, b):
            got = store.resolve("m", t.name)
            with open(got.file, "rb") as f, open(folder / "model.safetensors", "rb") as src:
                f.seek(got.offset)
                src.seek(t.offset)
                assert f.read(t.nbytes) == src.read(t.nbytes)
    quarter = a.nbytes // workers
    assert sorted(calls[:workers]) == [(a.offset + i * quarter, a.offset + (i + 1) * quarter) for i in range(workers)]
    assert sorted(e - s for s, e in calls[workers:]) == [b.nbytes // workers] * workers
    # a big chunk keeps PART-sized requests; a tiny one is one request
    assert fetch.part_size(64 << 20, 8) == fetch.PART and fetch.part_size(100, 8) == fetch.MIN_PART


# ----------------------------------------------------------------------------- upload while merging


def shard_count(plan_or_folder) -> int:
    return len(list(Path(plan_or_folder).glob("*.safetensors")))


@pytest.fixture
def recorded_shards(monkeypatch, hub):
    """Each shard handed to the uploader, with the LFS uploads the Hub had finished when the merge went on."""
    from lazymoe.publish.hub import StreamingPush

    seen = []
    add = StreamingPush.add_shard

    def spy(self, path):
        add(self, path)
        seen.append((path.name, len(hub.requests_of("lfs-upload", status=200))))

    monkeypatch.setattr(StreamingPush, "add_shard", spy)
    return seen


def remote_files(hub, repo_id) -> dict[str, bytes]:
    return {p: b.data for p, b in hub.files(repo_id).items() if p != ".gitattributes"}


def test_merge_push_uploads_each_shard_while_merging_and_commits_once(hub, published, tiny_world, tmp_path,
                                                                       recorded_shards):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.io.folder import HUB_RECORD
    from lazymoe.pipeline.merge import merge_and_push

    cfg, local = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    out, pushed = merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", token=ALICE_WRITE_TOKEN,
                                 max_shard_bytes="150KB", progress=False)
    shards = shard_count(out)
    assert shards >= 4 and [n for n, _ in recorded_shards] == sorted(p.name for p in out.glob("*.safetensors"))
    # at most two shards are handed over and not yet on the Hub: shard k-2 is there when shard k is handed over
    assert all(done >= k - 1 for k, (_, done) in enumerate(recorded_shards))
    (commit,) = hub.requests_of("commit")
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]  # hidden files (the card's record) stay local
    assert commit.status == 200 and pushed.repo_id == "alice/tiny-moe" and pushed.files == len(visible)
    lfs = hub.requests_of("lfs-upload")
    large = [p for p in visible if hub.upload_mode(p.name, p.stat().st_size) == "lfs"]  # + tokenizer.model
    assert len(lfs) == len(large) > shards and hub.requests.index(lfs[-1]) < hub.requests.index(commit)
    remote = remote_files(hub, "alice/tiny-moe")
    local_files = {p.name: p.read_bytes() for p in visible}
    assert set(remote) == set(local_files)
    assert all(remote[n] == local_files[n] for n in local_files if n != "README.md")
    assert "alice/tiny-moe" in remote["README.md"].decode() and "your-username" in local_files["README.md"].decode()
    assert not (out / HUB_RECORD).exists(), "the shards are kept here: no record of a Hub-only output"
    expected = lazymoe.merge(local, tmp_path / "local", max_shard_bytes="150KB", progress=False)
    assert raw_bytes(out) == raw_bytes(expected)


def test_no_keep_deletes_each_shard_once_uploaded_and_bounds_the_disk(hub, published, tiny_world, tmp_path,
                                                                       recorded_shards):
    import threading

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline.merge import merge_and_push

    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=2)
    hub.set_bandwidth(upload_bps=2_000_000)  # uploads slower than writing: shards pile up unless bounded
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], len([p for p in tmp_path.rglob("model-*.safetensors")]))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out, pushed = merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", keep=False, token=ALICE_WRITE_TOKEN,
                                     max_shard_bytes="100KB", progress=False)
    finally:
        stop.set()
        sampler.join()
    assert len(recorded_shards) >= 6
    assert 1 <= peak[0] <= 3, f"{peak[0]} shards were on disk at once"
    assert shard_count(out) == 0 and {"config.json", "README.md", "lazymoe_config.yml"} <= {p.name for p in out.iterdir()}
    expected = lazymoe.merge(local, tmp_path / "local", max_shard_bytes="100KB", progress=False)
    remote = remote_files(hub, "alice/tiny-moe")
    recipe = ("README.md", "lazymoe_config.yml")  # they name the models as given: Hub ids here, folders there
    assert {n: remote[n] for n in remote if n not in recipe} == {
        p.name: p.read_bytes() for p in expected.iterdir() if p.name not in recipe and not p.name.startswith(".")}
    assert len(hub.requests_of("commit")) == 1
    assert not [p for p in range_cache_dir().rglob("*") if p.is_file()], "fetched ranges are deleted as written"


def test_an_upload_failure_commits_nothing_and_a_rerun_sends_only_the_missing_shards(hub, published, tiny_world,
                                                                                      tmp_path):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline.merge import merge_and_push

    cfg, _ = hub_and_local(tiny_world, gate_mode="random")  # no seed: the push derives one from the recipe
    hub.fail("lfs-upload", nth=3, times=None)  # the network goes down during the third shard's upload
    with pytest.raises(HubError) as caught:
        merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", keep=False, token=ALICE_WRITE_TOKEN,
                       max_shard_bytes="150KB", progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("The upload to 'alice/tiny-moe' was interrupted (")
    assert "nothing was committed" in message and "merge and upload again" in message
    assert hub.requests_of("commit") == [] and set(hub.files("alice/tiny-moe")) == {".gitattributes"}
    assert list(tmp_path.iterdir()) == [], "no output folder, no shard left behind"
    received = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("lfs-upload", status=200)}
    assert len(received) == 2

    hub.clear_failures()
    hub.reset_counters()
    out, _ = merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", keep=True, token=ALICE_WRITE_TOKEN,
                            max_shard_bytes="150KB", progress=False)
    again = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("lfs-upload")}
    assert again and not again & received, "shards the Hub holds are not sent again"
    large = [p for p in out.iterdir() if hub.upload_mode(p.name, p.stat().st_size) == "lfs"]  # + tokenizer.model
    assert len(again) + len(received) == len(large)
    remote = remote_files(hub, "alice/tiny-moe")
    assert all(remote[p.name] == p.read_bytes() for p in out.iterdir()
               if p.name != "README.md" and not p.name.startswith("."))  # hidden files (the card's record) stay local


def test_cli_merge_push(hub, published, tiny_world, tmp_path, capsys):
    import yaml
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.cli import main

    cfg, _ = hub_and_local(tiny_world, gate_mode="random", seed=4)
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), str(tmp_path / "a"), "--no-keep"]) == 2
    assert "--no-keep deletes each shard once it is uploaded: it needs --push REPO" in capsys.readouterr().err
    assert main(["-q", "merge", str(path), str(tmp_path / "tiny-cli"), "--push", "tiny-cli", "--no-keep",
                 "--token", ALICE_WRITE_TOKEN, "--max-shard-size", "200KB"]) == 0
    printed = capsys.readouterr().out
    assert f"{hub.url}/alice/tiny-cli" in printed and "in one commit" in printed and ALICE_WRITE_TOKEN not in printed
    assert len(hub.requests_of("commit")) == 1 and "model.safetensors.index.json" in hub.files("alice/tiny-cli")


def test_a_no_keep_merge_records_where_its_weights_went_and_each_step_names_that_repo(hub, published, tiny_world,
                                                                                     tmp_path, capsys):
    """After the session that merged it (a new shell, a restarted kernel), a folder whose shards went to the Hub only
    still says where they are: every step that reads the weights names the repo in one line."""
    import json
    import shutil

    import yaml
    from helpers import one_line_error
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import WeightsOnHubError
    from lazymoe.evaluate.questions import answer_questions
    from lazymoe.evaluate.skill import write_evaluation
    from lazymoe.gguf.convert import convert_to_gguf
    from lazymoe.io.folder import HUB_RECORD, HubCopy, foreign_entries, read_hub_record, require_weights
    from lazymoe.pipeline.release import release
    from lazymoe.pipeline.route import write_routing_picture
    from lazymoe.publish.hub import push_to_hub
    from lazymoe.runtime.load import LoadChoice, load_merged

    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=6)
    (tmp_path / "moe.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "tiny-moe"
    assert main_quiet(["merge", str(tmp_path / "moe.yaml"), str(out), "--push", "tiny-moe", "--no-keep", "--token",
                       ALICE_WRITE_TOKEN, "--max-shard-size", "150KB"]) == 0
    capsys.readouterr()
    commit = hub.repos["alice/tiny-moe"].branches["main"]
    uploaded = {n: b for n, b in hub.files("alice/tiny-moe").items() if n != ".gitattributes"}
    report = {"private": False, "files": len(uploaded), "bytes": sum(len(b.data) for b in uploaded.values()),
              "commit_url": f"{hub.url}/alice/tiny-moe/commit/{commit}"}
    assert shard_count(out) == 0 and read_hub_record(out) == HubCopy("alice/tiny-moe", hub.url, commit, **report)
    assert json.loads((out / HUB_RECORD).read_text()) == {"repo_id": "alice/tiny-moe", "endpoint": hub.url,
                                                          "commit": commit, **report}
    # a record from before the report was kept, or with a damaged report, still says where the weights are
    where = {"repo_id": "alice/tiny-moe", "endpoint": hub.url, "commit": commit}
    for damaged in ({}, {"files": "7", "bytes": -1}, {**report, "private": 1}, {**report, "bytes": 10 ** 400},
                    {**report, "commit_url": "javascript:alert(1)"}, {**report, "files": True}):
        (out / HUB_RECORD).write_text(json.dumps({**where, **damaged}))
        assert read_hub_record(out) == HubCopy("alice/tiny-moe", hub.url, commit), damaged
    for unreadable in ("[" * 100_000 + "]" * 100_000, json.dumps({**where, "commit": False}), "[]"):
        (out / HUB_RECORD).write_text(unreadable)
        assert read_hub_record(out) is None
    (out / HUB_RECORD).write_text(json.dumps({"repo_id": "alice/tiny-moe", "endpoint": hub.url, "commit": commit,
                                              **report}))
    assert HUB_RECORD not in hub.files("alice/tiny-moe") and foreign_entries(out) == []
    url = f"{hub.url}/alice/tiny-moe"
    told = (f"{out} holds the small files only: its weights were uploaded to {url} and deleted here as each shard "
            f"went up, and this step reads them from this disk. Download the model (`hf download alice/tiny-moe "
            f"--local-dir {out}-full`) and give that folder instead, or run this where a full copy is.")
    for argv in (["route", str(out)], ["eval", str(out)], ["gguf", str(out)], ["card", str(out)],
                 ["push", str(out), "tiny-copy", "--token", ALICE_WRITE_TOKEN],
                 ["publish", str(out), "tiny-copy", "--token", ALICE_WRITE_TOKEN], ["publish", str(out), "--gguf"]):
        assert one_line_error(capsys, argv) == told, argv
    choice = LoadChoice("cpu", "test")
    for step in (lambda: write_routing_picture(out, progress=False), lambda: write_evaluation(out, progress=False),
                 lambda: answer_questions(out), lambda: convert_to_gguf(out, progress=False),
                 lambda: push_to_hub(out, "tiny-copy", token=ALICE_WRITE_TOKEN), lambda: load_merged(out, choice),
                 lambda: release(out, gguf=True, progress=False)):
        with pytest.raises(WeightsOnHubError) as caught:
            step()
        assert str(caught.value) == told and caught.value.url == url
    assert set(hub.repos) >= {"alice/tiny-moe"} and "alice/tiny-copy" not in hub.repos, "nothing was pushed"

    full = tmp_path / "tiny-moe-full"  # what `hf download` gives: the shards back beside the small files
    shutil.copytree(out, full)
    for name, blob in hub.files("alice/tiny-moe").items():
        if name.endswith(".safetensors"):
            (full / name).write_bytes(blob.data)
    require_weights(full)  # a full copy: every step reads it
    assert main_quiet(["push", str(full), "tiny-copy", "--token", ALICE_WRITE_TOKEN]) == 0
    assert HUB_RECORD not in hub.files("alice/tiny-copy"), "the record is hidden: never uploaded"
    assert shard_count(full) == len([n for n in hub.files("alice/tiny-copy") if n.endswith(".safetensors")]) > 1

    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    assert main_quiet(["merge", str(tmp_path / "local.yaml"), str(out), "--overwrite", "--max-shard-size",
                       "150KB"]) == 0, capsys.readouterr().err
    assert shard_count(out) > 1 and not (out / HUB_RECORD).exists(), "the Hub-only output is replaced whole"


def main_quiet(argv: list[str]) -> int:
    from lazymoe.cli import main

    return main(["-q", *argv])


# ----------------------------------------------------------------------------- resume without refetching


def shard_names_by_oid(folder: Path) -> dict[str, str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in folder.glob("*.safetensors")}


def source_bytes(plan, shard_names) -> int:
    """The distinct source tensor bytes the shards ``shard_names`` are made of."""
    sources = {(p.model, p.source.name): p.source.nbytes for s in plan.shards if s.filename in shard_names
               for t in s.tensors for p in t.pieces if p.model is not None}
    return sum(sources.values())


def test_a_no_keep_rerun_fetches_and_builds_only_the_shards_the_hub_lacks(hub, published, tiny_world, tmp_path):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline.merge import merge_and_push
    from lazymoe.publish.resume import push_state_dir

    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=5)
    push = dict(keep=False, token=ALICE_WRITE_TOKEN, max_shard_bytes="150KB", progress=False)
    expected = lazymoe.merge(local, tmp_path / "local", max_shard_bytes="150KB", progress=False)
    name_of = shard_names_by_oid(expected)
    hub.fail("lfs-upload", nth=4, times=None)  # the network goes down during the fourth shard's upload
    with pytest.raises(HubError, match="nothing was committed"):
        merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    uploaded = {name_of[r.path.rsplit("/", 1)[-1]] for r in hub.requests_of("lfs-upload", status=200)}
    assert len(uploaded) == 3 and list(push_state_dir().rglob("*.json")), "what the Hub received is recorded"

    hub.clear_failures()
    hub.reset_counters()
    out, pushed = merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    plan = lazymoe.make_plan(cfg, max_shard_bytes="150KB", progress=False)
    missing = {s.filename for s in plan.shards} - uploaded
    fetched = sum(r.response_bytes for r in tensor_ranges(hub))
    assert fetched == source_bytes(plan, missing) < source_bytes(plan, {s.filename for s in plan.shards}), \
        "only the sources of the shards the Hub lacks are fetched"
    sent = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("lfs-upload")}
    assert {name_of[oid] for oid in sent if oid in name_of} == missing, "and only they are built and sent"
    assert len(hub.requests_of("commit", status=200)) == 1
    remote = remote_files(hub, "alice/tiny-moe")
    recipe = ("README.md", "lazymoe_config.yml")
    assert {n: remote[n] for n in remote if n not in recipe} == {
        p.name: p.read_bytes() for p in expected.iterdir() if p.name not in recipe and not p.name.startswith(".")}, "the same model as one run"
    assert [p for p in push_state_dir().rglob("*") if p.is_file()] == [], "the record goes with the commit"


@pytest.mark.parametrize("mode", ["hidden", "classifier"])
def test_a_rerun_after_a_failed_commit_fetches_nothing_and_runs_no_router_pass(hub, published, tiny_world,
                                                                                 tmp_path, monkeypatch, mode):
    """hidden reads the base layer by layer; classifier first loads the whole base (it continues the prompts),
    so its first run downloads the base's weight files whole: the re-run, with the rows recorded, needs none."""
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline import merge as merging

    cfg, local = hub_and_local(tiny_world, gate_mode=mode, seed=1)
    assert bool(lazymoe.make_plan(cfg, progress=False).whole_models) == (mode == "classifier")
    push = dict(keep=False, token=ALICE_WRITE_TOKEN, max_shard_bytes="150KB", progress=False)
    expected = lazymoe.merge(local, tmp_path / "local", max_shard_bytes="150KB", progress=False)
    hub.fail("commit", nth=1, times=None)
    with pytest.raises(HubError, match="nothing was committed"):
        merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    first = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("lfs-upload", status=200)}

    hub.clear_failures()
    hub.reset_counters()

    def no_router_pass(*args, **kwargs):
        raise AssertionError("the router rows were recorded: no router pass runs again")

    monkeypatch.setattr(merging, "compute_gates", no_router_pass)
    merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    assert tensor_ranges(hub) == [] and hub.requests_of("lfs-upload") == [], "no weight fetched, no shard sent"
    whole = [r for r in hub.requests_of("resolve") if r.method == "GET" and r.path.endswith(".safetensors")
             and not r.range]
    assert whole == [], "no weight file downloaded whole either"
    assert len(hub.requests_of("commit", status=200)) == 1
    assert set(shard_names_by_oid(expected)) <= first  # the routers' shard, rebuilt from the rows, is the same
    remote = remote_files(hub, "alice/tiny-moe")
    assert all(remote[p.name] == p.read_bytes() for p in expected.glob("*.safetensors"))


def test_a_recorded_shard_the_hub_lacks_is_built_again(hub, published, tiny_world, tmp_path):
    import json

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline.merge import merge_and_push
    from lazymoe.publish.resume import push_state_dir

    cfg, local = hub_and_local(tiny_world, gate_mode="random", seed=6)
    push = dict(keep=False, token=ALICE_WRITE_TOKEN, max_shard_bytes="150KB", progress=False)
    hub.fail("commit", nth=1, times=None)
    with pytest.raises(HubError):
        merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    (record,) = push_state_dir().rglob("*.json")
    data = json.loads(record.read_text())
    lost = sorted(data["shards"])[1]
    data["shards"][lost]["sha256"] = "0" * 64  # as if the Hub had lost it (or the record were wrong)
    record.write_text(json.dumps(data))

    hub.clear_failures()
    hub.reset_counters()
    merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", **push)
    expected = lazymoe.merge(local, tmp_path / "local", max_shard_bytes="150KB", progress=False)
    plan = lazymoe.make_plan(cfg, max_shard_bytes="150KB", progress=False)
    assert sum(r.response_bytes for r in tensor_ranges(hub)) == source_bytes(plan, {lost})
    remote = remote_files(hub, "alice/tiny-moe")
    assert all(remote[p.name] == p.read_bytes() for p in expected.glob("*.safetensors"))


# ----------------------------------------------------------------------------- the router pass beside the writer


def test_shards_are_uploaded_while_the_router_pass_runs(hub, published, tiny_world, tmp_path, monkeypatch):
    import threading

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.pipeline import merge as merging
    from lazymoe.publish.hub import StreamingPush

    uploaded, add = threading.Event(), StreamingPush.add_shard
    compute, waited = merging.compute_gates, []

    def spy(self, path):
        add(self, path)
        uploaded.set()

    def slow_router_pass(*args, **kwargs):  # holds the routers until a shard has gone to the Hub
        waited.append(uploaded.wait(timeout=60))
        return compute(*args, **kwargs)

    monkeypatch.setattr(StreamingPush, "add_shard", spy)
    monkeypatch.setattr(merging, "compute_gates", slow_router_pass)
    cfg, local = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    out, _ = merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", token=ALICE_WRITE_TOKEN,
                                    max_shard_bytes="150KB", progress=False)
    assert waited == [True], "a shard was written and handed to the uploader before the routers existed"
    monkeypatch.undo()
    assert raw_bytes(out) == raw_bytes(lazymoe.merge(local, tmp_path / "local", max_shard_bytes="150KB",
                                                     progress=False))


def test_a_failing_router_pass_stops_the_merge_and_commits_nothing(hub, published, tiny_world, tmp_path,
                                                                   monkeypatch):
    import threading

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import ConfigError
    from lazymoe.pipeline import merge as merging

    def failing(*args, **kwargs):
        raise ConfigError("experts[1]'s positive prompts have no token besides BOS; give it a few words.")

    monkeypatch.setattr(merging, "compute_gates", failing)
    cfg, _ = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    with pytest.raises(ConfigError, match=r"^experts\[1\]'s positive prompts"):
        merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", keep=False, token=ALICE_WRITE_TOKEN,
                               max_shard_bytes="150KB", progress=False)
    assert hub.requests_of("commit") == [] and list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "lazymoe-router"]


def test_weights_are_fetched_while_the_tokenizer_is_checked_and_a_failed_check_touches_no_repo(
        hub, published, tiny_world, tmp_path, monkeypatch):
    """Loading the base tokenizer (transformers' import, seconds) no longer holds back the first fetch; where
    the tokenizer's files cannot decide the check (transformers 4, a chat template: simulated here), the repo is
    created and shards are uploaded only once the check has passed, so a bad tokenizer stops the merge with its
    own error, leaves nothing on disk and nothing on the Hub."""
    import threading

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import ModelMismatchError
    from lazymoe.moe import checks
    from lazymoe.pipeline import merge as merging

    fetched_meanwhile = []

    def slow_bad_tokenizer(config, base):
        deadline = time.monotonic() + 60
        while not tensor_ranges(hub) and time.monotonic() < deadline:
            time.sleep(0.01)
        fetched_meanwhile.append(bool(tensor_ranges(hub)))
        raise ModelMismatchError(f"base_model ({config.base_model}): its tokenizer cannot be loaded (OSError: x).")

    monkeypatch.setattr(checks, "check_tokenizer", slow_bad_tokenizer)
    monkeypatch.setattr(checks, "check_tokenizer_files", lambda config, base: False)  # undecided: wait for the load
    cfg, _ = hub_and_local(tiny_world, gate_mode="random", seed=1)
    with pytest.raises(ModelMismatchError, match=r"^base_model \(lazyorg/tiny-base\): its tokenizer cannot be loaded"):
        merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", keep=False, token=ALICE_WRITE_TOKEN,
                               max_shard_bytes="150KB", progress=False)
    assert fetched_meanwhile == [True], "the first weights were fetched while the tokenizer was checked"
    assert "alice/tiny-moe" not in hub.repos, "no repo is created for a merge that fails its checks"
    assert hub.requests_of("lfs-upload") == [] and hub.requests_of("commit") == []
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name in ("lazymoe-router", "lazymoe-tokenizer")]


def test_no_model_is_downloaded_whole_before_the_tokenizer_check_has_passed(hub, published, tiny_world, tmp_path,
                                                                            monkeypatch):
    """classifier loads the whole base (gigabytes at 7B): unlike ranges, that download waits for the check."""
    from lazymoe.errors import ModelMismatchError
    from lazymoe.moe import checks

    def slow_bad_tokenizer(config, base):
        time.sleep(0.5)
        raise ModelMismatchError(f"base_model ({config.base_model}): its tokenizer cannot be loaded (OSError: x).")

    cfg, _ = hub_and_local(tiny_world, gate_mode="classifier", seed=1)
    assert lazymoe.make_plan(cfg, progress=False).whole_models
    monkeypatch.setattr(checks, "check_tokenizer", slow_bad_tokenizer)
    monkeypatch.setattr(checks, "check_tokenizer_files", lambda config, base: False)  # undecided: wait for the load
    hub.reset_counters()
    with pytest.raises(ModelMismatchError, match="its tokenizer cannot be loaded"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    whole = [r for r in hub.requests_of("resolve") if r.method == "GET" and r.path.endswith(".safetensors")
             and not r.range]
    assert whole == [] and tensor_ranges(hub) == [] and list(tmp_path.iterdir()) == []


def test_a_push_whose_tokenizer_files_decide_the_check_uploads_while_the_tokenizer_loads(
        hub, published, tiny_world, tmp_path, monkeypatch):
    """hidden tokenises its prompts, so the merge loads the base tokenizer (transformers' import: seconds, longer
    than fetching a small first shard); its files already decided the check (they load, fit the embedding, the
    prompts fit the context), so the repo is created and the first shard uploaded while the tokenizer loads."""
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.moe import checks
    from lazymoe.pipeline import merge as merging

    real = checks.load_tokenizer
    uploaded_meanwhile = []

    def slow_tokenizer(config, base):
        deadline = time.monotonic() + 60
        while not hub.requests_of("lfs-upload", status=200) and time.monotonic() < deadline:
            time.sleep(0.01)
        uploaded_meanwhile.append(bool(hub.requests_of("lfs-upload", status=200)))
        return real(config, base)

    monkeypatch.setattr(checks, "load_tokenizer", slow_tokenizer)
    cfg, local = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    out, pushed = merging.merge_and_push(cfg, tmp_path / "tiny-moe", "tiny-moe", token=ALICE_WRITE_TOKEN,
                                         max_shard_bytes="150KB", progress=False)
    assert uploaded_meanwhile == [True], "a shard was uploaded before the tokenizer had loaded"
    assert len(hub.requests_of("commit", status=200)) == 1
    ref = lazymoe.merge(local, tmp_path / "local", progress=False, max_shard_bytes="150KB")
    names = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(names) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == names
    for name in [*names, "model.safetensors.index.json", "config.json"]:  # the local merge's bytes
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_a_fetch_failure_stops_the_router_pass_too(hub, published, tiny_world, tmp_path):
    import threading

    cfg, _ = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    plan = lazymoe.make_plan(cfg, progress=False)
    assert plan.router_overlaps
    hub.fail("resolve", nth=4, times=None)
    with pytest.raises(HubError, match=r"^Downloading model.*safetensors of lazyorg/tiny-\w+ failed"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, plan=plan)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "lazymoe-router"], "the pass ended with the merge"
    assert not [p for p in range_cache_dir().rglob("*.incomplete")]


@pytest.mark.parametrize("mode,low_disk", [("classifier", False), ("hidden_avg", True), ("cheap_embed", True)])
def test_each_router_pass_beside_the_writer_gives_the_local_merges_bytes(hub, published, tiny_world, tmp_path, mode,
                                                                         low_disk):
    """classifier (not low-disk) fits on the MoE itself, reading every expert's MLPs as the writer does: two readers
    on the same fetched tensors; hidden_avg reads the base layer by layer, cheap_embed the embeddings only. Each
    shares one stream of fetches with the writer, fetches every tensor once, and gives a local merge's bytes."""
    cfg, local = hub_and_local(tiny_world, gate_mode=mode, seed=3, router_continuation_tokens=0)
    plan = lazymoe.make_plan(cfg, progress=False, low_disk=low_disk, max_shard_bytes="120KB")
    assert plan.router_overlaps and len(plan.shards) > 3
    out = lazymoe.merge(cfg, tmp_path / "hub", progress=False, plan=plan)
    fetched = sum(r.response_bytes for r in tensor_ranges(hub))
    assert fetched == plan.download_bytes, "every tensor fetched once, though two passes read some"
    if low_disk:
        assert [p for p in range_cache_dir().rglob("*") if p.is_file()] == [], "each deleted once both passed it"
    expected = lazymoe.merge(local, tmp_path / "local", progress=False, low_disk=low_disk, max_shard_bytes="120KB")
    assert raw_bytes(out) == raw_bytes(expected)


@pytest.mark.parametrize("mode", ["hidden", "classifier"])
def test_no_chunk_reaches_into_another_shard_even_where_the_router_pass_reads_first(hub, published, tiny_world,
                                                                                     tmp_path, mode):
    # a shard is complete, and goes to the Hub, when its own bytes are in: a chunk of the base's layer (read by
    # the router pass at the layer's first shard) reaching into the next shard made the upload wait for that
    # shard's bytes too (0.4 s of an idle link per push at 20 MB/s)
    from lazymoe.io.fetch import Read, plan_chunks

    cfg, _ = hub_and_local(tiny_world, gate_mode=mode, seed=3, router_continuation_tokens=0)
    plan = lazymoe.make_plan(cfg, progress=False, max_shard_bytes="120KB")
    assert plan.router_overlaps
    reads = [Read(*r) for r in plan.reads()]
    shard_of: dict[tuple[str, str], int] = {}
    for r in reads:
        if not r.router:
            shard_of.setdefault((r.ref, r.name), r.group)
    chunks, _ = plan_chunks(plan.models, reads, tmp_path / "ranges")
    shared = [c for c in chunks if any(r.router for r in reads if (r.ref, r.name) in {(c.ref, n) for n in c.names})]
    assert shared, "the router pass reads some of the writer's tensors"
    for c in chunks:
        shards = {shard_of[(c.ref, n)] for n in c.names if (c.ref, n) in shard_of}
        assert len(shards) <= 1, (c.names, shards)
    assert sum(len(c.names) for c in chunks) == len({(r.ref, r.name) for r in reads})


def test_ctrl_c_while_writing_ends_the_router_pass_and_leaves_nothing(hub, published, tiny_world, tmp_path,
                                                                      monkeypatch):
    import threading

    from lazymoe.moe import writer

    copy, calls = writer.copy_bytes, []

    def interrupted(info, dst):  # the user presses Ctrl-C while the third tensor is copied
        calls.append(info)
        if len(calls) == 3:
            raise KeyboardInterrupt
        copy(info, dst)

    monkeypatch.setattr(writer, "copy_bytes", interrupted)
    cfg, _ = hub_and_local(tiny_world, gate_mode="hidden", seed=1)
    with pytest.raises(KeyboardInterrupt):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, low_disk=True, max_shard_bytes="150KB")
    assert list(tmp_path.iterdir()) == [], "nothing half-written is left"
    assert not [t for t in threading.enumerate() if t.name in ("lazymoe-router", "lazymoe-fetch-feeder")]
    assert not [p for p in range_cache_dir().rglob("*") if p.is_file()], "low-disk: no fetched range is kept"


def test_records_of_merges_never_finished_are_swept_after_a_week(tmp_path):
    import os

    from lazymoe.publish.resume import RECORD_MAX_AGE_S, PushState, UploadedShard

    root = tmp_path / "pushes"
    old = PushState("https://hub.example", "alice/abandoned", "a" * 16, root=root)
    old.record("model-00001-of-00002.safetensors", UploadedShard("0" * 64, 10, b"x"))
    old.save_gates(b"\0" * 16, (1, 1, 4))
    recent = PushState("https://hub.example", "alice/recent", "b" * 16, root=root)
    recent.record("model-00001-of-00002.safetensors", UploadedShard("1" * 64, 10, b"y"))
    mine = PushState("https://hub.example", "alice/mine", "c" * 16, root=root)
    mine.record("model-00001-of-00002.safetensors", UploadedShard("2" * 64, 10, b"z"))
    stale = __import__("time").time() - RECORD_MAX_AGE_S - 60
    for path in (old.path, old.gates_path, mine.path):
        os.utime(path, (stale, stale))
    unrelated = root / "notes.txt"
    unrelated.write_text("not a record")

    again = PushState("https://hub.example", "alice/mine", "c" * 16, root=root)  # the next streamed push of "mine"

    assert not old.path.exists() and not old.gates_path.exists() and not old.path.parent.exists(), "swept, folder too"
    assert recent.path.exists(), "a record written within the week stays"
    assert again.shards == mine.shards and mine.path.exists(), "the push's own record is never swept"
    assert unrelated.exists(), "only records are touched"


def _pipeline_seconds(shards: list[tuple[int, int]], bandwidth: float) -> float:
    """A pipeline that fetches each shard's bytes back to back at full speed, in the order given, and uploads
    each shard as soon as it is complete and the link is free. ``shards``: (bytes fetched for it, its bytes)."""
    fetched = free = 0.0
    for fetch, size in shards:
        fetched += fetch / bandwidth
        free = max(free, fetched) + size / bandwidth
    return free


def test_the_hub_benchmarks_transfer_floor_is_never_above_a_pipeline_that_fetches_in_any_order():
    import itertools
    import random

    from hub_bench import transfer_floor_bytes

    def floor(shards: list[tuple[int, int]]) -> int | None:  # (fetched, size): each shard reads its own tensor
        layout = [({("m", f"t{i}"): f} if f else {}, size) for i, (f, size) in enumerate(shards)]
        return transfer_floor_bytes(sum(f for f, _ in shards), sum(s for _, s in shards), layout)

    # nine equal shards and the routers' small one (181 bytes out): the floor is the output plus one shard less
    # the computed byte. The routers' shard sent first reaches it; sent last, one byte-time above it
    shards = [(20, 20)] * 9 + [(0, 1)]
    assert floor(shards) == 181 + 20 - 1
    assert _pipeline_seconds(shards[-1:] + shards[:-1], 1.0) == 200 and _pipeline_seconds(shards, 1.0) == 201
    rng = random.Random(7)
    for _ in range(600):
        shards = [(f, f) for f in (rng.randint(1, 50) for _ in range(rng.randint(1, 5)))]
        extra = rng.random()
        if extra < 0.3:
            shards.append((0, rng.randint(1, 4)))  # the routers' shard: computed, nothing fetched
        elif extra < 0.5:
            f = rng.randint(2, 40)
            shards.append((f, 2 * f))  # a widening cast: half of it counts as computed
        elif extra < 0.7:
            f = rng.randint(2, 40)
            shards.append((2 * f, f))  # a narrowing cast
        best = min(_pipeline_seconds(list(o), 1.0) for o in itertools.permutations(shards))  # every order
        assert floor(shards) <= best + 1e-9, shards
    # a source tensor that feeds two shards is fetched once but would count twice: no floor is claimed
    assert transfer_floor_bytes(100, 150, [({("m", "x"): 50}, 50), ({("m", "x"): 50, ("m", "z"): 50}, 100)]) is None
