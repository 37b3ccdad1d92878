"""The command line ends its process without the interpreter's teardown (``cli.exit_now``), but not before
exit handlers ran, output was flushed and every thread the interpreter would wait for has finished."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_exit_now_runs_exit_handlers_flushes_and_keeps_the_status(tmp_path):
    log = tmp_path / "log.txt"
    done = _python(
        "import atexit, logging, sys\n"
        "from lazymoe.cli import exit_now\n"
        f"logging.basicConfig(filename={str(log)!r}, level=logging.INFO)\n"
        "logging.getLogger('x').info('logged before exit')\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "print('partial line without newline', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "exit_now(3)\n"
        "print('never printed')\n")
    assert done.returncode == 3
    assert done.stdout == "partial line without newlineexit handler ran\n"
    assert done.stderr == "to stderr"
    assert log.read_text().strip() == "INFO:x:logged before exit"


def test_exit_now_waits_for_a_thread_the_interpreter_would_wait_for(tmp_path):
    marker = tmp_path / "finished"
    done = _python(
        "import threading, time\n"
        "from pathlib import Path\n"
        "from lazymoe.cli import exit_now\n"
        f"t = threading.Thread(target=lambda: (time.sleep(0.5), Path({str(marker)!r}).write_text('done')))\n"
        "t.start()\n"
        "exit_now(0)\n")
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "done", "a non-daemon thread finishes before the process ends"


def test_python_m_lazymoe_ends_with_the_commands_status():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "lazymoe", "--version"], capture_output=True, text=True, env=env)
    bad = subprocess.run([sys.executable, "-m", "lazymoe", "plan", "/nonexistent/recipe.yml"], capture_output=True,
                         text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("lazymoe ")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_a_late_ctrl_c_cannot_break_the_exit_handlers():
    """Once the work is done, SIGINT is ignored while the exit handlers run (a Ctrl-C there printed a
    traceback from one of torch's handlers after a push had succeeded)."""
    done = _python(
        "import atexit, signal\n"
        "from lazymoe.cli import exit_now\n"
        "atexit.register(lambda: print('ignored' if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 'live'))\n"
        "exit_now(0)\n")
    assert done.returncode == 0 and done.stdout == "ignored\n", done.stderr


def test_a_reader_that_goes_away_is_no_error(tiny_world, tmp_path):
    """`lazymoe plan R | head -1`: the pipe closes, the command stops quietly with a shell's SIGPIPE status
    (it said "error: Broken pipe; check the path" and exited 2)."""
    from helpers import moe_config
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]])))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write fails with a broken pipe
    try:
        done = subprocess.run([sys.executable, "-m", "lazymoe", "-q", "plan", str(recipe)], stdout=w,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(w)
    assert done.returncode == 141 and done.stderr == "", (done.returncode, done.stderr)
