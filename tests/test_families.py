"""Every input family (Llama 3.x, Mistral, Qwen2, Qwen3) into every output it may take (Mixtral, Qwen MoE,
Qwen3 MoE): the choice of output, the plan, the checks, every gate mode on the family's own layers, and the
equivalences written down in ``lazymoe.arch`` checked against transformers on tiny real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import moe_config
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe import arch, routing
from lazymoe.config import GATE_MODES, parse_config
from lazymoe.demo import build_model, build_tokenizer
from lazymoe.errors import ModelMismatchError
from lazymoe.gates import right_padded
from lazymoe.report import plan_rows

TEXT = "def add(a, b): return a + b. Once upon a time, a dragon"
#: Llama 3.1's RoPE scaling, shrunk so that it changes the frequencies a 2-layer test model uses
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILY_BUILD = {
    "llama3": dict(model_type="llama", rope_scaling=LLAMA3_ROPE),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3_tied": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict]:
    """Per family: a base, a byte-identical copy of it and two perturbed experts (hidden 64, 2 layers)."""
    root = tmp_path_factory.mktemp("families")
    tok = build_tokenizer(root / "tokenizer")
    out = {}
    for name, kwargs in FAMILY_BUILD.items():
        base = build_model(root / name / "base", tokenizer_dir=tok, seed=0, initializer_range=0.2, **kwargs)
        out[name] = {"base": base,
                     "same": build_model(root / name / "same", tokenizer_dir=tok, base=base, perturb=0.0),
                     "e1": build_model(root / name / "e1", tokenizer_dir=tok, base=base, perturb=0.3, seed=11),
                     "e2": build_model(root / name / "e2", tokenizer_dir=tok, base=base, perturb=0.3, seed=12)}
    return out


def logits(folder, text=TEXT) -> torch.Tensor:
    # ids from tokenizer.json itself: transformers 5 picks the tokenizer class from the model type (Qwen2Tokenizer
    # for qwen2, the generic one for qwen2_moe), which splits the demo's SentencePiece vocabulary differently
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def same_config(world, **overrides) -> dict:
    """Two experts identical to the base (distinct prompts, so every gate mode has something to fit)."""
    cfg = moe_config(world["base"], [world["same"], world["base"]], allow_all_same_experts=True,
                     router_continuation_tokens=4)
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------- choosing the output


@pytest.mark.parametrize(("value", "keys"), [
    ("Mixtral", ["mixtral"]),  # mergekit's own names...
    ("Qwen MoE", ["qwen2_moe"]),
    ("Qwen3 MoE", ["qwen3_moe"]),
    ("qwen", ["qwen2_moe", "qwen3_moe"]),  # ...matched as mergekit does: a case-insensitive prefix
    ("QWEN3", ["qwen3_moe"]),
    ("mix", ["mixtral"]),
    ("qwen2_moe", ["qwen2_moe"]),  # model types and class names are accepted too
    ("Qwen2MoeForCausalLM", ["qwen2_moe"]),
    ("qwen2", ["qwen2_moe"]),  # mergekit would find nothing: "Qwen MoE" is Qwen2-MoE
    ("deepseek", []),
    ("llama", []),
])
def test_architecture_is_matched_as_mergekit_matches_it(value, keys):
    assert arch.match_architecture(value) == keys


@pytest.mark.parametrize(("architecture", "family", "shared", "key", "why"), [
    (None, "llama", 0, "mixtral", "the experts are llama models"),
    (None, "llama", 1, "qwen2_moe", "llama experts with a shared expert (Mixtral has no shared expert)"),
    (None, "qwen2", 0, "qwen2_moe", "the experts are qwen2 models"),
    (None, "qwen2", 1, "qwen2_moe", "the experts are qwen2 models"),
    (None, "qwen3", 0, "qwen3_moe", "the experts are qwen3 models"),
    ("qwen", "llama", 0, "qwen2_moe", "architecture: 'qwen' asks for it"),  # Qwen3 MoE holds qwen3 only
    ("qwen", "qwen3", 0, "qwen3_moe", "architecture: 'qwen' asks for it"),
    ("Qwen MoE", "llama", 1, "qwen2_moe", "architecture: 'Qwen MoE' asks for it"),
])
def test_output_follows_the_family_and_the_override(architecture, family, shared, key, why):
    output, reason = arch.choose_output(architecture, family, shared)
    assert (output.key, reason) == (key, why)


@pytest.mark.parametrize(("architecture", "family", "shared", "message"), [
    ("mixtral", "qwen2", 0, "architecture 'mixtral' (Mixtral) cannot hold qwen2 experts: Mixtral holds llama experts"),
    ("mixtral", "llama", 1, "cannot hold llama experts with a shared expert: Mixtral holds llama experts and no shared"),
    ("qwen3", "qwen2", 0, "architecture 'qwen3' (Qwen3 MoE) cannot hold qwen2 experts"),
    (None, "qwen3", 1, "Qwen3 MoE, the only output for qwen3 experts, has no shared expert"),
])
def test_impossible_outputs_say_why(architecture, family, shared, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        arch.choose_output(architecture, family, shared)


def test_shared_experts_use_mergekits_schema_and_round_trip():
    cfg = parse_config({"base_model": "a/b", "gate_mode": "hidden", "architecture": "qwen",
                        "experts": [{"source_model": "c/d", "positive_prompts": ["x"]},
                                    {"source_model": "e/f", "positive_prompts": ["y"]}],
                        "shared_experts": [{"source_model": "a/b", "positive_prompts": ["chat"],
                                            "residual_scale": 0.5}]})
    assert cfg.shared_expert.source_model == "a/b" and cfg.expert_spec(2) is cfg.shared_expert
    assert cfg.model_refs() == ["a/b", "c/d", "e/f"]
    assert parse_config(cfg.to_dict()) == cfg
    again = parse_config({**cfg.to_dict(), "shared_experts": [{"source_model": "g/h"}]})  # prompts optional
    assert again.model_refs()[-1] == "g/h" and "positive_prompts" not in again.to_dict()["shared_experts"][0]


# ------------------------------------------------------------------------------- plan and checks


@pytest.mark.parametrize(("family", "overrides", "output", "reason"), [
    ("llama3", {}, "MixtralForCausalLM", "the experts are llama models"),
    ("mistral", {}, "MixtralForCausalLM", "the experts are llama models"),
    ("qwen2", {}, "Qwen2MoeForCausalLM", "the experts are qwen2 models"),
    ("qwen3", {}, "Qwen3MoeForCausalLM", "the experts are qwen3 models"),
    ("mistral", {"architecture": "qwen"}, "Qwen2MoeForCausalLM", "architecture: 'qwen' asks for it"),
])
def test_plan_names_the_output_and_why(families, family, overrides, output, reason):
    world = families[family]
    plan = lazymoe.make_plan(moe_config(world["base"], [world["e1"], world["e2"]], **overrides), progress=False)
    summary = plan.summary()
    assert (summary["architecture"], summary["output_reason"]) == (output, reason)
    assert plan.out_config["architectures"] == [output]
    rows = dict(plan_rows(plan))  # the table `lazymoe plan` prints and the notebook shows
    assert rows["Input family"] == f"{plan.family} ({FAMILY_BUILD[family]['model_type']} models)"
    assert rows["Output architecture"] == f"{plan.output.name} ({output}, classic layout): {reason}"


def test_qwen2_moe_config_has_every_key_transformers_and_llama_cpp_read(families):
    world = families["mistral"]  # a Mistral base (4096-token window on every layer) asking for Qwen MoE
    cfg = moe_config(world["base"], [world["e1"], world["e2"]], architecture="Qwen MoE",
                     shared_experts=[{"source_model": str(world["same"]), "positive_prompts": ["hi there"]}])
    plan = lazymoe.make_plan(cfg, progress=False)
    out = plan.out_config
    expected = {"model_type": "qwen2_moe", "num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                "shared_expert_intermediate_size": 128, "decoder_sparse_step": 1, "norm_topk_prob": False,
                "mlp_only_layers": [], "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0,
                "qkv_bias": True, "tie_word_embeddings": False, "rope_theta": 10000.0, "head_dim": 16}
    assert {k: out.get(k) for k in expected} == expected
    names = {t.name: t for t in plan.tensors}
    assert names["model.layers.1.self_attn.k_proj.bias"].computed == "zeros"  # Qwen2-MoE always has biases
    assert names["model.layers.1.self_attn.k_proj.bias"].shape == (32,)  # 2 key/value heads of 16
    assert names["model.layers.0.mlp.shared_expert.down_proj.weight"].pieces[0].model == str(world["same"])
    assert names["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert names["model.layers.0.mlp.experts.1.up_proj.weight"].pieces[0].model == str(world["e2"])


def test_qwen_bases_keep_their_biases_and_norms(families):
    for family, extras in (("qwen2", ("q_proj.bias", "k_proj.bias", "v_proj.bias")), ("qwen3", ("q_norm.weight",))):
        world = families[family]
        plan = lazymoe.make_plan(moe_config(world["base"], [world["e1"], world["e2"]]), progress=False)
        names = {t.name: t for t in plan.tensors}
        for extra in extras:
            piece = names[f"model.layers.1.self_attn.{extra}"].pieces[0]
            assert (piece.model, piece.source.name) == (str(world["base"]), f"model.layers.1.self_attn.{extra}")


def test_mixing_families_is_refused_naming_them(families):
    cfg = moe_config(families["qwen2"]["base"], [families["qwen2"]["e1"], families["qwen3"]["e1"]])
    with pytest.raises(ModelMismatchError, match=r"mixes model families \(qwen2 and qwen3\): qwen2: base_model "
                                                 r"\(qwen2\), experts\[0\] \(qwen2\); qwen3: experts\[1\] \(qwen3\)"):
        lazymoe.make_plan(cfg, progress=False)
    cfg = moe_config(families["llama3"]["base"], [families["llama3"]["e1"], families["llama3"]["e2"]],
                     shared_experts=[{"source_model": str(families["qwen2"]["same"])}])
    with pytest.raises(ModelMismatchError, match=r"llama and qwen2.*shared_experts\[0\] \(qwen2\)"):
        lazymoe.make_plan(cfg, progress=False)


def test_outputs_that_cannot_hold_the_inputs_are_refused_before_any_weight_is_read(families):
    world = families["qwen3"]
    with pytest.raises(ModelMismatchError, match="Qwen3 MoE, the only output for qwen3 experts, has no shared expert"):
        lazymoe.make_plan(moe_config(world["base"], [world["e1"], world["e2"]],
                                     shared_experts=[{"source_model": str(world["same"])}]), progress=False)
    world = families["llama3"]
    with pytest.raises(ModelMismatchError, match="RoPE scaling 'llama3', which llama.cpp's qwen2moe does not apply"):
        lazymoe.make_plan(moe_config(world["base"], [world["e1"], world["e2"]], architecture="qwen"), progress=False)


# ------------------------------------------------------------------------------- equivalences (transformers 5)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen3"])
@pytest.mark.parametrize("mode", GATE_MODES)
def test_every_gate_mode_on_identical_experts_gives_the_dense_logits(families, tmp_path, family, mode):
    """Mixtral and Qwen3 MoE renormalise the top-k weights: identical experts give the dense model for any
    router, so every gate mode (each running the family's own layers) must land there, with k < E."""
    world = families[family]
    out = lazymoe.merge(same_config(world, gate_mode=mode, experts_per_token=1), tmp_path / "moe", progress=False)
    dense = logits(world["base"])
    assert dense.std() > 1.0
    assert torch.allclose(logits(out), dense, atol=1e-4, rtol=0), (logits(out) - dense).abs().max()


@pytest.mark.parametrize("mode", GATE_MODES)
def test_qwen2_moe_without_shared_expert_is_dense_iff_every_expert_runs(families, tmp_path, mode):
    """llama.cpp's qwen2moe never renormalises, so neither does lazymoe's Qwen MoE: y = m(x) M(x) with m the
    top-k softmax mass. k = E makes m = 1 (dense logits); k < E does not."""
    world = families["qwen2"]
    out = lazymoe.merge(same_config(world, gate_mode=mode, experts_per_token=2), tmp_path / "all", progress=False)
    assert json.loads((out / "config.json").read_text())["shared_expert_intermediate_size"] == 1
    zeros = load_file(str(next(out.glob("*.safetensors"))))["model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert zeros.shape == (64, 1) and not zeros.any()
    dense = logits(world["base"])
    assert torch.allclose(logits(out), dense, atol=1e-4, rtol=0), (logits(out) - dense).abs().max()
    if mode == "hidden":
        top1 = lazymoe.merge(same_config(world, gate_mode=mode, experts_per_token=1), tmp_path / "k1", progress=False)
        assert (logits(top1) - dense).abs().max() > 1e-2


def _scaled_down_proj_copy(base, factor, folder):
    """The dense base with every down_proj times ``factor``: the dense model whose MLP output is factor * M."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mode", ["hidden", "centroid", "random"])
def test_qwen2_moe_with_shared_expert_is_dense_when_routed_plus_shared_weigh_one(families, tmp_path, mode):
    """y = c m(x) M(x) + sigmoid(g.x) S(x). With S = M, k = E (m = 1) and the constant gate (1/2): c = 1/2 gives
    the dense model, and mergekit's c = 1 gives exactly 1.5 M: the dense model with down_proj x 1.5."""
    world = families["qwen2"]
    shared = [{"source_model": str(world["same"])}]  # no prompts: the constant gate
    cfg = same_config(world, gate_mode=mode, shared_experts=shared)
    for expert in cfg["experts"]:
        expert["residual_scale"] = 0.5
    out = lazymoe.merge(cfg, tmp_path / "half", progress=False)
    gate = load_file(str(next(out.glob("*.safetensors"))))["model.layers.1.mlp.shared_expert_gate.weight"]
    assert torch.equal(gate, torch.full((1, 64), arch.SHARED_GATE_CONSTANT))
    dense = logits(world["base"])
    assert torch.allclose(logits(out), dense, atol=1e-4, rtol=0), (logits(out) - dense).abs().max()
    if mode == "random":
        doubled = lazymoe.merge(same_config(world, gate_mode=mode, shared_experts=shared), tmp_path / "c1",
                                progress=False)
        tokenizer_files = [p for p in world["base"].iterdir() if p.name.startswith("tokenizer")]
        ref = _scaled_down_proj_copy(world["base"], 1.5, tmp_path / "x1.5")
        for f in tokenizer_files:
            (ref / f.name).write_bytes(f.read_bytes())
        assert torch.allclose(logits(doubled), logits(ref), atol=1e-4, rtol=0)
        assert (logits(doubled) - dense).abs().max() > 0.1


def test_shared_expert_gate_from_prompts_is_one_more_row_of_the_same_computation(families, tmp_path):
    """As mergekit: the shared expert's prompts give its gate row exactly as an expert's prompts give theirs."""
    world = families["qwen2"]
    shared = {"source_model": str(world["same"]), "positive_prompts": ["Once upon a time", "The knight"]}
    out = lazymoe.merge(same_config(world, gate_mode="hidden", shared_experts=[shared]), tmp_path / "moe",
                        progress=False)
    as_expert = same_config(world, gate_mode="hidden")
    as_expert["experts"][1] = {**shared, "source_model": str(world["base"])}
    ref = lazymoe.merge(as_expert, tmp_path / "ref", progress=False)
    got, want = load_file(str(next(out.glob("*.safetensors")))), load_file(str(next(ref.glob("*.safetensors"))))
    for layer in range(2):
        assert torch.equal(got[f"model.layers.{layer}.mlp.shared_expert_gate.weight"][0],
                           want[f"model.layers.{layer}.mlp.gate.weight"][1])


def test_llama_experts_into_qwen_moe_are_dense_with_zero_biases(families, tmp_path):
    world = families["mistral"]
    out = lazymoe.merge(same_config(world, architecture="qwen", gate_mode="cheap_embed"), tmp_path / "moe",
                        progress=False)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    dense = logits(world["base"])
    assert torch.allclose(logits(out), dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "keeps_tie"), [("qwen2_tied", False), ("qwen3_tied", True)])
def test_tied_embeddings(families, tmp_path, family, keeps_tie):
    """Qwen MoE writes lm_head (llama.cpp's qwen2moe requires output.weight); Qwen3 MoE and Mixtral keep the tie
    (their llama.cpp loaders fall back to the embeddings), saving vocab x hidden parameters."""
    world = families[family]
    assert "lm_head.weight" not in load_file(str(world["base"] / "model.safetensors"))
    out = lazymoe.merge(same_config(world, gate_mode="random", experts_per_token=2), tmp_path / "moe", progress=False)
    tensors = load_file(str(next(out.glob("*.safetensors"))))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is keeps_tie
    assert ("lm_head.weight" not in tensors) is keeps_tie
    if not keeps_tie:
        assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    dense = logits(world["base"])
    assert torch.allclose(logits(out), dense, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- the routing picture


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_layerwise_forward_matches_transformers_for_qwen_outputs(families, tmp_path, family):
    world = families[family]
    shared = [{"source_model": str(world["e2"]), "positive_prompts": ["Solve 2x"]}] if family == "qwen2" else None
    cfg = moe_config(world["base"], [world["e1"], world["e2"], world["same"]], gate_mode="hidden",
                     experts_per_token=2, **({"shared_experts": shared} if shared else {}))
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    seqs = [tok(t)["input_ids"] for t in (TEXT, "Solve 2x + 3 = 11", "Hi")]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda _m, _a, o, i=i: seen.__setitem__(i, o[0]))
    ids, mask = right_padded(seqs, pad_id=seqs[0][0])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    ours = routing.stream_router_logits(out, seqs)
    for layer, got in enumerate(ours):
        want = seen[layer].reshape(*ids.shape, -1)
        assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)
    report = routing.routing_report(out)
    assert report.experts == ["e1", "e2", "same"] and report.chosen.shape[1:] == (2, 3)


# ------------------------------------------------------------------------------- front ends


def test_card_names_the_architecture_and_the_shared_expert(families, tmp_path):
    from lazymoe.card import ModelFacts, rerender_card

    world = families["qwen2"]
    shared = [{"source_model": str(world["same"]), "positive_prompts": ["Once upon a time"]}]
    out = lazymoe.merge(moe_config(world["base"], [world["e1"], world["e2"]], gate_mode="random",
                                   shared_experts=shared), tmp_path / "moe", progress=False)
    card = (out / "README.md").read_text()
    assert "| Architecture | Qwen MoE (`Qwen2MoeForCausalLM`), 2 layers, hidden size 64 |" in card
    assert "| Shared expert | `" in card and "gated by its prompts: Once upon a time |" in card
    assert "one tensor per expert (`mlp.experts.N`)" in card and "block_sparse_moe" not in card
    assert "- qwen2_moe\n" in card and "- mixtral\n" not in card
    assert ModelFacts.from_folder(out).output == "qwen2_moe"
    rerender_card(out)  # from the folder alone: the same card, byte for byte
    assert (out / "README.md").read_text() == card


def test_presets_are_valid_recipes_with_a_reason_per_expert():
    from pathlib import Path

    from lazymoe.notebooks import load_preset

    root = Path(__file__).resolve().parent.parent / "notebooks" / "presets"
    for name, family in (("llama-3.1-4x8b", "meta-llama/Llama-3.1-8B"), ("qwen2.5-3x7b", "Qwen/Qwen2.5-7B")):
        preset = load_preset(root / f"{name}.yaml")
        cfg = parse_config(preset.config)
        assert cfg.base_model.startswith(family)
        lines = preset.text.splitlines()
        sources = [i for i, line in enumerate(lines) if line.strip().startswith("- source_model:")]
        assert len(sources) == cfg.num_experts
        assert all(lines[i - 1].strip().startswith("# why: ") for i in sources), name


def test_qwen_moe_from_a_sentencepiece_base_warns_that_llama_cpp_will_refuse_it(families, tmp_path):
    from lazymoe.errors import GGUFError
    from lazymoe.gguf import convert_to_gguf

    world = families["mistral"]
    plan = lazymoe.make_plan(moe_config(world["base"], [world["e1"], world["e2"]], architecture="qwen"),
                             progress=False)
    assert any("llama.cpp's converter reads a Qwen MoE tokenizer as BPE only" in w for w in plan.warnings)
    pytest.importorskip("llama_cpp")
    out = lazymoe.merge(same_config(world, architecture="qwen", gate_mode="random"), tmp_path / "moe", progress=False)
    with pytest.raises(GGUFError, match="(?s)BPE pre-tokenizer was not recognized.*What to do: llama.cpp reads a Qwen "
                                        "MoE's tokenizer as BPE only, and this one is SentencePiece"):
        convert_to_gguf(out, tmp_path / "gguf", quants=None, progress=False)
