"""The classic layout is what transformers 4.x reads: load our output there and compare logits with 5.x.

transformers 4.x cannot live beside 5.x, so this runs in a second interpreter named by
LAZYMOE_TRANSFORMERS4_PYTHON (CI makes one: see README "Setup and tests"); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch
from helpers import moe_config
from test_merge import logits

import lazymoe

PYTHON4 = os.environ.get("LAZYMOE_TRANSFORMERS4_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON4, reason="set LAZYMOE_TRANSFORMERS4_PYTHON to a Python with transformers<5")

_PROBE = textwrap.dedent('''
    import json, sys, torch, transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert transformers.__version__.startswith("4."), transformers.__version__
    folder, text = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**tok(text, return_tensors="pt")).logits[0]
    print(json.dumps({"class": type(model).__name__, "logits": out.tolist()}))
''')


def test_transformers4_reads_the_classic_layout_with_the_same_logits(tiny_world, tmp_path):
    text = "def add(a, b): return a + b. Once upon a time"
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=5)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    run = subprocess.run([PYTHON4, "-c", _PROBE, str(out), text], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == "MixtralForCausalLM"
    # RoPE must be spelled out for 4.x, or it falls back to Mixtral's default theta of 1e6
    assert torch.allclose(torch.tensor(result["logits"]), logits(out, text), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_type", "shared", "cls"), [
    ("qwen2", True, "Qwen2MoeForCausalLM"),  # in transformers 4.x since 4.40
    ("qwen3", False, "Qwen3MoeForCausalLM"),  # since 4.51
])
def test_transformers4_reads_the_qwen_outputs_with_the_same_logits(tiny_world, tmp_path, model_type, shared, cls):
    from lazymoe.demo import build_model

    text = "def add(a, b): return a + b. Once upon a time"
    base = build_model(tmp_path / "base", tokenizer_dir=tiny_world["tokenizer"], model_type=model_type,
                       initializer_range=0.2, **({"head_dim": 16} if model_type == "qwen3" else {}))
    experts = [build_model(tmp_path / f"e{i}", tokenizer_dir=tiny_world["tokenizer"], base=base, perturb=0.3,
                           seed=i) for i in range(3)]
    extra = {"shared_experts": [{"source_model": str(experts[0]), "positive_prompts": ["chat"]}]} if shared else {}
    cfg = moe_config(base, experts, gate_mode="random", seed=5, **extra)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    run = subprocess.run([PYTHON4, "-c", _PROBE, str(out), text], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["class"] == cls
    assert torch.allclose(torch.tensor(result["logits"]), logits(out, text), atol=1e-5, rtol=0)
