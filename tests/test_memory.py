"""Memory claims held against memory measured by the operating system (tests/memprobe.py, a fresh process each).

The README says the writer holds one tensor at a time (three with a dtype change), and the plan tells the
user how much memory the router pass needs; both are checked here on a model whose tensors are large enough
(8 MB) to stand well above the measuring noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lazymoe.demo import build_model, build_tokenizer

PROBE = Path(__file__).resolve().parent / "memprobe.py"
ROOT = PROBE.parent.parent
SLACK = 2 << 20  # interpreter and allocator noise around the call

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict:
    """A float32 base (hidden 512, MLP 4096: 8 MB per MLP tensor) and two experts fine-tuned from it."""
    root = tmp_path_factory.mktemp("wide")
    tok = build_tokenizer(root / "tok")
    build_model(root / "base", tokenizer_dir=tok, hidden_size=512, intermediate_size=4096, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=8)
    experts = [build_model(root / f"e{i}", tokenizer_dir=tok, base=root / "base", perturb=0.01, seed=i)
               for i in range(2)]
    return {"root": root, "config": {
        "base_model": str(root / "base"), "gate_mode": "random",
        "experts": [{"source_model": str(experts[0]), "positive_prompts": ["hello there, how are you"]},
                    {"source_model": str(experts[1]), "positive_prompts": ["def f(x): return x + 1"]}]}}


def _probe(scenario: str, args: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",  # freed tensors leave the resident set at once
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(PROBE), scenario, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case, changes, tensors", [
    ("straight copies", {"dtype": "float32"}, 1),
    ("cast to bfloat16", {"dtype": "bfloat16"}, 3),
    ("cast and noise", {"dtype": "bfloat16", "noise_scale": 0.01}, 3),
], ids=lambda v: v if isinstance(v, str) else None)
def test_the_writer_holds_one_tensor_three_with_a_dtype_change(wide, tmp_path, case, changes, tensors):
    config = dict(wide["config"], dtype=changes["dtype"])
    if "noise_scale" in changes:
        config["experts"] = [dict(e, noise_scale=changes["noise_scale"]) for e in config["experts"]]
    got = _probe("writer", {"config": config, "out": str(tmp_path)})
    biggest = got["biggest_source"]  # float32, as the transforms compute
    assert got["peak"] <= tensors * biggest + SLACK, (case, got)
    if "noise_scale" in changes:  # the probe does see tensors: the noisy copy needs source, noise and sum
        assert got["peak"] >= 2 * biggest, got


@pytest.mark.slow
@pytest.mark.parametrize("mode, continuation, low", [
    ("hidden", 0, 0.6),  # one layer in bfloat16, plus one float32 tensor while it is cast
    ("classifier", 0, 0.4),  # one layer and its experts in float32; activations of short prompts are small
    ("centroid", 4, 0.4),  # the whole base, loaded to write continuations
])
def test_the_router_pass_needs_what_the_plan_says(wide, mode, continuation, low):
    config = dict(wide["config"], gate_mode=mode, router_continuation_tokens=continuation)
    got = _probe("router", {"config": config})
    assert got["peak"] <= got["estimate"] * 1.1 + SLACK, f"the plan underestimates the router pass: {got}"
    assert got["peak"] >= got["estimate"] * low, f"the plan's estimate is far above what the pass uses: {got}"
