"""The package's shape (docs/architecture.md): imports go down the stack and never round in a cycle, nothing
is imported inside a function except a heavy optional dependency, and start-up does not load torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lazymoe"

#: the stack, bottom first; a module may import from its own layer or any layer below, never above
LAYERS: list[tuple[str, ...]] = [
    # tables and basics that import nothing above them
    ("lazymoe._version", "lazymoe.errors", "lazymoe.lazy", "lazymoe.units", "lazymoe.colab", "lazymoe.optional", "lazymoe.router.modes",
     "lazymoe.gguf.quants", "lazymoe.gguf.install", "lazymoe.moe.arch",
     "lazymoe.router.cost"),
    ("lazymoe.io",),
    ("lazymoe.config", "lazymoe.tokens"),
    ("lazymoe.moe", "lazymoe.demo", "lazymoe.options", "lazymoe.runtime"),
    ("lazymoe.router",),
    ("lazymoe.gguf",),
    ("lazymoe.publish",),
    ("lazymoe.pipeline",),
    ("lazymoe.evaluate",),
    # the front ends: flags and printing; widgets and HTML
    ("lazymoe.cli", "lazymoe.notebook", "lazymoe.__main__"),
]
#: imported where they are used, never at import time: torch & co. are slow to load, the others optional extras
#: google.colab exists only inside Colab; lm_eval and datasets are the optional ``eval`` extra
LAZY_OK = {"torch", "transformers", "llama_cpp", "matplotlib", "google", "lm_eval", "datasets"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module == "lazymoe":  # the root re-exports the public API from below
        return len(LAYERS) - 1
    best = None  # the longest matching prefix: lazymoe.router.modes sits below the rest of lazymoe.router
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it where it belongs")
    return best[0]


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The lazymoe modules an import statement loads (``from .x import y`` may name module y or a name in x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lazymoe"]
    is_package = MODULES[module].name == "__init__.py"
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "lazymoe":
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return submodules if len(submodules) == len(node.names) else [target, *submodules]


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Imports that run when the module is imported (``if TYPE_CHECKING:`` blocks do not)."""
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            found.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
        elif isinstance(node, ast.Try):
            found.extend(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {t for node in _top_level_imports(tree) for t in _resolve(module, node)
                         if t in MODULES and t != module}
    return graph


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if target != "lazymoe" and _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "imports going up the stack:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = _graph()
    # the package root re-exports from below; submodules never need it (it would tie every module together)
    users_of_root = sorted(m for m, targets in graph.items() if "lazymoe" in targets and m != "lazymoe")
    assert users_of_root == [], f"modules importing the lazymoe root package: {users_of_root}"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_imports_inside_functions_are_only_heavy_optional_dependencies():
    wrong = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if isinstance(node, ast.ImportFrom) and node.level:
                    if module.startswith("lazymoe.cli."):  # a subcommand's module, loaded when it runs
                        continue
                    wrong.append(f"{module}:{node.lineno} {ast.unparse(node)}")
                    continue
                roots = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else \
                    {(node.module or "").split(".")[0]}
                if not roots <= LAZY_OK:
                    wrong.append(f"{module}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, "imports inside functions (move them to the top, or move the function):\n" + "\n".join(wrong)


def test_every_module_says_what_it_is_for():
    missing = [m for m, path in MODULES.items() if not (ast.get_docstring(ast.parse(path.read_text())) or "").strip()]
    assert not missing, f"modules without a docstring: {missing}"


def _run(code: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("argv", [["-c", "import lazymoe"], ["-m", "lazymoe", "--help"]], ids=["import", "help"])
def test_start_up_does_not_load_torch(argv):
    assert _heavy_loaded(argv, {"torch", "transformers", "huggingface_hub", "llama_cpp", "matplotlib"}) == []


def test_a_merge_starts_copying_before_torch_is_loaded():
    """The merge's modules get torch through lazymoe.lazy: a local merge's first copy does not wait for it."""
    argv = ["-c", "import lazymoe.pipeline.merge, lazymoe.cli.build_commands, lazymoe.moe.writer, lazymoe.router.gates"]
    assert _heavy_loaded(argv, {"torch", "transformers"}) == []


def _heavy_loaded(argv: list[str], heavy: set[str]) -> list[str]:
    done = _run(["-X", "importtime", *argv])
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return sorted(loaded & heavy)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the libraries are loaded ahead on Linux only")
def test_torchs_libraries_load_without_the_interpreter_lock_before_its_import():
    # a thread that wakes every millisecond measures the longest stop of the interpreter while torch loads:
    # libtorch's own load (0.3 s here) happens in load_torch_libraries, which releases the lock
    code = """
import sys, threading, time
from lazymoe import lazy
gaps, done = [], threading.Event()
def tick():
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter(); gaps.append(now - last); last = now
t = threading.Thread(target=tick); t.start(); time.sleep(0.05)
before = len(gaps)
assert lazy.load_torch_libraries() is True
assert "libtorch_python" in open("/proc/self/maps").read() and "torch" not in sys.modules
load_gap = max(gaps[before:])
assert float(lazy.torch.ones(3).sum()) == 3.0
assert lazy.load_torch_libraries() is False  # once per process, and never once torch is imported
done.set(); t.join()
print(round(load_gap, 3))
"""
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 0.15, "the interpreter stopped while libtorch loaded"


def test_the_collector_rests_while_torch_imports_and_only_the_command_freezes_what_it_left():
    # importing torch makes over a million objects; a collector walking them as they pile up stops every thread
    code = """
import gc, sys
from lazymoe import lazy
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(info["generation"]))
lazy.torch.zeros(1)
assert len(seen) <= 2 and 2 not in seen, seen  # unpaused: about 360 collections, 2 of them full
assert gc.isenabled() and gc.get_freeze_count() == 0  # as before, and nothing frozen outside the command
gc.disable()
with lazy.collector_paused():
    pass
assert not gc.isenabled()  # a collector the caller had turned off stays off
gc.enable()
lazy.own_process()
with lazy.collector_paused():
    with lazy.collector_paused():
        pass
    assert not gc.isenabled()  # the outer pause still holds
    kept = [[i] for i in range(1000)]
assert gc.isenabled() and gc.get_freeze_count() >= 1000
print("ok")
"""
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "ok"
