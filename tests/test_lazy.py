"""lazymoe.lazy: torch is imported on first use, once, and a thread that asks while another imports waits."""

from __future__ import annotations

import sys
import threading

import pytest

from lazymoe.lazy import LazyModule, no_grad


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    """A module whose import takes a while and counts how often it ran."""
    (tmp_path / "lazymoe_slow_probe.py").write_text(
        "import time\nimport builtins\n"
        "builtins.lazymoe_probe_runs = getattr(builtins, 'lazymoe_probe_runs', 0) + 1\n"
        "time.sleep(0.3)\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lazymoe_slow_probe"
    sys.modules.pop("lazymoe_slow_probe", None)
    import builtins
    if hasattr(builtins, "lazymoe_probe_runs"):
        del builtins.lazymoe_probe_runs


def test_nothing_is_imported_until_an_attribute_is_used(slow_module):
    lazy = LazyModule(slow_module)
    assert slow_module not in sys.modules
    assert "not loaded yet" in repr(lazy)
    assert lazy.VALUE == 42
    assert slow_module in sys.modules and "loaded" in repr(lazy)
    with pytest.raises(AttributeError):
        lazy.MISSING  # noqa: B018 - the module's own AttributeError


def test_threads_that_ask_at_once_all_see_the_whole_module_imported_once(slow_module):
    import builtins

    lazy = LazyModule(slow_module)
    seen, errors = [], []

    def ask():
        try:
            seen.append(lazy.VALUE)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and seen == [42] * 4
    assert builtins.lazymoe_probe_runs == 1


def test_no_grad_turns_off_autograd_inside_only():
    import torch

    w = torch.ones(3, requires_grad=True)

    @no_grad
    def scaled(x):
        """Doubles x."""
        return x * 2

    assert not scaled(w).requires_grad
    assert (w * 2).requires_grad
    assert scaled.__doc__ == "Doubles x." and scaled.__name__ == "scaled"
