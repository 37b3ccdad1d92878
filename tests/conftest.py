"""Shared fixtures. Each engineer's fixtures live in their own marked section."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# bench/worlds.py (the trained test worlds) is not part of the package: tests import it from bench/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# Tests never touch the real network or a real token.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- model fixtures ---

@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a dense base, three perturbed experts and two byte-identical copies of the base."""
    from lazymoe.demo import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok = build_tokenizer(root / "tokenizer")
    base = build_model(root / "base", tokenizer_dir=tok, seed=0, initializer_range=0.2, max_shard_bytes=40_000)
    world = {"tokenizer": tok, "base": base}
    for i, name in enumerate(("chat", "code", "math")):
        world[name] = build_model(root / name, tokenizer_dir=tok, base=base, perturb=0.3, seed=100 + i)
    for name in ("same1", "same2"):
        world[name] = build_model(root / name, tokenizer_dir=tok, base=base, perturb=0.0)
    return world


@pytest.fixture
def recipe(tiny_world, tmp_path) -> Path:
    """A two-expert recipe over the tiny world that merges in a second (random gates: no router pass)."""
    import yaml

    from helpers import moe_config

    path = tmp_path / "moe.yaml"
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=7)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def merged(recipe, tmp_path) -> Path:
    """``recipe`` merged into tmp_path/moe (a module may define its own ``merged``, which then wins)."""
    import lazymoe

    return lazymoe.merge(recipe, tmp_path / "moe", progress=False)


# --- evaluation fixtures ---

@pytest.fixture(scope="session")
def trained_world(tmp_path_factory):
    """bench/worlds.py's tiny trained world (four domains, MLP-only experts): base and expert losses really differ."""
    from worlds import TINY_SPEC, build_world

    return build_world(tmp_path_factory.mktemp("trained-world"), TINY_SPEC, progress=False)


# --- hub fixtures ---
# The real huggingface_hub client talks to tests/hubserver.py. huggingface_hub copies its endpoint, cache and
# token paths into module constants when it is imported, so setting environment variables is not enough: the
# constants are patched as well (monkeypatch restores everything after each test). The environment variables
# are set too, for subprocesses (a CLI run) that import huggingface_hub afresh.

import sys as _sys  # noqa: E402 - each section of this shared conftest keeps its imports with it
import time as _time  # noqa: E402
from urllib.parse import urlsplit as _urlsplit  # noqa: E402

from hubserver import HubServer, add_test_accounts  # noqa: E402

#: the discard port: nothing listens there, so a request a test forgot to point at a HubServer fails at once
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Make every huggingface_hub call (and transformers' shared HfApi) go to ``endpoint``."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # hf_hub_url formats this template, built from the endpoint at import time
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {_urlsplit(endpoint).hostname}))
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # the instance behind huggingface_hub.whoami() & co.
    if hasattr(_http, "_HUB_ORIGINS"):  # origins whose redirects keep the Authorization header
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    transformers_hub = _sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)  # rebuilt on next use, with the new endpoint


_HUB_ENV_TO_UNSET = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH",
)
# Xet off: uploads take the plain HTTP + LFS path the test server implements
_HUB_ENV_FLAGS = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


@pytest.fixture(autouse=True)
def _hub_isolation(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every test off the real Hub and away from the developer's token and cache.

    HF_HUB_OFFLINE is deliberately not set: hub tests talk to a local server. Instead the endpoint points at
    a port where nothing listens, HF_HOME is a fresh folder (no saved login, empty cache) and HF_TOKEN is unset.
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    for name in _HUB_ENV_TO_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"HF_HOME": str(home), **_HUB_ENV_FLAGS}.items():
        monkeypatch.setenv(name, value)
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }
    for name, path in paths.items():
        monkeypatch.setattr(constants, name, str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in _HUB_ENV_FLAGS:
        monkeypatch.setattr(constants, name, True)
    point_hub_client_at(monkeypatch, UNREACHABLE_ENDPOINT)


class _NoSleep:
    """``time`` without sleeping: the client's retry back-off (1+2+4+8+8 s) would make failure tests crawl."""

    def __getattr__(self, name: str):
        return getattr(_time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A running HubServer with the test accounts (see ``hubserver.add_test_accounts``); the client points at it.

    Yields the server: ``hub.url``, ``hub.publish_folder(...)``, ``hub.requests_of(kind)``, ``hub.fail(...)``.
    The client's retry back-off sleeps are skipped, so injected failures cost milliseconds.
    """
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    with HubServer() as server:
        add_test_accounts(server)
        point_hub_client_at(monkeypatch, server.url)
        for module in (_http, file_download):
            if hasattr(module, "time"):
                monkeypatch.setattr(module, "time", _NoSleep())
        yield server
        unknown = [f"{r.method} {r.path}" for r in server.requests_of("unknown")]
        assert not unknown, f"the client called routes tests/hubserver.py does not implement: {unknown}"
        assert not server.server_errors, f"tests/hubserver.py failed to answer: {server.server_errors}"


# --- notebook fixtures ---
# Kernels started by tests (nbclient, JupyterLab) import lazymoe from this checkout, stay offline and keep their
# IPython/Jupyter state in temporary folders.

_REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def kernel_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables for a Jupyter kernel or server started by a test (returned as a dict too)."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(_REPO_ROOT)] + ([path] if path else [])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a notebook that tried to pip install anything would fail loudly
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    return dict(os.environ)


@pytest.fixture
def run_notebook(kernel_env):
    """``run_notebook(path, cwd, allow_errors=False)`` executes a notebook top to bottom in ``cwd``; returns it."""
    import nbformat
    from nbclient import NotebookClient

    def run(path: Path, cwd: Path, *, allow_errors: bool = False, timeout: int = 600):
        nb = nbformat.read(str(path), as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                                resources={"metadata": {"path": str(cwd)}})
        try:
            client.execute()
        finally:
            nbformat.write(nb, str(cwd / f"executed-{Path(path).name}"))  # kept for reading failures
        return nb

    return run
