"""A stand-in for the ``google.colab`` package, as much of it as lazymoe touches.

The real one exists only inside Colab's image. This one behaves as documented for the parts we use:
``userdata.get(name)`` returns the secret or raises ``SecretNotFoundError`` (no such secret) or
``NotebookAccessError`` (the secret exists, but its "Notebook access" switch is off);
``drive.mount(path)`` makes ``path/MyDrive`` appear (after the user's consent, in the real one) and is
recorded in ``drive.mounted``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

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
    drive = types.ModuleType("google.colab.drive")
    drive.mounted = []

    def mount(mountpoint: str, force_remount: bool = False) -> None:
        Path(mountpoint, "MyDrive").mkdir(parents=True, exist_ok=True)
        drive.mounted.append(mountpoint)

    drive.mount = mount
    colab = types.ModuleType("google.colab")
    colab.userdata, colab.drive = userdata, drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    return colab
