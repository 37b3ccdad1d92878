"""The recommended gate mode routes a small *trained* world's tokens to the right expert (seconds on a CPU).

The world (bench/worlds.py's TINY_SPEC) is a 2-layer Llama pretrained on four synthetic domains and four
MLP-only experts fine-tuned from it, so the right expert for every held-out token is known. The benchmark
script itself runs on it, end to end, so its measurements are tested too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lazymoe.router.modes import RECOMMENDED_GATE_MODE

BENCH = Path(__file__).resolve().parent.parent / "bench" / "router_quality.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("router_quality", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["router_quality"] = bench
    spec.loader.exec_module(bench)
    work = tmp_path_factory.mktemp("rq")
    out = work / "rq.md"
    assert bench.main(["--tiny", "--modes", f"random,hidden,{RECOMMENDED_GATE_MODE},{RECOMMENDED_GATE_MODE}+docs",
                       "--seeds", "0",
                       "--work", str(work), "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_the_recommended_mode_routes_every_domain_better_than_hidden_and_random(results):
    data, _ = results
    rows = data["worlds"][0]["modes"]
    best, hidden, random = (rows[m]["runs"][0] for m in (RECOMMENDED_GATE_MODE, "hidden", "random"))
    for domain, per_layer in best["top1"].items():
        acc = sum(per_layer) / len(per_layer)
        assert acc > sum(hidden["top1"][domain]) / len(per_layer), (domain, per_layer, hidden["top1"][domain])
        assert acc > sum(random["top1"][domain]) / len(per_layer), (domain, per_layer, random["top1"][domain])
    assert best["top1_mean"] > 0.5  # chance is 0.25
    assert best["worst_kept"] > max(hidden["worst_kept"], random["worst_kept"])


def test_the_report_has_every_world_mode_and_the_minimum_row(results):
    data, text = results
    world = data["worlds"][0]
    assert set(world["modes"]) == {"random", "hidden", RECOMMENDED_GATE_MODE, f"{RECOMMENDED_GATE_MODE}+docs"}
    for row in world["modes"].values():
        run = row["runs"][0]
        assert row["top1_min"] <= row["top1_mean"] and row["kept_min"] <= row["kept_mean"]
        assert len(run["top1"]["code"]) == 2 and run["gate_seconds"] >= 0  # two layers
        assert run["worst_kept"] == min(run["kept"].values())
    assert "| **minimum** |" in text and f"`{RECOMMENDED_GATE_MODE}` top-1" in text and "| tiny | tune |" in text


def test_the_gain_split_accounts_for_every_token(results):
    """MLP-only experts: the oracle is the expert itself, so the gain kept on the tokens routed right at every
    layer and on the rest, weighted by their shares of the gain, is the domain's gain kept."""
    data, text = results
    world = data["worlds"][0]
    assert all(abs(v - 1.0) < 1e-5 for v in world["oracle_kept"].values())
    for row in world["modes"].values():
        run = row["runs"][0]
        for domain, sp in run["split"].items():
            assert 0.0 <= sp["right_tokens"] <= 1.0
            if sp["kept_right"] is None or sp["kept_rest"] is None:
                continue  # one side carries under 5% of the gain
            whole = sp["right_gain"] * sp["kept_right"] + (1 - sp["right_gain"]) * sp["kept_rest"]
            assert whole == pytest.approx(run["kept"][domain], abs=1e-4), (domain, sp)
    best = world["modes"][RECOMMENDED_GATE_MODE]["runs"][0]["split"]
    assert any(sp["kept_right"] is not None and sp["kept_rest"] is not None for sp in best.values())
    assert "Where the gain goes" in text and "`MODE+docs`" in text


def test_calibration_documents_are_never_the_scored_ones():
    spec = importlib.util.spec_from_file_location("router_quality", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    worlds = sys.modules["worlds"]
    world = type("W", (), {"spec": worlds.TINY_SPEC,
                           "heldout": {d: worlds.documents(d, 8, worlds.TINY_SPEC.seed + 1_000_003)
                                       for d in worlds.TINY_SPEC.domains}})()
    recipe = {"experts": [{} for _ in worlds.TINY_SPEC.domains]}
    docs = bench.with_calibration(recipe, world, "docs")
    for d, expert in zip(worlds.TINY_SPEC.domains, docs["experts"]):
        assert len(expert["calibration_text"]) == bench.CALIBRATION_DOCS
        assert not set(expert["calibration_text"]) & set(world.heldout[d])
    with pytest.raises(SystemExit, match="unknown calibration"):
        bench.split_mode("expert_classifier+everything")


def test_the_summary_table_gives_each_modes_worst_seed(results):
    data, _ = results
    bench = sys.modules["router_quality"]
    table = bench.summary(data).splitlines()
    world = data["worlds"][0]
    tiny = next(line for line in table if line.startswith("| tiny |"))
    for mode in world["modes"]:
        assert f" {bench.pct(world['modes'][mode]['top1_min'])} " in tiny
    assert table[-1].startswith("| **minimum** |")
    assert table[0].count("top-1") == len(world["modes"])
