"""The publishing step: upload a merged folder, make its GGUF files, list them on its card, upload them as
``NAME-GGUF`` with their own card. One function behind ``lazymoe publish`` and the notebook's Upload and
GGUF steps, so both do the same things in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config
from ..errors import ModelNotFoundError
from ..gguf.convert import convert_to_gguf
from ..gguf.files import gguf_dir_of
from ..gguf.quants import DEFAULT_QUANTS, parse_quants
from ..io.folder import CARD_FILENAME, CONFIG_FILENAME, card_edited, is_lazymoe_output
from ..publish.card import rerender_card
from ..publish.gguf_card import write_gguf_card
from ..publish.hub import PushResult, check_no_stale_gguf, push_to_hub


@dataclass
class ReleaseResult:
    """What a release did: the model's repo (None when not uploaded), the GGUF files, the GGUF repo."""

    model: PushResult | None = None
    gguf_files: list[Path] = field(default_factory=list)
    gguf: PushResult | None = None


def release(
    model_dir: str | os.PathLike,
    repo: str | None = None,
    *,
    gguf: bool = False,
    quants: Iterable[str] = DEFAULT_QUANTS,
    upload_model: bool = True,
    private: bool = False,
    token: str | None = None,
    colab_secret: str = "HF_TOKEN",
    progress: bool = True,
    on_step: Callable[[str, object], None] | None = None,
) -> ReleaseResult:
    """Publish the merged folder ``model_dir``.

    With ``repo`` (``name`` or ``namespace/name``) the model is uploaded there; ``upload_model=False`` skips
    that upload for a model already pushed (then ``repo`` must be its full id). With ``gguf`` the folder is
    converted to F16 GGUF plus ``quants``, its local card re-rendered to list them and, with ``repo``, they
    are uploaded to ``REPO-GGUF`` with their own card. ``on_step(name, value)`` hears each finished step
    ("model", "gguf_files", "gguf") as it happens, for a front end that shows progress, and ("card_kept", path)
    once for each README.md that is the user's and is left (and uploaded) as it is, not lazymoe's card.
    """
    folder = Path(model_dir)
    if not is_lazymoe_output(folder):
        raise ModelNotFoundError(f"There is no merged model at {folder}: run the merge first (it writes "
                                 f"config.json and {CONFIG_FILENAME}).")
    say = on_step or (lambda name, value: None)
    told: set[Path] = set()

    def card_kept(where: Path) -> None:  # said before the step that leaves it, once per folder
        if where not in told and card_edited(where):
            told.add(where)
            say("card_kept", where / CARD_FILENAME)

    result = ReleaseResult()
    repo_id = repo
    outtype = "f16"
    if gguf and repo:  # before any upload or conversion: files of an earlier merge this run would not replace
        name = folder.resolve().name
        remade = [f"{name}.{tag}.gguf" for tag in (outtype.upper(), *parse_quants(quants))]
        check_no_stale_gguf(gguf_dir_of(folder), remade=remade)
    if repo and upload_model:
        card_kept(folder)
        result.model = push_to_hub(folder, repo, private=private, token=token, colab_secret=colab_secret,
                                   progress=progress)
        repo_id = result.model.repo_id
        say("model", result.model)
    if not gguf:
        return result
    result.gguf_files = convert_to_gguf(folder, outtype=outtype, quants=quants, progress=progress)
    say("gguf_files", result.gguf_files)
    gguf_repo = f"{repo_id}-GGUF" if repo_id else None
    options = {"repo_id": repo_id, "gguf_repo": gguf_repo, "gguf_files": result.gguf_files}
    card_kept(folder)
    rerender_card(folder, **{k: v for k, v in options.items() if v})  # the local card lists the files
    if repo_id:
        gguf_dir = result.gguf_files[0].parent
        card_kept(gguf_dir)
        write_gguf_card(gguf_dir, base_repo_id=repo_id, repo_id=gguf_repo,
                        license=load_config(folder / CONFIG_FILENAME).license)
        result.gguf = push_to_hub(gguf_dir, gguf_repo, private=private, token=token, colab_secret=colab_secret,
                                  progress=progress)
        say("gguf", result.gguf)
    return result
