"""The layer-by-layer base pass must compute exactly what a full transformers model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lazymoe.router.prompts import tokenize_prompts
from lazymoe.io.sources import ModelRef, describe
from lazymoe.router.streamed import StreamedBase


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_pass_equals_the_full_model_bit_for_bit(tiny_world, dtype):
    base = tiny_world["base"]
    tok = AutoTokenizer.from_pretrained(base)
    # left padding of different lengths: pad positions must match too (hidden_avg averages over them)
    batches = [tokenize_prompts(tok, ["hello there my friend", "x", "def f(x): return 2"]),
               tokenize_prompts(tok, ["Once upon a time"])]
    full = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    streamed = StreamedBase(describe(ModelRef.parse(str(base))), device=torch.device("cpu"), dtype=dtype)
    got = streamed.collect(batches, residual=lambda h, m: h.clone(), mlp_input=lambda h, m: h.clone(), progress=False)
    for b, batch in enumerate(batches):
        captured = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
                 for layer in full.model.layers]
        with torch.no_grad():
            ref = full(**batch, output_hidden_states=True).hidden_states[:-1]
        for h in hooks:
            h.remove()
        assert len(got["residual"][b]) == len(ref) == len(got["mlp_input"][b]) == len(captured)
        for expected, actual in zip(ref, got["residual"][b]):
            assert torch.equal(expected, actual)
        for expected, actual in zip(captured, got["mlp_input"][b]):
            assert torch.equal(expected, actual)


def test_streamed_pass_never_holds_more_than_one_layer(tiny_world, monkeypatch):
    streamed = StreamedBase(describe(ModelRef.parse(str(tiny_world["base"]))), device=torch.device("cpu"),
                            dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_world["base"])
    real_load = streamed._load_layer
    live = []

    def load(index):
        live.append(sum(not p.is_meta for layer in streamed.inner.layers for p in layer.parameters()))
        return real_load(index)

    monkeypatch.setattr(streamed, "_load_layer", load)
    streamed.collect([tokenize_prompts(tok, ["hi"])], residual=lambda h, m: h[:, -1], progress=False)
    assert live == [0] * len(live) and len(live) == streamed.num_layers - 1  # last layer never needed


def test_mistral_sliding_window_matches_the_full_model(tiny_world, tmp_path):
    from lazymoe.demo import build_model

    # a window shorter than the prompt, so the sliding-window mask really differs from a causal one
    base = build_model(tmp_path / "mistral", tokenizer_dir=tiny_world["tokenizer"], model_type="mistral",
                       sliding_window=4, initializer_range=0.2)
    tok = AutoTokenizer.from_pretrained(base)
    batch = tokenize_prompts(tok, ["def add(a, b): return a + b, then more words", "hi"])
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = full(**batch, output_hidden_states=True).hidden_states[:-1]
    streamed = StreamedBase(describe(ModelRef.parse(str(base))), device=torch.device("cpu"), dtype=torch.float32)
    got = streamed.collect([batch], residual=lambda h, m: h.clone(), progress=False)["residual"][0]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
