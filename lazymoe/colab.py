"""Where lazymoe runs: inside a Colab kernel or not, asked the same way by the notebook and the token lookup."""

from __future__ import annotations

import os
import sys


def in_colab() -> bool:
    """True inside a Colab kernel (which imports ``google.colab`` at start-up); never imports it here."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def has_colab_secrets() -> bool:
    """True where ``google.colab.userdata`` can hold the token: Colab, but not Colab Enterprise (no user secrets)."""
    return in_colab() and os.environ.get("VERTEX_PRODUCT") != "COLAB_ENTERPRISE"
