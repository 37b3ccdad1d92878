"""The notebooks' own test, the way notebook users test them: ``pytest --nbval-lax`` runs every code cell in
order and fails on the first cell that raises (the README's ``python -m pytest`` runs the demo notebook this
way, see ``testpaths`` and ``addopts`` in pyproject.toml).

nbval starts each notebook's kernel in the notebook's own folder, and the notebooks write next to
themselves (the demo models, the merged model, the form's saved YAML). Here the kernel starts offline, with
this checkout's lazymoe importable and its IPython state in a temporary folder, and moves into that folder
before the first cell runs, so a test run never writes into the checkout.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from nbval.plugin import IPyNbFile

#: the checkout whose lazymoe the kernel imports (as tests/conftest.py's kernels do)
_REPO_ROOT = Path(__file__).resolve().parent.parent
#: seconds the kernel may take to change folder before the first cell
_CHDIR_TIMEOUT_S = 60


class NotebookInTempDir(IPyNbFile):
    """nbval's notebook collector, with the kernel working in a temporary folder removed afterwards."""

    workdir: Path | None = None

    def setup(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"nbval-{self.path.stem}-"))
        with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
            env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])))
            env.setenv("HF_HUB_OFFLINE", "1")
            env.setenv("PIP_NO_INDEX", "1")  # a notebook that tried to pip install anything fails loudly
            env.setenv("PIP_CONFIG_FILE", os.devnull)
            env.setenv("IPYTHONDIR", str(self.workdir / ".ipython"))
            env.setenv("JUPYTER_PLATFORM_DIRS", "1")
            super().setup()
        # __import__ leaves no name behind in the notebook's namespace
        msg_id = self.kernel.execute_cell_input(f"__import__('os').chdir({str(self.workdir)!r})", allow_stdin=False)
        self.kernel.await_reply(msg_id, timeout=_CHDIR_TIMEOUT_S)
        self.kernel.await_idle(msg_id, _CHDIR_TIMEOUT_S)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Swap nbval's collector for the one above (the same cells, the same checks, another folder)."""
    collected = yield
    return [NotebookInTempDir.from_parent(parent, path=file_path) if type(c) is IPyNbFile else c
            for c in collected or []]
