"""Subcommands registered by feature modules; each registrar adds its parsers to the subparsers."""

from __future__ import annotations

REGISTRARS: list = []
