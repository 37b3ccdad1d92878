"""Model cards: the README.md of a merged folder, and of its ``NAME-GGUF`` repo.

Card = data + template. ``card_data()`` turns facts about a finished model into a plain dict; the Jinja
templates in ``templates/`` only lay it out (``render.py``). The front matter is that
dict's ``front_matter`` dumped by ``yaml.safe_dump``, never YAML written by hand, and rendering uses
``StrictUndefined`` so a misspelt field fails loudly instead of leaving a hole in a published card.

The facts come from one of two places that must agree byte for byte: the merge plan (``write_card``, called
by ``merge()`` just before the output folder is renamed into place) or the finished folder alone
(``rerender_card``, behind ``lazymoe card MODEL_DIR``): config.json, ``lazymoe_config.yml`` and the
safetensors headers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..config import MoEConfig, license_id, load_config
from ..errors import CardError, ModelNotFoundError, Setting, Text
from ..gguf.files import GGUFFile, find_gguf_files
from ..gguf.quants import BY_NAME as QUANTS_BY_NAME
from ..gguf.quants import PREFERENCE as QUANT_PREFERENCE
from ..io.folder import CONFIG_FILENAME, write_text_atomic
from ..io.sources import ModelRef, describe, read_model_config
from ..moe import arch
from ..options import DEFAULT_LICENSE
from ..router.modes import BY_NAME as GATE_MODES_BY_NAME
from ..units import human_bytes, human_params
from .render import render_card, render_gguf_card

from ..io.outdir import final_name
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

if TYPE_CHECKING:  # the plan is only read here; moe/ never imports publish/
    from ..moe.plan import MergePlan

CARD_FILENAME = "README.md"
ROUTING_IMAGE = "routing.png"  # written by `lazymoe route` into the model folder
BASE_TAGS = ("moe", "frankenmoe", "merge", "lazymoe")
TAGS = (*BASE_TAGS, "mixtral")  # a Mixtral model's tags; other outputs end with their model type instead
GGUF_TAGS = ("gguf", "llama-cpp", *TAGS)
HUB_URL = "https://huggingface.co"
EXAMPLE_PROMPT = "Explain in three sentences what a mixture of experts is."
PLACEHOLDER_NAMESPACE = "your-username"

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ModelFacts:
    """Everything a card says about a finished model; equal whether read from the plan or from the folder."""

    config: MoEConfig
    config_yaml: str  # the recipe exactly as saved in lazymoe_config.yml
    total_params: int
    active_params: int
    dtype: str  # torch name: bfloat16, float16, float32
    layout: str  # classic | fused
    output: str  # output architecture key (lazymoe.arch.OUTPUTS)
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int | None
    has_chat_template: bool
    local_refs: frozenset[str]  # model references that are local folders, not Hub ids
    folder_name: str

    @classmethod
    def from_plan(cls, plan: MergePlan, folder: str | os.PathLike) -> ModelFacts:
        """Facts of a merge in progress: numbers from the plan, tokenizer and recipe from ``folder``."""
        folder = Path(folder)
        saved = folder / CONFIG_FILENAME
        out = plan.out_config
        return cls(
            config=plan.config,
            config_yaml=saved.read_text(encoding="utf-8") if saved.is_file() else plan.config.to_yaml(),
            total_params=plan.total_params,
            active_params=plan.active_params,
            dtype=plan.dtype,
            layout=plan.layout,
            output=plan.output.key,
            num_layers=int(out["num_hidden_layers"]),
            hidden_size=int(out["hidden_size"]),
            vocab_size=int(out["vocab_size"]),
            context_length=out.get("max_position_embeddings"),
            has_chat_template=has_chat_template(folder),
            local_refs=frozenset(ref for ref, info in plan.models.items() if info.ref.local_path is not None),
            folder_name=model_name_of(folder),
        )

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike) -> ModelFacts:
        """Facts of a finished lazymoe folder, from config.json, lazymoe_config.yml and safetensors headers."""
        folder = Path(model_dir)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder} is not a folder; give the folder lazymoe merge wrote.")
        for name in ("config.json", CONFIG_FILENAME):
            if not (folder / name).is_file():
                raise ModelNotFoundError(
                    f"{folder} has no {name}, so it was not built by lazymoe merge (or is unfinished): a card "
                    "describes the recipe saved with the model. Run lazymoe merge to build the folder."
                )
        out = read_model_config(folder / "config.json", folder)
        moe = load_config(folder / CONFIG_FILENAME)
        try:
            output = arch.output_of(out)
        except StopIteration:
            raise CardError(f"{folder}/config.json describes a '{out.get('model_type')}' model, not one lazymoe "
                            f"writes ({', '.join(o.name for o in arch.OUTPUTS.values())}).") from None
        for key in (output.experts_key, "num_experts_per_tok", "num_hidden_layers", "hidden_size",
                    "intermediate_size", "vocab_size"):
            if type(out.get(key)) is not int or out[key] <= 0:
                raise CardError(f"{folder}/config.json has {key}={out.get(key)!r}, not a positive whole number; "
                                "restore the config.json the merge wrote (or merge again).")
        experts, per_token = int(out[output.experts_key]), int(out["num_experts_per_tok"])
        if (experts, per_token) != (moe.num_experts, moe.experts_per_token):
            raise CardError(
                f"{folder}: config.json has {experts} experts, {per_token} per token, but {CONFIG_FILENAME} has "
                f"{moe.num_experts} and {moe.experts_per_token}. One of them was edited after the merge; "
                "restore it (or merge again) so the card describes the real model."
            )
        tensors = describe(ModelRef.parse(str(folder))).tensors
        layout = arch.layout_of(tensors)
        if layout is None:
            raise CardError(f"{folder} has no expert tensors (block_sparse_moe or mlp.experts); is it a MoE?")
        total = sum(t.numel for t in tensors.values())
        layers, hidden = int(out["num_hidden_layers"]), int(out["hidden_size"])
        expert_params = arch.expert_params(hidden, int(out["intermediate_size"]), layers)
        return cls(
            config=moe,
            config_yaml=(folder / CONFIG_FILENAME).read_text(encoding="utf-8"),
            total_params=total,
            active_params=total - (experts - per_token) * expert_params,
            dtype=arch.config_dtype(out) or "float32",
            layout=layout,
            output=output.key,
            num_layers=layers,
            hidden_size=hidden,
            vocab_size=int(out["vocab_size"]),
            context_length=out.get("max_position_embeddings"),
            has_chat_template=has_chat_template(folder),
            local_refs=frozenset(ref for ref in moe.model_refs() if _is_local_ref(ref)),
            folder_name=model_name_of(folder),
        )


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in ``folder`` carries a chat template (in any of its three homes)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (json.JSONDecodeError, AttributeError):
        return False


def model_name_of(folder: Path) -> str:
    """The model's default name: its folder's name (also while merge() still writes it under a temporary one)."""
    return final_name(Path(folder).resolve().name)


def _hub_ref(ref: str) -> ModelRef | None:
    """``ref`` parsed as a Hub id with a valid revision, else None (it is then shown as code, never linked)."""
    try:
        parsed = ModelRef.parse(ref)
    except ModelNotFoundError:
        return None
    return parsed if parsed.repo_id else None


def _is_local_ref(ref: str) -> bool:
    try:
        return ModelRef.parse(ref).local_path is not None
    except ModelNotFoundError:  # neither an existing folder nor Hub-shaped: a local path that has since moved
        return True


# ---------------------------------------------------------------------------------------- data


def resolve_license(license: str | None, config: MoEConfig | None = None) -> str:
    """The license id: the argument, else the config's ``license`` (once the config has one), else apache-2.0."""
    value = license or getattr(config, "license", None) or DEFAULT_LICENSE
    try:
        return license_id(value)
    except ValueError as err:
        raise CardError(f"license {str(value).strip().lower()!r} {err}.") from None


def _source(ref: str, local_refs: frozenset[str]) -> dict[str, Any]:
    parsed = None if ref in local_refs else _hub_ref(ref)
    if parsed is None:
        return {"ref": ref, "repo_id": None, "url": None}
    repo_id, revision = parsed.repo_id, parsed.revision
    url = f"{HUB_URL}/{quote(repo_id)}" + (f"/tree/{quote(revision, safe='')}" if revision else "")
    return {"ref": ref, "repo_id": repo_id, "url": url}


def _check_repo_id(value: str | None, what: str) -> None:
    if value is not None and not _REPO_ID.match(value):
        raise CardError(f"{what} {value!r} must be a full Hub repo id, namespace/name (like me/MyMoE-4x7B).")


def _expert_notes(expert) -> str:
    notes = []
    if expert.noise_scale is not None:
        notes.append(f"noise_scale {expert.noise_scale:g}")
    if expert.residual_scale is not None:
        notes.append(f"residual_scale {expert.residual_scale:g}")
    return ", ".join(notes)


def _gguf_rows(files: list[GGUFFile]) -> list[dict[str, Any]]:
    return [
        {"name": f.name, "quant": f.quant, "size_bytes": f.size_bytes, "size": human_bytes(f.size_bytes),
         "note": QUANTS_BY_NAME[f.quant].note if f.quant in QUANTS_BY_NAME else ""}
        for f in sorted(files, key=lambda f: (f.size_bytes, f.name))  # smallest first, as GGUF repos list them
    ]


def _default_quant(files: list[GGUFFile]) -> str | None:
    quants = [f.quant for f in files if f.quant]
    for quant in QUANT_PREFERENCE:  # ordered by what a reader should pick first
        if quant in quants:
            return quant
    return quants[0] if quants else None


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
    _check_repo_id(repo_id, "repo_id")
    _check_repo_id(gguf_repo, "gguf_repo")
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
            "files": _gguf_rows(files),
            "quant": _default_quant(files),
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
    _check_repo_id(base_repo_id, "base_repo_id (the merged model's Hub id)")
    _check_repo_id(repo_id, "repo_id")
    repo_id = repo_id or f"{base_repo_id}-GGUF"
    quant = _default_quant(files)
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
        "files": _gguf_rows(files),
        "quant": quant,
        "default_file": default_file,
        "prompt": EXAMPLE_PROMPT,
    }


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
    text = _card_text(ModelFacts.from_plan(plan, folder), folder, model_name=model_name, license=license,
                      repo_id=repo_id, gguf_repo=gguf_repo, gguf_files=gguf_files, routing_image=routing_image)
    return write_text_atomic(folder / CARD_FILENAME, text)


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
    gguf_dir = folder.parent / f"{folder.name}-GGUF"
    if gguf_dir.is_dir() and any(gguf_dir.glob("*.gguf")):
        extras["gguf_files"] = gguf_dir
    return extras


def rerender_card(model_dir: str | os.PathLike, **options: Any) -> Path:
    """Rewrite ``model_dir/README.md`` from the folder alone (same options as :func:`build_card`)."""
    return write_text_atomic(Path(model_dir) / CARD_FILENAME, build_card(model_dir, **options))


def write_gguf_card(
    gguf_dir: str | os.PathLike,
    *,
    base_repo_id: str,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
) -> Path:
    """Write ``gguf_dir/README.md`` listing its ``*.gguf`` files as quantisations of ``base_repo_id``."""
    data = gguf_card_data(find_gguf_files(gguf_dir), base_repo_id=base_repo_id, repo_id=repo_id,
                          model_name=model_name, license=license)
    return write_text_atomic(Path(gguf_dir) / CARD_FILENAME, render_gguf_card(data))
