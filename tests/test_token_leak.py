"""Issue 11, serious defect 3: a token with a newline or control character is never printed anywhere.

Malformed tokens are refused before any client sees them, with a message that never echoes them; and
every escaped form of a token (repr of str or bytes, JSON, URL-quoted, cut at whitespace) is scrubbed from
messages and tracebacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lazymoe
from lazymoe.io import sources
from lazymoe.publish import hub
from lazymoe.cli import main
from lazymoe.errors import HubError, LazyMoEError
from lazymoe.io.token import check_token, redact
from lazymoe.io.safetensors import build_header

SECRET = "hf_Zq8sTy3LmNoP4vW"
# (a token with only a trailing newline is fine: surrounding whitespace is stripped)
MALFORMED = [SECRET + "\nx", SECRET + "\r\nx", "x\n" + SECRET, SECRET + "\x00", SECRET + "\x1b[31m", SECRET + " tail",
             SECRET + "\tx", SECRET + "é", "hf_\u202eZq8sTy3LmNoP4vW"]


def _pieces(token: str) -> list[str]:
    """Every fragment of the token long enough to identify it, raw and escaped."""
    forms = {token, repr(token)[1:-1], json.dumps(token)[1:-1], repr(token.encode("utf-8", "replace"))[2:-1]}
    return [f for f in forms if len(f) >= 8] + [SECRET, SECRET[3:]]


def _assert_absent(text: str, token: str) -> None:
    for piece in _pieces(token):
        assert piece not in text, f"{piece!r} leaked"


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    (folder / "model.safetensors").write_bytes(build_header([("w", "F32", (2,), 8)]) + bytes(8))
    return folder


@pytest.mark.parametrize("token", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_token_argument_is_refused_without_being_printed(model_folder, capsys, token):
    code = main(["-q", "push", str(model_folder), "me/moe", "--token", token])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "The token from your --token argument contains" in err
    _assert_absent(out + err, token)


@pytest.mark.parametrize("token", [t for t in MALFORMED if "\x00" not in t][:4], ids=range(4))  # no NUL in env
def test_a_malformed_HF_TOKEN_is_refused_by_a_real_process_without_being_printed(model_folder, token):
    env = {**os.environ, "HF_TOKEN": token, "PYTHONPATH": str(Path(lazymoe.__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "lazymoe", "-v", "push", str(model_folder), "me/moe"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "your HF_TOKEN environment variable contains" in proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_absent(proc.stdout + proc.stderr, token)


def test_a_malformed_HF_TOKEN_is_refused_before_reading_a_hub_model(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET + "\x01")
    with pytest.raises(HubError, match="HF_TOKEN environment variable contains a control character") as caught:
        sources.describe(sources.ModelRef.parse("org/model"))
    _assert_absent(str(caught.value), SECRET + "\x01")


@pytest.mark.parametrize("template", [
    "Illegal header value b'Bearer {escaped_bytes}'",  # httpx / h11
    "Invalid header value {repr}",  # requests / http.client
    'headers: {{"authorization": "Bearer {json}"}}',
    "url: https://hub/api?token={quoted}",
    "value {raw} end",
    "value {collapsed} end",  # what a message looks like once its whitespace is reflowed
])
@pytest.mark.parametrize("token", MALFORMED[:3] + [SECRET], ids=range(4))
def test_every_escaped_form_of_a_token_is_scrubbed(template, token):
    from urllib.parse import quote

    text = template.format(escaped_bytes=repr(token.encode())[2:-1], repr=repr(token), json=json.dumps(token)[1:-1],
                           quoted=quote(token, safe=""), raw=token, collapsed=" ".join(token.split()))
    scrubbed = redact(text, [token])
    _assert_absent(scrubbed, token)
    assert "hf_***" in scrubbed


def test_client_errors_are_explained_without_the_token(monkeypatch):
    token = hub._Token(SECRET, hub._TOKEN_ARGUMENT)
    error = ValueError(f"Illegal header value b'Bearer {SECRET}\\nx'")
    message = hub._explain(error, token, "https://huggingface.co", "me/moe", "connect")
    _assert_absent(message, SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET + "\n")
    explained = str(sources._hub_error(sources.ModelRef.parse("org/m"), RuntimeError(f"header {SECRET!r}")))
    _assert_absent(explained, SECRET)


def test_an_unexpected_error_s_traceback_is_scrubbed(monkeypatch, capsys, model_folder):
    def buggy(folder, repo, **kwargs):
        raise RuntimeError(f"bug while sending Authorization: Bearer {kwargs['token']!r}")

    monkeypatch.setattr(hub, "push_to_hub", buggy)
    code = main(["-q", "push", str(model_folder), "me/moe", "--token", SECRET])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" in err and "RuntimeError: bug while sending" in err
    _assert_absent(out + err, SECRET)


def test_check_token_names_the_fault_and_never_the_value():
    for token in MALFORMED:
        with pytest.raises(LazyMoEError) as caught:
            check_token(token, "your Colab secret 'HF_TOKEN'")
        assert "your Colab secret 'HF_TOKEN' contains" in str(caught.value)
        _assert_absent(str(caught.value), token)
    assert check_token(SECRET, "x") == SECRET


def test_the_notebook_token_box_refuses_a_malformed_token_without_showing_it():
    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.form import MoEForm

    form = MoEForm()
    form.token_box.value = SECRET + "\nx"
    assert form.token is None and form.token_box.value == ""
    assert "contains a line break" in form.token_status.value
    _assert_absent(form.token_status.value, SECRET + "\nx")
    form.token_box.value = SECRET
    assert form.token == SECRET and SECRET not in form.token_status.value


def test_plan_push_with_a_malformed_token_reports_it_without_printing_it(tmp_path, capsys):
    from lazymoe.demo import build_demo

    config = build_demo(tmp_path / "inputs")
    token = SECRET + "\nx"
    code = main(["-q", "plan", str(config), "--push", "me/moe", "--token", token])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert "contains a line break" in out + err
    _assert_absent(out + err, token)
