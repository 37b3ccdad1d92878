"""`lazymoe eval --tasks`: lm-evaluation-harness on a tiny MoE, offline, with a local YAML task; the card's
table and model-index. Needs the optional extra lazymoe[eval] (lm_eval); without it, only the one-line error."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import moe_config

import lazymoe
from lazymoe.cli import main
from lazymoe.eval_report import BENCHMARKS_SCHEMA, benchmark_table, model_index

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

TASK_YAML = """task: lazymoe_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

DOCS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "answer": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0},
    {"question": "def add(a, b): return", "choices": [" a + b", " a - b", " 0"], "answer": 0},
    {"question": "Once upon a", "choices": [" time", " table"], "answer": 0},
]


@pytest.fixture(scope="module")
def moe(tiny_world, tmp_path_factory):
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=3)
    return lazymoe.merge(cfg, tmp_path_factory.mktemp("bench") / "moe", progress=False)


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path / "tasks"


def test_table_and_model_index_from_results():
    result = {"schema": BENCHMARKS_SCHEMA, "tasks": ["arc_easy", "hellaswag"], "limit": 100, "lm_eval_version": "0.4.13",
              "models": {"MoE": {"arc_easy": {"acc": 0.7123, "acc_norm": 0.7}, "hellaswag": {"acc": 0.5}},
                         "base": {"arc_easy": {"acc": 0.69, "acc_norm": 0.68}}}, "skipped": ["0: chat: too big"]}
    table = benchmark_table(result)
    assert table["header"] == ["Task", "Metric", "MoE", "base"]
    assert table["rows"] == [["arc_easy", "acc", "71.2", "69.0"], ["arc_easy", "acc_norm", "70.0", "68.0"],
                             ["hellaswag", "acc", "50.0", "—"]]
    (entry,) = model_index(result, "My-MoE")
    assert entry["name"] == "My-MoE" and len(entry["results"]) == 2
    first = entry["results"][0]
    assert first["dataset"] == {"name": "arc_easy", "type": "arc_easy"}
    assert first["metrics"][0] == {"type": "acc", "value": 71.23, "name": "acc"}


def test_benchmarks_in_the_card_parse_as_hub_eval_results(moe, tmp_path):
    from huggingface_hub import ModelCard

    from lazymoe import card
    from lazymoe.benchmarks import write_benchmarks

    result = {"schema": BENCHMARKS_SCHEMA, "model_name": "moe", "tasks": ["arc_easy"], "limit": 10,
              "lm_eval_version": "0.4.13", "seed": 3, "models": {"MoE": {"arc_easy": {"acc": 0.25}}}, "skipped": []}
    write_benchmarks(moe, result)
    try:
        text = card.build_card(moe)
    finally:
        (moe / "benchmarks.json").unlink()
    assert "## Benchmarks" in text and "| arc\\_easy | acc | 25.0 |" in text
    (res,) = ModelCard(text).data.eval_results
    assert (res.task_type, res.dataset_type, res.metric_type, res.metric_value) == ("text-generation", "arc_easy",
                                                                                   "acc", 25.0)


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm_eval is installed")
def test_without_lm_eval_the_cli_says_how_to_install_it(moe, capsys):
    assert main(["-q", "eval", str(moe), "--tasks", "default", "--skip-retention"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lm-evaluation-harness is not installed: pip install 'lazymoe[eval]'")
    assert err.count("\n") == 1


@pytest.mark.skipif(not HAS_LM_EVAL, reason="needs the optional extra lazymoe[eval] (lm_eval)")
def test_lm_eval_runs_a_local_task_on_the_moe_and_the_base(moe, task_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["-q", "eval", str(moe), "--skip-retention", "--tasks", "lazymoe_tiny_choice", "--include-path",
                 str(task_dir), "--limit", "4", "--benchmark-compare", "moe,base"]) == 0
    data = json.loads((moe / "benchmarks.json").read_text())
    assert data["schema"] == BENCHMARKS_SCHEMA and list(data["models"]) == ["MoE", "base"]
    for name in ("MoE", "base"):
        acc = data["models"][name]["lazymoe_tiny_choice"]["acc"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0), "accuracy over four documents"
    text = (moe / "README.md").read_text()
    assert "## Benchmarks" in text and "model-index:" in text
    assert main(["-q", "eval", str(moe), "--skip-retention", "--tasks", "no_such_task", "--include-path",
                 str(task_dir)]) == 2
    assert "lm_eval has no task 'no_such_task'" in capsys.readouterr().err
