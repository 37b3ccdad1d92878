"""Benchmarks with the tool the field uses: EleutherAI's lm-evaluation-harness (``lm_eval``, the optional
extra ``lazymoe[eval]``), run on the merged model and, when asked, on the base and each expert.

Each model is loaded the way the notebook's "Try it" step loads the MoE (whole on the GPU, in 4-bit where
that is all that fits, or on the CPU), handed to ``lm_eval``'s ``HFLM`` and run on the same tasks with the
same ``limit``. The results are saved as ``benchmarks.json`` beside the model; the card shows them as a
table and, for the MoE, in the Hub's ``model-index`` metadata. Tasks can be any ``lm_eval`` task name or a
local YAML task found under ``include_path`` (how the tests run offline).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..io.folder import CONFIG_FILENAME, require_lazymoe_output
from ..config import load_config
from ..options import DEFAULT_BENCHMARK_LIMIT, DEFAULT_BENCHMARK_TASKS
from ..errors import ConfigError, LazyMoEError, Setting, Text
from ..publish.eval_report import BENCHMARKS_JSON, BENCHMARKS_SCHEMA
from .skill import Sources
from ..router.routing import expert_labels
from ..runtime.machine import probe
from ..runtime.load import choose_loading, free_memory, load_merged, stored_dtype

#: small multiple-choice tasks that a free Colab T4 runs in minutes each with the default limit
DEFAULT_TASKS = DEFAULT_BENCHMARK_TASKS
DEFAULT_LIMIT = DEFAULT_BENCHMARK_LIMIT  # documents per task
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'lazymoe[eval]' (or pip install lm-eval)"
COMPARE_CHOICES = ("moe", "base", "experts")


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise LazyMoEError(f"{INSTALL_HINT} ({err})") from None
    return lm_eval, HFLM, TaskManager


#: the arguments these messages name (each front end words them: tasks=, --tasks, the notebook's TASKS)
_TASKS, _LIMIT = Setting("tasks", ..., noun=True), Setting("limit", ..., noun=True)
_INCLUDE = Setting("include_path", ..., noun=True)


def parse_tasks(tasks: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if tasks is None or tasks == "default":
        return list(DEFAULT_TASKS)
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not items:
        raise ConfigError(Text(f"{_TASKS.placeholder} is empty: give lm_eval task names, e.g. arc_easy,hellaswag, or "
                               "'default'.", (_TASKS,)))
    return items


def _metrics(task_result: dict[str, Any]) -> dict[str, float]:
    """``{"acc": 0.71, "acc_norm": 0.74}`` from lm_eval's ``{"acc,none": 0.71, "acc_stderr,none": ...}``."""
    out = {}
    for key, value in task_result.items():
        name, _, _filter = key.partition(",")
        if name.endswith("_stderr") or name == "alias" or not isinstance(value, (int, float)):
            continue
        out[name] = float(value)
    return out


def _run_one(folder: Path, tasks: list[str], *, limit: int | None, batch_size: int, task_manager, seed: int):
    lm_eval, HFLM, _ = import_lm_eval()
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    choice = choose_loading(size, probe(folder), dtype=stored_dtype(folder))
    if choice.device is None:
        return None, choice.reason
    model, tokenizer = load_merged(folder, choice)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager,
                                          log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        del model
        free_memory()
    return {task: _metrics(results["results"][task]) for task in tasks if task in results["results"]}, None


def check_benchmark_options(tasks: str | list[str] | None = None, *, limit: int | None = DEFAULT_LIMIT,
                            compare: str | tuple[str, ...] = "moe", include_path: str | os.PathLike | None = None
                            ) -> tuple[list[str], list[str]]:
    """The options :func:`check_benchmarks` can judge without lm_eval (before installing it): task names,
    limit, the models to compare, the include folder."""
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(Text(f"{_LIMIT.placeholder} must be at least 1 (documents per task).", (_LIMIT,)))
    which = [c.strip().lower() for c in (compare.split(",") if isinstance(compare, str) else compare) if c.strip()]
    bad = [c for c in which if c not in COMPARE_CHOICES]
    if bad:
        raise ConfigError(f"compare {bad[0]!r}: choose from {', '.join(COMPARE_CHOICES)} (e.g. moe,base).")
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(Text(f"{_INCLUDE.placeholder} {include_path} is not a folder of lm_eval task YAML files.",
                               (_INCLUDE,)))
    return names, which


def check_benchmarks(tasks: str | list[str] | None = None, *, limit: int | None = DEFAULT_LIMIT,
                     compare: str | tuple[str, ...] = "moe", include_path: str | os.PathLike | None = None
                     ) -> tuple[list[str], list[str], Any]:
    """What :func:`run_benchmarks` checks before any model runs (a front end calls it before other long steps):
    the task names, the models to compare and lm_eval's task manager, or a one-line error."""
    names, which = check_benchmark_options(tasks, limit=limit, compare=compare, include_path=include_path)
    _, _, TaskManager = import_lm_eval()
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        include = Setting("include_path", ...)
        raise ConfigError(Text(f"lm_eval has no task {unknown[0]!r}; see `lm_eval --tasks list`, or "
                               f"{include.placeholder} (a folder with your own task YAML).", (include,)))
    return names, which, manager


def run_benchmarks(model_dir: str | os.PathLike, tasks: str | list[str] | None = None, *,
                   limit: int | None = DEFAULT_LIMIT, compare: str | tuple[str, ...] = "moe",
                   include_path: str | os.PathLike | None = None, batch_size: int = 8, download: bool = False,
                   release: bool = False) -> dict[str, Any]:
    """Run ``tasks`` on the merged model (and, per ``compare``, the base and each expert); returns the results."""
    folder = require_lazymoe_output(model_dir)
    names, which, manager = check_benchmarks(tasks, limit=limit, compare=compare, include_path=include_path)
    lm_eval, _, _ = import_lm_eval()
    recipe = load_config(folder / CONFIG_FILENAME)
    labels = expert_labels([e.source_model for e in recipe.experts])
    models: list[tuple[str, str]] = [("MoE", "")]
    if "base" in which:
        models.append(("base", recipe.base_model))
    if "experts" in which:
        models += [(f"{i}: {label}", recipe.experts[i].source_model) for i, label in enumerate(labels)]
    sources = Sources(download=download, release=release)
    results: dict[str, dict[str, dict[str, float]]] = {}
    skipped: list[str] = []
    seed = recipe.seed or 0
    for name, ref in models:
        try:
            model_folder = folder if not ref else sources.folder(ref)
            got, why = _run_one(model_folder, names, limit=limit, batch_size=batch_size, task_manager=manager, seed=seed)
        except LazyMoEError as err:
            got, why = None, str(err)
        finally:
            if ref:
                sources.release(ref)
        if got is None:
            if name == "MoE":
                raise LazyMoEError(f"The MoE cannot be benchmarked here: {why}")
            skipped.append(f"{name}: {why}")
            continue
        results[name] = got
    return {"schema": BENCHMARKS_SCHEMA, "model_name": folder.resolve().name, "tasks": names, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "?"), "seed": seed, "models": results,
            "skipped": skipped}


def write_benchmarks(model_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    path = Path(model_dir) / BENCHMARKS_JSON
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
