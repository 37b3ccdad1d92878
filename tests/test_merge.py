"""End-to-end merges of tiny real checkpoints: exact bytes, exact logits, exact failure behaviour."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import moe_config
from safetensors import safe_open

import lazymoe
from lazymoe.errors import OutputExistsError
from lazymoe.io.sources import ModelRef, describe

ALL_GATE_MODES = ["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random", "centroid",
                  "classifier"]


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def raw_bytes(folder: Path) -> dict[str, bytes]:
    info = describe(ModelRef.parse(str(folder)))
    out = {}
    for name, t in info.tensors.items():
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            out[name] = f.read(t.nbytes)
    return out


def logits(model_dir: Path, text: str = "def add(a, b): return a + b. Once upon a time") -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


@pytest.mark.parametrize("gate_mode", ALL_GATE_MODES)
def test_identical_experts_reproduce_the_dense_model(tiny_world, tmp_path, gate_mode):
    # With every expert equal to the base, any routing mixes identical MLP outputs with weights that sum
    # to one, so the MoE must compute exactly the dense function.
    cfg = moe_config(tiny_world["base"], [tiny_world["same1"], tiny_world["same2"]], gate_mode=gate_mode,
                     allow_all_same_experts=True)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    moe, dense = logits(out), logits(tiny_world["base"])
    assert torch.allclose(moe, dense, atol=1e-5, rtol=0), (moe - dense).abs().max()


@pytest.fixture(scope="module")
def merged(tiny_world, tmp_path_factory):
    experts = [tiny_world["chat"], tiny_world["code"], tiny_world["math"], tiny_world["base"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode="cheap_embed", experts_per_token=2)
    cfg["experts"][1]["residual_scale"] = 0.5
    cfg["experts"][2]["noise_scale"] = 0.01
    out = tmp_path_factory.mktemp("merged") / "moe"
    lazymoe.merge(cfg, out, max_shard_bytes="60KB", progress=False)
    return cfg, out


def test_non_mlp_tensors_are_byte_identical_to_the_base(merged, tiny_world):
    _, out = merged
    base, moe = raw_bytes(tiny_world["base"]), raw_bytes(out)
    shared = [n for n in base if ".mlp." not in n]
    assert shared and all(moe[n] == base[n] for n in shared)
    assert not any(".mlp." in n for n in moe), "dense MLP names must not leak into the MoE"


def test_expert_tensors_map_exactly_to_their_sources(merged, tiny_world):
    cfg, out = merged
    moe = tensors_of(out)
    moe_raw = raw_bytes(out)
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for e, expert in enumerate(cfg["experts"]):
        src_raw = raw_bytes(Path(expert["source_model"]))
        src = tensors_of(Path(expert["source_model"]))
        for layer in range(2):
            for part, w in names.items():
                dense_name = f"model.layers.{layer}.mlp.{part}.weight"
                moe_name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                if e == 1 and part == "down_proj":
                    assert torch.equal(moe[moe_name], src[dense_name] * 0.5)
                elif e == 2:
                    diff = moe[moe_name] - src[dense_name]
                    assert 0.005 < diff.std().item() < 0.02  # noise of sigma 0.01 was added
                else:
                    assert moe_raw[moe_name] == src_raw[dense_name]


def test_noise_is_reproducible_from_the_saved_config(merged, tmp_path):
    cfg, out = merged
    saved = yaml.safe_load((out / "lazymoe_config.yml").read_text())
    assert isinstance(saved["seed"], int)
    again = lazymoe.merge(saved, tmp_path / "again", max_shard_bytes="60KB", progress=False)
    assert raw_bytes(again) == raw_bytes(out)


def test_gates_are_unit_rows_of_the_cheap_embedding(merged):
    _, out = merged
    moe = tensors_of(out)
    g0, g1 = moe["model.layers.0.block_sparse_moe.gate.weight"], moe["model.layers.1.block_sparse_moe.gate.weight"]
    assert g0.shape == (4, 64)
    assert torch.allclose(g0.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(g0, g1)  # cheap_embed uses one vector for every layer


def test_shards_respect_the_byte_limit_and_the_index_is_complete(merged):
    _, out = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 1 and {f.name for f in files} == set(index["weight_map"].values())
    tensors = describe(ModelRef.parse(str(out))).tensors
    assert {n: t.file.name for n, t in tensors.items()} == index["weight_map"]
    for f in files:
        in_file = [t for t in tensors.values() if t.file.name == f.name]
        assert sum(t.nbytes for t in in_file) <= 60_000 or len(in_file) == 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())


def test_output_config_tokenizer_and_generation(merged, tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, out = merged
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((tiny_world["base"] / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    assert config["rope_parameters"] == base_config["rope_parameters"]
    assert config["rope_theta"] == base_config["rope_parameters"]["rope_theta"]  # for transformers 4.x readers
    assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
    assert config["torch_dtype"] == "float32" and "dtype" not in config
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_world["base"] / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token is None and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = tok("Hello", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    saved = yaml.safe_load((out / "lazymoe_config.yml").read_text())
    assert saved["experts"][1]["residual_scale"] == 0.5 and saved["gate_mode"] == "cheap_embed"


def test_tied_embeddings_base(tmp_path, tiny_world):
    from lazymoe.demo import build_model

    base = build_model(tmp_path / "tied", tokenizer_dir=tiny_world["tokenizer"], tie_word_embeddings=True,
                       initializer_range=0.2)
    experts = [build_model(tmp_path / f"e{i}", tokenizer_dir=tiny_world["tokenizer"], base=base) for i in range(2)]
    cfg = moe_config(base, experts, gate_mode="random", allow_all_same_experts=True)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert "lm_head.weight" not in tensors_of(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.allclose(logits(out), logits(base), atol=1e-5, rtol=0)


def test_fused_layout_loads_with_the_same_logits(tiny_world, tmp_path):
    experts = [tiny_world["chat"], tiny_world["code"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode="random", seed=7)
    classic = lazymoe.merge(cfg, tmp_path / "classic", progress=False)
    fused = lazymoe.merge(cfg, tmp_path / "fused", layout="fused", progress=False)
    names = set(tensors_of(fused))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    assert torch.allclose(logits(classic), logits(fused), atol=1e-6, rtol=0)


def test_bfloat16_output_converts_every_tensor(tiny_world, tmp_path):
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", dtype="bfloat16")
    out = lazymoe.merge(cfg, tmp_path / "bf16", progress=False)
    moe, base = tensors_of(out), tensors_of(tiny_world["base"])
    assert {t.dtype for t in moe.values()} == {torch.bfloat16}
    assert torch.equal(moe["model.embed_tokens.weight"], base["model.embed_tokens.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------ failure behaviour


def test_a_failed_merge_leaves_no_folder_and_no_debris(tiny_world, tmp_path, monkeypatch):
    import lazymoe.moe.writer as writer

    calls = {"n": 0}
    real = writer.copy_bytes

    def dying_copy(info, dst):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the user pressed Ctrl-C / stopped the Colab cell mid-write
        real(info, dst)

    monkeypatch.setattr(writer, "copy_bytes", dying_copy)
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    before = {p: p.stat().st_mtime_ns for p in tiny_world["base"].iterdir()}
    with pytest.raises(KeyboardInterrupt):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in tiny_world["base"].iterdir()} == before


def test_existing_folders_are_never_clobbered(tiny_world, tmp_path):
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not made by lazymoe"):
        lazymoe.merge(cfg, mine, progress=False, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"

    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    with pytest.raises(OutputExistsError, match="pass overwrite=True to replace it"):
        lazymoe.merge(cfg, out, progress=False)
    lazymoe.merge(cfg, out, progress=False, overwrite=True)
    assert (out / "config.json").is_file() and len(list(tmp_path.iterdir())) == 2

    with pytest.raises(OutputExistsError, match="overlaps the input model"):
        lazymoe.merge(cfg, tiny_world["base"] / "moe", progress=False)


def test_low_disk_order_writes_the_same_tensors_one_model_at_a_time(tiny_world, tmp_path):
    experts = [tiny_world["chat"], tiny_world["base"], tiny_world["code"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode="random", seed=3, experts_per_token=2)
    plan = lazymoe.make_plan(cfg, low_disk=True, progress=False)
    order = [t.pieces[0].model for t in plan.tensors if t.expert is not None]
    # base-sourced experts first, then each other model in one contiguous run
    runs = [m for i, m in enumerate(order) if i == 0 or order[i - 1] != m]
    assert runs == [str(tiny_world["base"]), str(tiny_world["chat"]), str(tiny_world["code"])]
    inputs = {p: p.read_bytes() for e in experts for p in e.iterdir()}
    normal = lazymoe.merge(cfg, tmp_path / "normal", progress=False)
    low = lazymoe.merge(cfg, tmp_path / "low", progress=False, low_disk=True)
    assert raw_bytes(low) == raw_bytes(normal)
    assert {p: p.read_bytes() for e in experts for p in e.iterdir()} == inputs, "local inputs are never touched"


def test_not_enough_disk_is_refused_before_any_work(tiny_world, tmp_path, monkeypatch):
    from lazymoe.errors import InsufficientResourcesError
    from lazymoe.pipeline import merge as merging

    monkeypatch.setattr(merging, "free_disk_bytes", lambda path: 1000)
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    with pytest.raises(InsufficientResourcesError, match="needs about .* of free disk .* only 1.0 KB is free") as caught:
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert "low_disk" not in str(caught.value), "local models: nothing is downloaded, low-disk mode cannot help"


def test_low_disk_mode_is_suggested_only_where_it_needs_less_disk(tiny_world, tmp_path, monkeypatch):
    import dataclasses

    from lazymoe.moe import plan as planning
    from lazymoe.pipeline.merge import _low_disk_hint

    # models bigger than the fetch window, at this scale: low-disk mode keeps one window of ranges, not all
    monkeypatch.setattr(planning, "FETCH_WINDOW_MIN", 0)

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    local = lazymoe.make_plan(cfg, progress=False)
    assert _low_disk_hint(local) == ""
    # the same models on the Hub, not yet downloaded: low-disk keeps only the base and one expert at a time
    remote = {ref: dataclasses.replace(info, ref=ModelRef(ref, repo_id=f"org/m{i}"), tensors={
        n: dataclasses.replace(t, file=tmp_path / "not-downloaded") for n, t in info.tensors.items()})
        for i, (ref, info) in enumerate(local.models.items())}
    hub = dataclasses.replace(local, models=remote, download_bytes=sum(m.weight_bytes for m in remote.values()),
                              max_shard_bytes=10_000)
    assert str(_low_disk_hint(hub)) == ", or pass low_disk=True (low-disk mode)"
    assert _low_disk_hint(dataclasses.replace(hub, low_disk=True)) == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "fused", "low_disk": True}, "low_disk needs the classic layout"),
        ({"layout": "packed"}, "layout must be one of classic, fused, got 'packed'"),
        ({"device": "tpu:0"}, "your device= argument 'tpu:0' is not a device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_merge_options_are_refused_before_any_work(tiny_world, tmp_path, kwargs, message):
    from lazymoe.errors import ConfigError

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="hidden")
    with pytest.raises(ConfigError, match=re.escape(message)):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a GPU-less machine gives")
def test_asking_for_cuda_without_a_gpu_names_the_fix(tiny_world, tmp_path):
    from lazymoe.errors import ConfigError

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="hidden")
    with pytest.raises(ConfigError, match="your device= argument asks for cuda but this machine has no CUDA GPU; "
                                          "pass device='cpu'"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, device="cuda")


def test_a_write_the_os_refuses_is_one_line_saying_what_to_do(tiny_world, tmp_path, monkeypatch):
    import errno

    import lazymoe.moe.writer as writer
    from lazymoe.errors import WriteError

    def refused(dst, data):  # e.g. a network folder that turned read-only mid-write (a full disk: test_hostile_inputs)
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer, "write_all", refused)
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random")
    with pytest.raises(WriteError, match=r"failed \(Permission denied\): no permission to write there\. Choose a folder"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_source_is_named_with_what_to_do(tiny_world, tmp_path):
    from lazymoe.errors import ModelFileError

    broken = shutil.copytree(tiny_world["chat"], tmp_path / "chat")
    shard = broken / "model.safetensors"
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], broken], gate_mode="random", dtype="bfloat16")
    plan = lazymoe.make_plan(cfg, progress=False)  # planned from the intact headers
    from lazymoe.io.safetensors import read_header

    _, data_start = read_header(shard)
    with open(shard, "r+b") as f:
        f.truncate(data_start + 8)  # then the file loses its tensors (a copy that stopped early)
    with pytest.raises(ModelFileError, match="ended early .* Download the model again"):
        lazymoe.merge(cfg, tmp_path / "moe", progress=False, plan=plan)
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("gate_mode", ["random", "hidden"])
def test_a_bad_base_tokenizer_fails_a_local_merge_and_leaves_nothing(tiny_world, tmp_path, gate_mode):
    # the tokenizer is checked on a thread while a merge without prompts copies (pipeline.merge._TokenizerCheck):
    # its failure must still stop the merge with the plan's message, before the output is made final
    from lazymoe.errors import ModelMismatchError

    base = tmp_path / "base"
    shutil.copytree(tiny_world["base"], base)
    (base / "tokenizer.json").write_text("{not json", encoding="utf-8")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cfg = moe_config(base, [tiny_world["chat"], tiny_world["code"]], gate_mode=gate_mode)
    out = tmp_path / "moe"
    with pytest.raises(ModelMismatchError, match=r"base_model \(.*\): its tokenizer cannot be loaded"):
        lazymoe.merge(cfg, out, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no output, no work folder


def test_a_merge_loads_the_base_tokenizer_once(tiny_world, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    loads = []
    real = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real(cls, *a, **k)))
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="hidden")
    lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    assert loads == [str(tiny_world["base"])]
