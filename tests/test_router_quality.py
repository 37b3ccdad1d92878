"""The fitted gate modes route a small *trained* world's tokens to the right expert (seconds on a CPU).

The world (bench/world.py's TINY_SPEC) is a 2-layer Llama pretrained on four synthetic domains and four
MLP-only experts fine-tuned from it, so the right expert for every held-out token is known. The benchmark
script itself runs on it, end to end, so its measurements are tested too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "router_quality.py"
CHANCE = 0.25  # four experts


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("router_quality", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["router_quality"] = bench
    spec.loader.exec_module(bench)
    work = tmp_path_factory.mktemp("rq")
    out = work / "rq.md"
    assert bench.main(["--tiny", "--variants", "mlp", "--no-mergekit", "--modes", "random,hidden,classifier",
                       "--work", str(work), "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_classifier_routes_every_domain_better_than_chance_and_random(results):
    data, _ = results
    rows = data["variants"]["mlp"]
    classifier, random = rows["classifier"], rows["random"]
    for domain, per_layer in classifier["top1"].items():
        acc = sum(per_layer) / len(per_layer)
        assert acc > CHANCE + 0.15, (domain, per_layer)
    assert classifier["top1_all"] > random["top1_all"] + 0.25
    assert classifier["top1_all"] > rows["hidden"]["top1_all"]
    assert classifier["topk_all"] > random["topk_all"]


def test_the_report_has_every_measure_and_an_oracle(results):
    data, text = results
    rows = data["variants"]["mlp"]
    assert set(rows) == {"random", "hidden", "classifier", "oracle"}
    assert rows["oracle"]["kept"] == pytest.approx({d: 1.0 for d in rows["oracle"]["kept"]}, abs=1e-4)
    for name in ("random", "hidden", "classifier"):
        assert rows[name]["seconds"] >= 0 and len(rows[name]["top1"]["code"]) == 2  # two layers
        for d in rows[name]["top1"]:
            assert all(t1 <= tk for t1, tk in zip(rows[name]["top1"][d], rows[name]["topk"][d]))
    assert "| classifier |" in text and "kept stories" in text and "top-1 per layer" in text
