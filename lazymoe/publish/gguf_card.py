"""The card of a model's ``NAME-GGUF`` repo, and the GGUF file list both cards show (smallest first, with the
quant a reader should pick)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CardError
from ..gguf.files import GGUFFile, find_gguf_files
from ..gguf.quants import BY_NAME as QUANTS_BY_NAME
from ..gguf.quants import PREFERENCE as QUANT_PREFERENCE
from ..io.folder import card_kept_because, write_card_text
from ..units import human_bytes
from .facts import CARD_FILENAME, EXAMPLE_PROMPT, GGUF_TAGS, HUB_URL, check_repo_id, resolve_license
from .render import render_gguf_card

logger = logging.getLogger(__name__)


def gguf_rows(files: list[GGUFFile]) -> list[dict[str, Any]]:
    return [
        {"name": f.name, "quant": f.quant, "size_bytes": f.size_bytes, "size": human_bytes(f.size_bytes),
         "note": QUANTS_BY_NAME[f.quant].note if f.quant in QUANTS_BY_NAME else ""}
        for f in sorted(files, key=lambda f: (f.size_bytes, f.name))  # smallest first, as GGUF repos list them
    ]


def default_quant(files: list[GGUFFile]) -> str | None:
    quants = [f.quant for f in files if f.quant]
    for quant in QUANT_PREFERENCE:  # ordered by what a reader should pick first
        if quant in quants:
            return quant
    return quants[0] if quants else None


def gguf_card_data(
    gguf_files: Iterable[GGUFFile],
    *,
    base_repo_id: str,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """Data for the ``NAME-GGUF`` repo's card: the merged repo it quantises and its files."""
    files = list(gguf_files)
    if not files:
        raise CardError("A GGUF card needs at least one .gguf file; run lazymoe gguf first.")
    check_repo_id(base_repo_id, "base_repo_id")
    check_repo_id(repo_id, "repo_id")
    repo_id = repo_id or f"{base_repo_id}-GGUF"
    quant = default_quant(files)
    default_file = next((f.name for f in files if f.quant == quant), files[0].name)
    return {
        "front_matter": {
            "license": resolve_license(license),
            "base_model": base_repo_id,
            "base_model_relation": "quantized",
            "pipeline_tag": "text-generation",
            "tags": list(GGUF_TAGS),
        },
        "model_name": model_name or repo_id.rsplit("/", 1)[-1],
        "repo_id": repo_id,
        "base_repo_id": base_repo_id,
        "base_url": f"{HUB_URL}/{base_repo_id}",
        "files": gguf_rows(files),
        "quant": quant,
        "default_file": default_file,
        "prompt": EXAMPLE_PROMPT,
    }



def build_gguf_card(
    gguf_files: Iterable[GGUFFile],
    *,
    base_repo_id: str,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> str:
    """The ``NAME-GGUF`` card's text for ``gguf_files``; writes nothing (an upload can use it)."""
    return render_gguf_card(gguf_card_data(gguf_files, base_repo_id=base_repo_id, repo_id=repo_id,
                                           model_name=model_name, license=license))


def write_gguf_card(
    gguf_dir: str | os.PathLike,
    *,
    base_repo_id: str,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    replace_edited: bool = False,
) -> Path | None:
    """Write ``gguf_dir/README.md`` listing its ``*.gguf`` files as quantisations of ``base_repo_id``, and record
    its hash as a merged model's card does. A card edited by hand since lazymoe wrote it, or a README.md lazymoe did
    not write, is left as it is (None, and a warning) unless ``replace_edited``: ``publish`` writes this card as a
    side effect."""
    folder = Path(gguf_dir)
    kept = None if replace_edited else card_kept_because(folder)
    if kept:
        logger.warning("%s %s, so it is left as it is (the push uploads it as it is); `lazymoe card %s --gguf-of "
                       "%s --overwrite` replaces it with lazymoe's card.", folder / CARD_FILENAME, kept, folder,
                       base_repo_id)
        return None
    text = build_gguf_card(find_gguf_files(folder), base_repo_id=base_repo_id, repo_id=repo_id,
                           model_name=model_name, license=license)
    return write_card_text(folder, text)
