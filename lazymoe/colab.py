"""Google Colab, as lazymoe meets it: telling that it runs there, and reading a user's secret.

``google.colab`` is never imported outside Colab (its kernel imports it at start-up, so the module is
already in ``sys.modules`` there); everything else works without it.
"""

from __future__ import annotations

import importlib
import os
import sys

#: where a Colab notebook starts (its working directory): the notebook writes its models there
CONTENT_DIR = "/content"


def in_colab() -> bool:
    """True inside a Colab kernel (Colab Enterprise included)."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def has_user_secrets() -> bool:
    """Colab's Secrets panel (the key icon) exists in Colab, not in Colab Enterprise."""
    return in_colab() and os.environ.get("VERTEX_PRODUCT") != "COLAB_ENTERPRISE"


def read_secret(name: str) -> tuple[str | None, str | None]:
    """The value of Colab secret ``name``, or None and a note saying why it could not be read."""
    try:
        userdata = importlib.import_module("google.colab.userdata")
    except ImportError:
        return None, None
    try:
        value = userdata.get(name)
    except Exception as error:  # SecretNotFoundError, NotebookAccessError, or whatever the vault raises
        kind = type(error).__name__
        if kind == "NotebookAccessError":
            return None, (
                f"the Colab secret {name!r} exists but this notebook may not read it: "
                "switch on 'Notebook access' for it in the Secrets panel (key icon)"
            )
        if kind == "SecretNotFoundError":
            return None, f"there is no Colab secret named {name!r}"
        return None, f"reading the Colab secret {name!r} failed ({kind})"
    value = (value or "").strip()
    return (value or None), (None if value else f"the Colab secret {name!r} is empty")
