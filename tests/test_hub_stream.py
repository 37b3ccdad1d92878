"""Hub to Hub: a merge fetches only the bytes it reads, by ranges, with the real huggingface_hub client against
tests/hubserver.py (which counts the bytes it sends and receives)."""

from __future__ import annotations

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
    """The ranged weight reads that are not header reads (``describe`` reads 8 bytes, then the header)."""
    out = []
    for r in hub.requests_of("resolve"):
        if r.path.endswith(".safetensors") and r.range and not r.range.startswith(("bytes=0-7", "bytes=8-")):
            out.append(r)
    return out


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
