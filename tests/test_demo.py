"""lazymoe.demo: the tiny offline checkpoints every other test stands on."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import iter_test_strings

from lazymoe import demo
from lazymoe.config import load_config


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok_dir):
    return demo.build_model(tmp_path_factory.mktemp("base") / "m", tokenizer_dir=tok_dir, initializer_range=0.2)


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_tokenizer_files_and_special_tokens(tok_dir):
    from transformers import AutoTokenizer

    assert {p.name for p in tok_dir.iterdir()} >= {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert tok.pad_token is None  # merged models must not gain one either (BRIEF §2)
    assert len(tok) == 512
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<s>[INST] hi [/INST]"


def test_tokenizer_matches_sentencepiece_exactly(tok_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    for text in iter_test_strings():
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text  # leading spaces included, unlike transformers' LlamaTokenizer
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)), text
    # byte fallback, not <unk>, for characters the corpus never saw
    assert 0 not in tok("ॐ 🦀")["input_ids"]


def test_tokenizer_is_cached_and_fast(tmp_path):
    start = time.perf_counter()
    for i in range(3):
        demo.build_tokenizer(tmp_path / str(i))
    assert time.perf_counter() - start < 5
    assert (tmp_path / "0" / "tokenizer.model").read_bytes() == (tmp_path / "2" / "tokenizer.model").read_bytes()


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(demo.DemoError, match="259 ids"):
        demo.build_tokenizer(tmp_path, vocab_size=260)


def test_model_loads_and_generates(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) == 512
    inputs = tok("Solve 2x + 3 = 11", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    gen = json.loads((base_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert "pad_token_id" not in gen or gen["pad_token_id"] is None


def test_saved_names_are_standard_llama(base_dir):
    names = set(_tensors(base_dir))
    assert "model.layers.1.mlp.gate_proj.weight" in names
    assert "lm_head.weight" in names
    assert len(names) == 3 + 2 * 9


def test_perturb_zero_is_byte_identical(tmp_path, tok_dir, base_dir):
    copy = demo.build_model(tmp_path / "copy", tokenizer_dir=tok_dir, base=base_dir, perturb=0.0)
    a, b = _tensors(base_dir), _tensors(copy)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8))


def test_perturb_scales_with_tensor_std(tmp_path, tok_dir, base_dir):
    a = _tensors(base_dir)
    b = _tensors(demo.build_model(tmp_path / "ft", tokenizer_dir=tok_dir, base=base_dir, perturb=0.1, seed=7))
    c = _tensors(demo.build_model(tmp_path / "ft2", tokenizer_dir=tok_dir, base=base_dir, perturb=0.1, seed=8))
    w = "model.layers.0.mlp.up_proj.weight"
    ratio = ((b[w] - a[w]).std() / a[w].std()).item()
    assert 0.09 < ratio < 0.11
    assert not torch.equal(b[w], c[w])  # different seeds, different fine-tunes
    assert torch.equal(b["model.norm.weight"], a["model.norm.weight"])  # constant tensors have std 0


def test_mistral_sharded_tied_bf16(tmp_path, tok_dir):
    out = demo.build_model(tmp_path / "m", tokenizer_dir=tok_dir, model_type="mistral", tie_word_embeddings=True,
                           dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    for shard in shards:  # transformers' limit: a shard exceeds it only when one tensor alone does
        held = [k for k, v in index["weight_map"].items() if v == shard]
        assert (out / shard).stat().st_size <= 20_000 + 4096 or len(held) == 1, shard
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["dtype"]) == ("mistral", True, "bfloat16")


def test_bad_arguments_are_explained(tmp_path, tok_dir):
    with pytest.raises(demo.DemoError, match="model_type='gpt2'"):
        demo.build_model(tmp_path / "x", tokenizer_dir=tok_dir, model_type="gpt2")
    with pytest.raises(demo.DemoError, match="no tokenizer.model"):
        demo.build_model(tmp_path / "y", tokenizer_dir=tmp_path)


def test_build_demo_writes_a_valid_mergekit_config(tmp_path):
    start = time.perf_counter()
    path = demo.build_demo(tmp_path / "demo")
    assert time.perf_counter() - start < 30  # seconds on CPU; most of it is importing transformers' model code
    raw = yaml.safe_load(path.read_text())
    assert (raw["gate_mode"], raw["experts_per_token"], len(raw["experts"])) == ("hidden", 2, 4)
    config = load_config(path)
    assert [e.source_model for e in config.experts] == [str((tmp_path / "demo" / n).resolve())
                                                       for n in ("chat", "code", "math", "stories")]
    assert all(3 <= len(e.positive_prompts) <= 5 for e in config.experts)
    assert any(e.negative_prompts for e in config.experts)
    base = _tensors(tmp_path / "demo" / "base")
    chat = _tensors(tmp_path / "demo" / "chat")
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(base[w], chat[w])
