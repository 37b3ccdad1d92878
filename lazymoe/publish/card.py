"""The model card: the README.md of a merged folder (its ``NAME-GGUF`` repo's card is ``gguf_card``).

Card = data + template. ``card_data()`` turns facts about a finished model (``facts.ModelFacts``) into a plain
dict; the Jinja templates in ``templates/`` only lay it out (``render.py``). The front matter is that
dict's ``front_matter`` dumped by ``yaml.safe_dump``, never YAML written by hand, and rendering uses
``StrictUndefined`` so a misspelt field fails loudly instead of leaving a hole in a published card.

The facts come from one of two places that must agree byte for byte: the merge plan (``write_card``, called
by ``merge()`` just before the output folder is renamed into place) or the finished folder alone
(``rerender_card``, behind ``lazymoe card MODEL_DIR``): config.json, ``lazymoe_config.yml`` and the
safetensors headers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..config import MoEConfig
from ..errors import CardError, Setting, Text
from ..gguf.files import GGUFFile, find_gguf_files, gguf_dir_of, stale_gguf_files
from ..io.folder import CONFIG_FILENAME, card_edited, card_kept_because, write_card_text
from ..moe import arch
from ..router.modes import BY_NAME as GATE_MODES_BY_NAME
from ..units import human_params
from .eval_report import (
    ANSWERS_MD,
    EVAL_IMAGE,
    EVAL_JSON,
    EvalReport,
    answers_for_card,
    benchmark_table,
    model_index,
    read_benchmarks,
)
from .facts import (
    BASE_TAGS,
    CARD_FILENAME,
    EXAMPLE_PROMPT,
    HUB_URL,
    PLACEHOLDER_NAMESPACE,
    ROUTING_IMAGE,
    ModelFacts,
    check_repo_id,
    hub_ref,
    resolve_license,
)
from .gguf_card import default_quant, gguf_rows
from .render import render_card

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # the plan is only read here; moe/ never imports publish/
    from ..moe.plan import MergePlan

__all__ = ["CARD_FILENAME", "ROUTING_IMAGE", "ModelFacts", "build_card", "card_data", "card_edited",
           "card_kept_because", "detected_extras", "rerender_card", "write_card", "write_card_text"]


# ---------------------------------------------------------------------------------------- data


def _source(ref: str, local_refs: frozenset[str]) -> dict[str, Any]:
    parsed = None if ref in local_refs else hub_ref(ref)
    if parsed is None:
        return {"ref": ref, "repo_id": None, "url": None}
    repo_id, revision = parsed.repo_id, parsed.revision
    url = f"{HUB_URL}/{quote(repo_id)}" + (f"/tree/{quote(revision, safe='')}" if revision else "")
    return {"ref": ref, "repo_id": repo_id, "url": url}


def _expert_notes(expert) -> str:
    notes = []
    if expert.noise_scale is not None:
        notes.append(f"noise_scale {expert.noise_scale:g}")
    if expert.residual_scale is not None:
        notes.append(f"residual_scale {expert.residual_scale:g}")
    return ", ".join(notes)


def card_data(
    facts: ModelFacts,
    *,
    model_name: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    gguf_repo: str | None = None,
    gguf_files: Iterable[GGUFFile] | None = None,
    routing_image: str | None = None,
    evaluation: EvalReport | None = None,
    eval_image: str | None = None,
    answers_markdown: str | None = None,
    benchmarks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the model card template shows, as plain data (see :func:`render_card`).

    ``repo_id`` is where the model lives on the Hub (used in the usage snippet; a placeholder otherwise);
    ``routing_image`` and ``eval_image`` are paths relative to the model folder; ``evaluation`` is what
    ``lazymoe eval`` measured, ``answers_markdown`` the side-by-side answers it saved for the card and
    ``benchmarks`` its lm-evaluation-harness results (also written as ``model-index`` metadata).
    """
    check_repo_id(repo_id, "repo_id")
    check_repo_id(gguf_repo, "gguf_repo")
    config = facts.config
    name = model_name or (repo_id.rsplit("/", 1)[-1] if repo_id else facts.folder_name)
    if not name.strip():
        name_it = Setting("model_name", ...)
        raise CardError(Text(f"The model name is empty; {name_it.placeholder}.", (name_it,)))
    files = list(gguf_files or [])
    if gguf_repo is None and files and repo_id:
        gguf_repo = f"{repo_id}-GGUF"
    sources = [_source(ref, facts.local_refs) for ref in config.model_refs()]
    base_model = list(dict.fromkeys(s["repo_id"] for s in sources if s["repo_id"]))
    front: dict[str, Any] = {"license": resolve_license(license, config)}
    if base_model:
        front["base_model"] = base_model
        front["base_model_relation"] = "merge"
    output = arch.OUTPUTS[facts.output]
    front.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": [*BASE_TAGS, output.model_type]})
    index = model_index(benchmarks, name) if benchmarks else []
    if index:
        front["model-index"] = index
    by_ref = {s["ref"]: s for s in sources}
    experts = [
        {"index": i, "source": by_ref[e.source_model], "positive_prompts": list(e.positive_prompts),
         "negative_prompts": list(e.negative_prompts), "notes": _expert_notes(e)}
        for i, e in enumerate(config.experts)
    ]
    return {
        "front_matter": front,
        "model_name": name,
        "sources": sources,
        "base": by_ref[config.base_model],
        "experts": experts,
        "has_negative_prompts": any(e["negative_prompts"] for e in experts),
        "has_expert_notes": any(e["notes"] for e in experts),
        "num_experts": config.num_experts,
        "experts_per_token": config.experts_per_token,
        "gate_mode": config.gate_mode,
        # a mode added later without a note must not fail the card at the end of a long merge
        "gate_mode_note": GATE_MODES_BY_NAME[config.gate_mode].card_note
        if config.gate_mode in GATE_MODES_BY_NAME else "see the configuration below",
        "uses_prompts": config.uses_prompts,
        "total_params": facts.total_params,
        "active_params": facts.active_params,
        "total_params_human": human_params(facts.total_params),
        "active_params_human": human_params(facts.active_params),
        "dtype": facts.dtype,
        "layout": facts.layout,
        "output_name": output.name,
        "architecture": output.architecture,
        "per_expert_names": "block_sparse_moe" if output.key == "mixtral" else "mlp.experts.N",
        "shared_expert": _shared_row(config, by_ref) if output.shared_block else None,
        "num_layers": facts.num_layers,
        "hidden_size": facts.hidden_size,
        "vocab_size": facts.vocab_size,
        "context_length": facts.context_length,
        "config_yaml": facts.config_yaml,
        "config_filename": CONFIG_FILENAME,
        "seed": config.seed,
        "usage": {
            "model_id": repo_id or f"{PLACEHOLDER_NAMESPACE}/{name}",
            "is_placeholder": repo_id is None,
            "chat": facts.has_chat_template,
            "prompt": EXAMPLE_PROMPT,
        },
        "gguf": {
            "repo": gguf_repo,
            "url": f"{HUB_URL}/{gguf_repo}" if gguf_repo else None,
            "files": gguf_rows(files),
            "quant": default_quant(files),
        } if (gguf_repo or files) else None,
        "routing_image": routing_image,
        "evaluation": {**evaluation.card_data(), "image": eval_image} if evaluation is not None else None,
        "answers_markdown": answers_markdown,
        "benchmarks": benchmark_table(benchmarks) if benchmarks else None,
    }


def _shared_row(config: MoEConfig, by_ref: dict) -> dict[str, Any]:
    """The card's line on Qwen MoE's shared expert: which model, and what gates it."""
    spec = config.shared_expert
    if spec is None:
        return {"source": None, "gate": "none (an all-zero shared expert: Qwen2-MoE always has one)"}
    gate = ("its prompts: " + "; ".join(spec.positive_prompts) if spec.positive_prompts and config.gate_mode
            not in ("centroid", "classifier") else "constant 1/2")
    return {"source": by_ref[spec.source_model], "gate": gate}



# ---------------------------------------------------------------------------------------- files


def _routing_ref(folder: Path, image: str | os.PathLike | None) -> str | None:
    """The image's path relative to the model folder; it must be inside it to be uploaded with the card."""
    if image is None:
        return None
    path = Path(image)
    path = (path if path.is_absolute() else folder / path).resolve()
    root = folder.resolve()
    if root not in path.parents:
        raise CardError(f"The routing image {image} is not inside {folder}; save or copy it there so it is "
                        "uploaded with the model, and give its path relative to the folder.")
    if not path.is_file():
        raise CardError(f"The routing image {path} does not exist.")
    return path.relative_to(root).as_posix()


def _options(folder: Path, gguf_files_or_dir, routing_image) -> dict[str, Any]:
    return {
        "gguf_files": find_gguf_files(gguf_files_or_dir) if gguf_files_or_dir is not None else None,
        "routing_image": _routing_ref(folder, routing_image),
    }


def _evaluation_options(folder: Path) -> dict[str, Any]:
    """What ``lazymoe eval`` left in the folder for the card: eval.json (+ eval.png), answers marked for it."""
    out: dict[str, Any] = {}
    if (folder / EVAL_JSON).is_file():
        out["evaluation"] = EvalReport.read(folder)
        if (folder / EVAL_IMAGE).is_file():
            out["eval_image"] = EVAL_IMAGE
    if answers_for_card(folder):
        out["answers_markdown"] = (folder / ANSWERS_MD).read_text(encoding="utf-8")
    benchmarks = read_benchmarks(folder)
    if benchmarks is not None:
        out["benchmarks"] = benchmarks
    return out


def write_card(
    plan: MergePlan,
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    gguf_repo: str | None = None,
    gguf_files: str | os.PathLike | Iterable[str | os.PathLike | GGUFFile] | None = None,
    routing_image: str | os.PathLike | None = None,
) -> Path:
    """Write ``folder/README.md`` for the model ``plan`` built there; returns its path.

    ``license`` None means the config's license, else apache-2.0. ``gguf_files`` is a folder of ``*.gguf`` files
    or a list of them; ``routing_image`` a file inside ``folder``.
    """
    folder = Path(folder)
    text = plan_card(plan, folder, model_name=model_name, license=license, repo_id=repo_id, gguf_repo=gguf_repo,
                     gguf_files=gguf_files, routing_image=routing_image)
    return write_card_text(folder, text)


def plan_card(plan: MergePlan, folder: str | os.PathLike, *, gguf_files=None, routing_image=None, **options: Any) -> str:
    """The card text ``write_card`` writes, without writing it (a streamed upload sends it with ``repo_id``)."""
    folder = Path(folder)
    return _card_text(ModelFacts.from_plan(plan, folder), folder, gguf_files=gguf_files, routing_image=routing_image,
                      **options)


def build_card(
    model_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    gguf_repo: str | None = None,
    gguf_files: str | os.PathLike | Iterable[str | os.PathLike | GGUFFile] | None = None,
    routing_image: str | os.PathLike | None = None,
) -> str:
    """The card text of a finished lazymoe folder, from its files alone; writes nothing (an upload can use it)."""
    folder = Path(model_dir)
    return _card_text(ModelFacts.from_folder(folder), folder, model_name=model_name, license=license,
                      repo_id=repo_id, gguf_repo=gguf_repo, gguf_files=gguf_files, routing_image=routing_image)


def _card_text(facts: "ModelFacts", folder: Path, *, gguf_files, routing_image, **options: Any) -> str:
    """The one rendering path of both entry points: facts from the plan or from the folder, same card."""
    return render_card(card_data(facts, **options, **_options(folder, gguf_files, routing_image),
                                 **_evaluation_options(folder)))


def detected_extras(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What lazymoe has written into or beside a merged folder that its card should show: the routing
    picture (``lazymoe route``) and the GGUF files in the sibling ``NAME-GGUF`` folder (``lazymoe gguf``)."""
    folder = Path(model_dir)
    extras: dict[str, Any] = {}
    if (folder / ROUTING_IMAGE).is_file():
        extras["routing_image"] = ROUTING_IMAGE
    gguf_dir = gguf_dir_of(folder)
    if gguf_dir.is_dir():  # not those its record says an earlier merge of the model made (merged again since)
        stale = set(stale_gguf_files(gguf_dir))
        files = [p for p in sorted(gguf_dir.glob("*.gguf")) if p not in stale]
        if files:
            extras["gguf_files"] = files
    return extras


def rerender_card(model_dir: str | os.PathLike, *, replace_edited: bool = False, **options: Any) -> Path | None:
    """Rewrite ``model_dir/README.md`` from the folder alone (same options as :func:`build_card`). A card
    edited by hand since lazymoe wrote it is left as it is (None, and a warning saying how to replace it)
    unless ``replace_edited``: ``route``, ``eval`` and ``publish`` update the card as a side effect, and
    must not throw away the user's words (nor a README.md that is not lazymoe's at all)."""
    folder = Path(model_dir)
    kept = None if replace_edited else card_kept_because(folder)
    if kept:
        logger.warning("%s %s, so it is left as it is (without this step's update); `lazymoe card %s "
                       "--overwrite` replaces it with lazymoe's card.", folder / CARD_FILENAME, kept, folder)
        return None
    return write_card_text(folder, build_card(folder, **options))
