"""A stand-in for the ``google.colab`` package, as much of it as lazymoe touches.

The real one exists only inside Colab's image. This one behaves as documented for the parts we use:
``userdata.get(name)`` returns the secret or raises ``SecretNotFoundError`` (no such secret) or
``NotebookAccessError`` (the secret exists, but its "Notebook access" switch is off).
"""

from __future__ import annotations

import sys
import types

import pytest


def install_colab(monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str] | None = None, *,
                  no_access: tuple[str, ...] = ()) -> types.ModuleType:
    """Put ``google.colab`` (with ``userdata``) into ``sys.modules`` as Colab's kernel does at start-up.

    ``secrets`` are the user's secrets; those named in ``no_access`` exist but are not shared with the notebook.
    """
    secrets = dict(secrets or {})
    userdata = types.ModuleType("google.colab.userdata")

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    def get(key: str) -> str:
        if key in no_access:
            raise NotebookAccessError(key)
        if key not in secrets:
            raise SecretNotFoundError(key)
        return secrets[key]

    userdata.SecretNotFoundError, userdata.NotebookAccessError, userdata.get = SecretNotFoundError, NotebookAccessError, get
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    return colab
