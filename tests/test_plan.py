"""The plan is computed from configs and headers alone; every incompatibility is refused up front.

Models here are header-only safetensors files (sparse, so a 7B-shaped model costs no disk): if the
planner read a single weight, these tests would fail on the missing data.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import moe_config
from hypothesis import given, settings
from hypothesis import strategies as st

from lazymoe.config import load_config
from lazymoe.errors import ConfigError, ModelMismatchError, ModelNotFoundError
from lazymoe.io.safetensors import build_header
from lazymoe.moe import checks
from lazymoe.moe import plan as planning
from lazymoe.pipeline.merge import make_plan
from lazymoe.units import parse_bytes

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 32768,
}


def llama_shapes(c: dict, *, drop: str | None = None, extra_layers: int = 0) -> dict[str, tuple[int, ...]]:
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not c.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (V, H)
    for layer in range(c["num_hidden_layers"] + extra_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, c["num_attention_heads"] * hd),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    shapes.pop(drop, None)
    return shapes


def header_only_model(folder: Path, config: dict, shapes: dict | None = None, tokenizer: Path | None = None) -> Path:
    """A model folder whose safetensors file has a real header and a sparse (unwritten) data section."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shapes = shapes if shapes is not None else llama_shapes(config)
    entries = [(n, "BF16", s, 2 * _numel(s)) for n, s in shapes.items()]
    header = build_header(entries)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(e[3] for e in entries))
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_for(tmp_path, base_cfg: dict, expert_cfgs: list[dict], shapes=None, **kw) -> planning.MergePlan:
    base = header_only_model(tmp_path / "base", base_cfg)
    experts = [header_only_model(tmp_path / f"e{i}", c, (shapes or {}).get(i)) for i, c in enumerate(expert_cfgs)]
    config = load_config(moe_config(base, experts, **kw))
    from lazymoe.io.sources import ModelRef, describe

    models = {ref: describe(ModelRef.parse(ref)) for ref in config.model_refs()}
    warnings = checks.check_models(config, models)
    return planning.build_plan(config, models, warnings=warnings, max_shard_bytes=parse_bytes("5GB"))


def test_four_mistral_7b_experts_top2(tmp_path):
    p = plan_for(tmp_path, MISTRAL_7B, [MISTRAL_7B] * 4, dtype=None)
    assert round(p.total_params / 1e9, 1) == 24.2
    assert round(p.active_params / 1e9, 1) == 12.9
    assert p.dtype == "bfloat16" and p.output_bytes == 2 * p.total_params
    assert len(p.shards) == 11 and all(s.nbytes <= 5e9 for s in p.shards)
    # as many shards as cutting at 5 GB makes, evened out: the plain cut's largest is 4.99 GB (its last 3.72 GB)
    sizes = [t.nbytes for s in p.shards[:-1] for t in s.tensors]
    plain = [sum(g) for g in _cut_plainly(sizes, int(5e9))]
    assert len(plain) == 10 and max(plain) == 4_991_287_296 and plain[-1] == 3_718_291_456
    assert max(s.nbytes for s in p.shards) == 4_859_158_528 and min(s.nbytes for s in p.shards[:-1]) > 4.78e9
    # the routers (what the router pass computes) in a small last shard of their own, after every weight
    *weights, routers = p.shards
    assert [t.name for t in routers.tensors] == [f"model.layers.{n}.block_sparse_moe.gate.weight" for n in range(32)]
    assert routers.nbytes == 32 * 4 * 4096 * 2 and all(t.gate_layer is None for s in weights for t in s.tensors)
    assert [t for s in p.shards for t in s.tensors] == p.tensors, "the write order is the shards' order"
    assert p.out_config["sliding_window"] == 4096 and p.out_config["num_local_experts"] == 4
    assert p.read_bytes == p.output_bytes - 32 * 4 * 4096 * 2  # everything but the routers is read once
    # the hidden pass streams the base: bf16 embeddings + one decoder layer, not the 14.5 GB model
    layer0 = sum(_numel(s) for n, s in llama_shapes(MISTRAL_7B).items() if n.startswith("model.layers.0."))
    assert p.router_pass_bytes == 2 * (32000 * 4096 + layer0) < 1.2e9
    # the router pass runs while the shards are written: its layer and the writer's three embedding-sized
    # tensors (one read, its float32 copy, the cast) are in memory at once
    assert p.router_overlaps and p.peak_ram_bytes == p.router_pass_bytes + 3 * 2 * 32000 * 4096 + 600e6 < 2.2e9


def _cut_plainly(sizes: list[int], cap: int) -> list[list[int]]:
    """Packing in order, a group closed before it would exceed ``cap``: transformers' and mergekit's cut."""
    groups: list[list[int]] = [[]]
    for n in sizes:
        if groups[-1] and sum(groups[-1]) + n > cap:
            groups.append([])
        groups[-1].append(n)
    return groups


def _least_largest(sizes: list[int], count: int, cap: int) -> int:
    """By trying every cut: the least largest group of ``sizes`` cut into at most ``count`` groups, each within
    ``cap`` unless it is one size alone."""
    best = None
    for k in range(count):
        for cuts in itertools.combinations(range(1, len(sizes)), k):
            bounds = [0, *cuts, len(sizes)]
            groups = [sizes[a:b] for a, b in zip(bounds, bounds[1:])]
            if all(len(g) == 1 or sum(g) <= cap for g in groups):
                largest = max(map(sum, groups))
                best = largest if best is None else min(best, largest)
    return best


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=9), st.integers(1, 150))
def test_shards_are_as_many_as_a_plain_cut_makes_with_the_largest_as_small_as_any_cut_allows(sizes, cap):
    starts = planning.even_cuts(sizes, cap)
    groups = [sizes[a:b] for a, b in zip(starts, [*starts[1:], len(sizes)])]
    plain = _cut_plainly(sizes, cap)
    assert [n for g in groups for n in g] == sizes and all(groups), "every tensor once, in its order"
    assert len(groups) == len(plain), "no more shards than the plain cut"
    assert all(len(g) == 1 or sum(g) <= cap for g in groups), "no shard over the limit but a tensor alone"
    assert max(map(sum, groups)) == _least_largest(sizes, len(plain), cap) <= max(map(sum, plain))


def test_parse_bytes():
    assert parse_bytes("2GB") == 2_000_000_000
    assert parse_bytes("1.5GiB") == int(1.5 * 1024**3)
    assert parse_bytes("500 MB") == 500_000_000
    for bad in ("lots", "-1GB", "2XB"):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_bytes(bad)


def small(**overrides) -> dict:
    c = dict(MISTRAL_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)
    c.update(overrides)
    return c


@pytest.mark.parametrize(
    ("expert", "shapes", "message"),
    [
        (small(model_type="qwen2"), None, "experts[0] (", ),
        (small(hidden_size=128), None, "has hidden size hidden_size=128 but the base has 64"),
        (small(intermediate_size=256), None, "intermediate (MLP) size intermediate_size=256"),
        (small(num_hidden_layers=3), None, "layer count num_hidden_layers=3"),
        (small(num_key_value_heads=4), None, "key/value head count num_key_value_heads=4"),
        (small(rope_theta=1e6), None, "RoPE settings {'rope_theta': 1000000.0}"),
        (small(rope_scaling={"type": "linear", "factor": 2.0}), None,
         "RoPE settings {'rope_theta': 10000.0, 'factor': 2.0, 'rope_type': 'linear'}"),
        (small(), llama_shapes(small(), drop="model.layers.1.mlp.up_proj.weight"),
         "has no tensor model.layers.1.mlp.up_proj.weight"),
        (small(), llama_shapes(small(), extra_layers=1), "has tensors for layer 2 but config says 2 layers"),
    ],
)
def test_incompatible_experts_are_refused_from_headers(tmp_path, expert, shapes, message):
    with pytest.raises(ModelMismatchError) as err:
        plan_for(tmp_path, small(), [small(), expert], shapes={1: shapes} if shapes else None)
    text = str(err.value)
    assert message.replace("experts[0]", "experts[1]") in text and "experts[1]" in text


def test_rope_written_by_transformers_4_or_5_is_the_same_rope(tmp_path):
    # a base saved by transformers 4 (rope_theta/rope_scaling) and experts saved by 5 (rope_parameters)
    v4 = small(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    v5 = {k: v for k, v in small().items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}
    plan_for(tmp_path, v4, [v5, v5])
    v5["rope_parameters"]["factor"] = 4.0
    with pytest.raises(ModelMismatchError, match="RoPE settings .*'factor': 4.0.* but the base has .*'factor': 2.0"):
        plan_for(tmp_path / "again", v4, [v5, v5])


def test_different_family_names_the_fix(tmp_path):
    with pytest.raises(ModelMismatchError) as err:
        plan_for(tmp_path, small(), [small(), small(model_type="qwen2")])
    assert str(err.value) == (
        "This merge mixes model families (llama and qwen2): llama: base_model (mistral), experts[0] (mistral); "
        "qwen2: experts[1] (qwen2). Every model of a MoE must share the base's architecture (fine-tunes of one "
        "base model); remove the others.")


def test_unsupported_base_family(tmp_path):
    with pytest.raises(ModelMismatchError, match=r"base_model .* is a 'gpt2' model; lazymoe merges llama, mistral, qwen2, qwen3 models\."):
        plan_for(tmp_path, small(model_type="gpt2"), [small(), small()])


def test_llama_expert_under_mistral_base_is_a_warning(tmp_path):
    p = plan_for(tmp_path, small(), [small(), small(model_type="llama")])
    assert any("their MLPs are compatible" in w for w in p.warnings)


def test_vocab_mismatch_of_an_expert_is_a_warning(tmp_path):
    other = small(vocab_size=302)
    p = plan_for(tmp_path, small(), [small(), other], shapes={1: llama_shapes(other)})
    assert any("vocabulary of 302 tokens, the base 300" in w for w in p.warnings)


def test_non_power_of_two_experts_are_not_warned_about(tmp_path):
    # llama.cpp 0.3.36 runs 3-expert Mixtral, Qwen MoE and Qwen3 MoE files with F16 logits within 0.006 of
    # transformers (tests/test_gguf_families.py), so mergekit's "not usable in llama.cpp" warning is stale
    p = plan_for(tmp_path, small(), [small()] * 3, experts_per_token=2)
    assert not any("power of two" in w for w in p.warnings)


def test_missing_lm_head_when_untied(tmp_path):
    with pytest.raises(ModelMismatchError, match="has no lm_head.weight and tie_word_embeddings is false"):
        base = header_only_model(tmp_path / "b", small(), llama_shapes(small(), drop="lm_head.weight"))
        e = [header_only_model(tmp_path / f"x{i}", small()) for i in range(2)]
        make_plan(moe_config(base, e), progress=False)


def test_base_tokenizer_larger_than_embeddings(tmp_path, tiny_world):
    # the demo tokenizer has 512 tokens; this base only embeds 300
    base = header_only_model(tmp_path / "b", small(), tokenizer=tiny_world["tokenizer"])
    e = [header_only_model(tmp_path / f"x{i}", small()) for i in range(2)]
    with pytest.raises(ModelMismatchError, match="the tokenizer has 512 tokens but the embedding only 300 rows"):
        make_plan(moe_config(base, e), progress=False)


def test_unknown_reference(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an existing local folder nor a Hub id"):
        make_plan(moe_config(tmp_path / "nope" / "x y", [tmp_path / "a", tmp_path / "b"]), progress=False)


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(small()))
    (folder / "pytorch_model.bin").write_bytes(b"")
    e = [header_only_model(tmp_path / f"x{i}", small()) for i in range(2)]
    with pytest.raises(ModelNotFoundError, match="no \\*.safetensors weights .*convert them to safetensors"):
        make_plan(moe_config(folder, e), progress=False)


def test_cli_plan_prints_the_table_and_errors_are_one_line(tmp_path, tiny_world):
    import yaml

    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]])
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "lazymoe", "-q", "plan", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "MixtralForCausalLM" in run.stdout and "Active parameters" in run.stdout and "No problems found" in run.stdout

    cfg["gate_mode"] = "hiden"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "lazymoe", "merge", str(path), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: gate_mode: 'hiden'")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
