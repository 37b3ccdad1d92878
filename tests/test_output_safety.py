"""Issue 11, serious defects 1 and 2: nothing a user made is lost, and no kill loses an output.

Real processes throughout: concurrent ``python -m lazymoe merge`` runs into one folder, and merges
SIGKILLed at every step (a driver sets :data:`lazymoe.outdir.on_step` to kill or pause at a named step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import moe_config

import lazymoe
from lazymoe import outdir
from lazymoe.errors import OutputBusyError, OutputExistsError

# Runs the CLI with a hook at one step: "kill" SIGKILLs the process there, "pause" writes MARKER and waits
# for MARKER.go. Step "write" kills in the middle of the shard writing instead.
DRIVER = r"""
import os, signal, sys, time
from pathlib import Path
import lazymoe.outdir as outdir
action, step, marker = sys.argv[1:4]
def hook(name):
    if name != step:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    Path(marker).write_text(name)
    while not Path(marker + ".go").exists():
        time.sleep(0.05)
outdir.on_step = hook
if step == "write":
    import lazymoe.writer as writer
    real, calls = writer.copy_bytes, [0]
    def dying(info, dst):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        real(info, dst)
    writer.copy_bytes = dying
from lazymoe.cli import main
sys.exit(main(sys.argv[4:]))
"""

STEPS = ("write", "complete", "aside", "swap", "discard", "delete", "done")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(lazymoe.__file__).parent.parent)}


def _config(tmp_path: Path, world, seed: int) -> Path:
    path = tmp_path / f"moe-{seed}.yaml"
    cfg = moe_config(world["base"], [world["chat"], world["code"]], gate_mode="random", seed=seed)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazymoe", "-q", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def _driver(action: str, step: str, marker: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, "-c", DRIVER, action, step, str(marker), "-q", *args]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def outputs(tiny_world, tmp_path_factory):
    """The bytes an old (seed 1) and a new (seed 2) merge write, to tell them apart after a kill."""
    root = tmp_path_factory.mktemp("reference")
    return {seed: _weights(lazymoe.merge(_config(root, tiny_world, seed), root / f"ref{seed}", progress=False))
            for seed in (1, 2)}


# ------------------------------------------------------------------------------------- defect 1


def test_two_concurrent_cli_merges_into_one_folder_one_wins_the_other_gets_a_clear_error(tiny_world, tmp_path):
    config = _config(tmp_path, tiny_world, 1)
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    first = _driver("pause", "complete", marker, "merge", str(config), str(out), wait=False)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = _cli("merge", str(config), str(out))
        _assert_one_line_error(second, "Another lazymoe merge is writing", str(out))
        second_overwrite = _cli("merge", str(config), str(out), "--overwrite")
        _assert_one_line_error(second_overwrite, "Another lazymoe merge is writing")
    finally:
        (tmp_path / "marker.go").write_text("")
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker", "marker.go", "moe-1.yaml", "out"]


def test_two_cli_merges_started_together_never_both_succeed(tiny_world, tmp_path):
    # the reproduction: `lazymoe merge C out & lazymoe merge C out; wait` -- both exited 0
    config = _config(tmp_path, tiny_world, 1)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lazymoe", "-q", "merge", str(config), str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    (loser,) = [err for code, err in results if code == 2]
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser
    assert "Another lazymoe merge is writing" in loser or "already exists" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe-1.yaml", "out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_made_at_the_output_path_during_a_merge_is_never_deleted(tiny_world, tmp_path, monkeypatch,
                                                                          outputs, overwrite):
    out = tmp_path / "out"
    if overwrite:
        lazymoe.merge(_config(tmp_path, tiny_world, 1), out, progress=False)

    def user_makes_a_folder(step):
        if step == "complete":
            if out.exists():  # the approved old output is replaced by the user's own folder meanwhile
                os.rename(out, tmp_path / "moved-away")
            out.mkdir()
            (out / "notes.txt").write_text("mine")

    monkeypatch.setattr(outdir, "on_step", user_makes_a_folder)
    with pytest.raises(OutputExistsError, match="created or changed by something else while the merge ran"):
        lazymoe.merge(_config(tmp_path, tiny_world, 2), out, progress=False, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"
    kept = tmp_path / ".out.lazymoe-new"
    assert _weights(kept) == outputs[2], "the finished merge is kept, under a name the message gives"

    monkeypatch.setattr(outdir, "on_step", None)
    with pytest.raises(OutputExistsError, match="not made by lazymoe"):  # still the user's: never replaced
        lazymoe.merge(_config(tmp_path, tiny_world, 2), out, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and kept.is_dir()
    (out / "notes.txt").unlink()  # once the user clears the name, the next run puts the kept merge there
    with outdir.OutputTarget(out):
        pass
    assert _weights(out) == outputs[2] and not kept.exists()


def test_leftovers_are_removed_whatever_pid_they_name(tiny_world, tmp_path):
    # PID reuse: in a container lazymoe often runs as PID 1 again, so a PID in a name proves nothing.
    # The lock proves it: whoever holds it knows no merge that left these folders is running.
    for name in (f".moe.lazymoe-partial-{os.getpid()}", ".moe.lazymoe-partial-1", ".moe.lazymoe-trash-1f2e3d4c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model-00001-of-00002.safetensors").write_bytes(bytes(1000))
    lazymoe.merge(_config(tmp_path, tiny_world, 1), tmp_path / "moe", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "moe-1.yaml"]


def test_the_lock_is_held_for_the_whole_merge_and_released_after(tiny_world, tmp_path):
    out = tmp_path / "moe"
    with outdir.OutputTarget(out):
        with pytest.raises(OutputBusyError, match="Another lazymoe merge is writing"):
            lazymoe.merge(_config(tmp_path, tiny_world, 1), out, progress=False)
    lazymoe.merge(_config(tmp_path, tiny_world, 1), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "moe-1.yaml"]


# ------------------------------------------------------------------------------------- defect 2


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_of_an_overwrite_never_loses_the_output(tiny_world, tmp_path, outputs, step):
    out = tmp_path / "out"
    lazymoe.merge(_config(tmp_path, tiny_world, 1), out, progress=False)
    killed = _driver("kill", step, tmp_path / "marker", "merge", str(_config(tmp_path, tiny_world, 2)), str(out),
                     "--overwrite")
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # right after the kill: the old or the new complete output exists as out, .out.lazymoe-new or -old,
    # and whatever is at `out` is complete (nothing half-written looks finished)
    complete = {p.name: _weights(p) for p in tmp_path.iterdir()
                if p.name in ("out", ".out.lazymoe-new", ".out.lazymoe-old")}
    assert set(complete.values()) & {outputs[1], outputs[2]}
    if out.exists():
        assert _weights(out) in (outputs[1], outputs[2])

    # the next run recognises what is left: a plan-free look (taking the lock) restores `out` ...
    with outdir.OutputTarget(out):
        pass
    # killed before the new output was complete: the old stays; after: the swap is finished
    assert _weights(out) == (outputs[1] if step in ("write", "complete") else outputs[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe-1.yaml", "moe-2.yaml", "out"], "no hidden leftovers"

    # ... and a merge again succeeds
    lazymoe.merge(_config(tmp_path, tiny_world, 2), out, progress=False, overwrite=True)
    assert _weights(out) == outputs[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe-1.yaml", "moe-2.yaml", "out"]


@pytest.mark.parametrize("step", ("write", "complete", "swap", "done"))  # a first merge moves nothing aside
def test_a_kill_at_any_step_of_a_first_merge_leaves_nothing_finished_looking_or_the_whole_output(
        tiny_world, tmp_path, outputs, step):
    out = tmp_path / "out"
    killed = _driver("kill", step, tmp_path / "marker", "merge", str(_config(tmp_path, tiny_world, 2)), str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if out.exists():
        assert _weights(out) == outputs[2]
    if step in ("write", "complete"):  # nothing was finished: the re-run builds it
        lazymoe.merge(_config(tmp_path, tiny_world, 2), out, progress=False)
    else:  # the killed run had finished it: the re-run finds (and restores) it, and asks before replacing
        with pytest.raises(OutputExistsError, match="already exists and is not empty: pass overwrite=True"):
            lazymoe.merge(_config(tmp_path, tiny_world, 2), out, progress=False)
    assert _weights(out) == outputs[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe-2.yaml", "out"]


def test_old_output_saved_aside_by_an_earlier_version_is_restored(tiny_world, tmp_path, outputs):
    # lazymoe <= 0.x named the moved-aside output .NAME.lazymoe-old-PID and deleted it on the next run
    old = lazymoe.merge(_config(tmp_path, tiny_world, 1), tmp_path / "ref", progress=False)
    os.rename(old, tmp_path / ".out.lazymoe-old-1")
    with outdir.OutputTarget(tmp_path / "out"):
        pass
    assert _weights(tmp_path / "out") == outputs[1]
