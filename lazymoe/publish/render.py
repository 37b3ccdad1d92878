"""Markdown rendering of the cards: the Jinja environment, the filters that keep user text literal, the templates.

The templates live in the repository's top-level ``templates/`` folder; ``lazymoe/publish/templates`` links to
it, so a checkout and an installed wheel (which carries the files themselves) read them from the same place.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..errors import CardError

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
MODEL_TEMPLATE = "model_card.md.j2"
GGUF_TEMPLATE = "gguf_card.md.j2"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def _template_source(name: str) -> str:
    path = TEMPLATES_DIR / name
    if not path.is_file():
        raise CardError(f"Card template {name} is missing from this lazymoe installation; reinstall lazymoe.")
    return path.read_text(encoding="utf-8")


def md_escape(text: str) -> str:
    """Literal text inside Markdown, including table cells: special characters escaped, newlines as <br>."""
    text = _MD_SPECIAL.sub(r"\\\1", str(text).strip())
    return re.sub(r"\r\n|\r|\n", "<br>", text)


def md_code(text: str) -> str:
    """An inline code span that survives backticks and, in tables, pipes."""
    text = str(text)
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text.replace('|', chr(92) + '|')}{pad}{ticks}"


def md_fenced(text: str, lang: str = "") -> str:
    """A fenced code block that holds ``text`` unchanged, whatever backtick runs it contains."""
    fence = "`" * max(3, max((len(run) + 1 for run in re.findall(r"`{3,}", text)), default=3))
    return f"{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"


def _py_str(text: str) -> str:
    return json.dumps(str(text), ensure_ascii=False)  # a JSON string is a valid Python string literal


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_template_source),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML: the filters below escape what needs it
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md=md_escape, code=md_code, fenced=md_fenced, py=_py_str,
                       thousands=lambda n: f"{n:,}")
    return env


def _render(template: str, data: dict[str, Any]) -> str:
    front = yaml.safe_dump(data["front_matter"], sort_keys=False, allow_unicode=True, default_flow_style=False)
    return _environment().get_template(template).render(data, front_matter_yaml=front)


def render_card(data: dict[str, Any]) -> str:
    """README.md text of a merged model from :func:`card_data`'s dict (a missing field raises UndefinedError)."""
    return _render(MODEL_TEMPLATE, data)


def render_gguf_card(data: dict[str, Any]) -> str:
    """README.md text of a ``NAME-GGUF`` repo from :func:`gguf_card_data`'s dict."""
    return _render(GGUF_TEMPLATE, data)
