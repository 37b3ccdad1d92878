"""What a newcomer meets first (issue 13): optional parts say what to install, progress bars end at 100%,
the CLI takes -q/-v anywhere and --version, and the demo never replaces an earlier one silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lazymoe import __version__, cli
from lazymoe.optional import OPTIONAL, MissingDependency, require

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_a_missing_optional_part_is_one_line_naming_the_install(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` meets when it is not installed
    with pytest.raises(MissingDependency) as failure:
        require(module)
    message = str(failure.value)
    assert "\n" not in message and "which is not installed: " in message and "pip install" in message
    assert isinstance(failure.value, ImportError)


def test_route_without_matplotlib_is_one_cli_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["route", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == ('error: The routing picture needs matplotlib, which is not installed: '
                   'pip install "lazymoe[plot]" (or pip install matplotlib)\n')


def test_the_notebook_form_without_ipywidgets_says_what_to_install(tmp_path):
    code = "import sys; sys.modules['ipywidgets'] = None\nfrom lazymoe import ui"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        'lazymoe.optional.MissingDependency: The notebook form needs ipywidgets, which is not installed: '
        'pip install "lazymoe[notebook]" (or pip install ipywidgets)')


def test_quiet_and_verbose_work_after_the_subcommand_and_version_is_there(capsys):
    args = cli.build_parser().parse_args(["plan", "x.yaml", "-q"])
    assert args.quiet is True and args.verbose is False
    args = cli.build_parser().parse_args(["-v", "plan", "x.yaml"])
    assert args.verbose is True and args.quiet is False
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"lazymoe {__version__}\n"


def test_demo_refuses_to_replace_an_earlier_demo_without_overwrite(tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert cli.main(["demo", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'merged'} already holds a merged demo from an earlier run.")
    assert f"lazymoe demo {tmp_path} --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # nothing built, nothing replaced


def test_fitting_progress_bars_end_at_100_percent(tiny_world, tmp_path, monkeypatch):
    from helpers import moe_config
    from tqdm.auto import tqdm

    from lazymoe import gates
    from lazymoe.merge import merge

    closed: list[tuple[str, int, int]] = []

    class Recording(tqdm):
        def close(self):
            if not self.disable:
                closed.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(gates, "tqdm", Recording)
    config = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]])
    config.update(gate_mode="classifier", router_continuation_tokens=0)
    merge(config, tmp_path / "moe", progress=True)
    fitting = [c for c in closed if c[0].startswith("Router: fitting classifier")]
    assert fitting and all(n == total for _, n, total in fitting), closed


def test_every_subcommand_and_positional_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values()), helps
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings:  # a positional
                assert action.help, f"lazymoe {name} {action.metavar or action.dest} has no help text"
    assert "(default: 128)" in sub.choices["chat"].format_help()
