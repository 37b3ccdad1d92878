"""Model cards: the README.md of a merged folder, and of its ``NAME-GGUF`` repo.

Card = data + template. ``card_data()`` turns facts about a finished model into a plain dict; the Jinja
templates in ``templates/`` (shipped as ``lazymoe.templates``) only lay it out. The front matter is that
dict's ``front_matter`` dumped by ``yaml.safe_dump``, never YAML written by hand, and rendering uses
``StrictUndefined`` so a misspelt field fails loudly instead of leaving a hole in a published card.

The facts come from one of two places that must agree byte for byte: the merge plan (``write_card``, called
by ``merge()`` just before the output folder is renamed into place) or the finished folder alone
(``rerender_card``, behind ``lazymoe card MODEL_DIR``): config.json, ``lazymoe_config.yml`` and the
safetensors headers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import yaml

from . import arch
from .config import CONFIG_FILENAME, MoEConfig, load_config
from .errors import LazyMoEError, ModelNotFoundError
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
from .outdir import final_name
from .report import human_bytes, human_params
from .sources import ModelRef, describe, read_model_config

if TYPE_CHECKING:
    from .plan import MergePlan

CARD_FILENAME = "README.md"
ROUTING_IMAGE = "routing.png"  # written by `lazymoe route` into the model folder
MODEL_TEMPLATE = "model_card.md.j2"
GGUF_TEMPLATE = "gguf_card.md.j2"
DEFAULT_LICENSE = "apache-2.0"
BASE_TAGS = ("moe", "frankenmoe", "merge", "lazymoe")
TAGS = (*BASE_TAGS, "mixtral")  # a Mixtral model's tags; other outputs end with their model type instead
GGUF_TAGS = ("gguf", "llama-cpp", *TAGS)
HUB_URL = "https://huggingface.co"
EXAMPLE_PROMPT = "Explain in three sentences what a mixture of experts is."
PLACEHOLDER_NAMESPACE = "your-username"

#: how each gate mode initialised the routers, in a user's words
GATE_MODE_NOTES = {
    "hidden": "base model's hidden states at the last token of each expert's prompts",
    "hidden_last": "base model's hidden states at the last token of each expert's prompts",
    "hidden_avg": "base model's hidden states averaged over each expert's prompts",
    "cheap_embed": "mean token embeddings of each expert's prompts",
    "random": "random (normal), prompts not used",
    "uniform_random": "random (uniform), prompts not used",
    "centroid": "each expert's mean MLP input on its prompts, per layer, with a calibrated logit scale",
    "classifier": "a calibrated classifier fitted per layer on the MLP inputs of the experts' prompts",
    "expert_classifier": "a calibrated classifier fitted per layer on text each expert wrote from its own prompts",
    "trained": "routers trained on the MoE's own language-model loss over text each expert wrote, from a "
               "classifier fitted on it",
}

#: llama.cpp quantisation types, in the order a reader would pick them, with a one-line guide
QUANT_NOTES = {
    "Q4_K_M": "balanced size and quality (recommended)",
    "Q5_K_M": "higher quality, a little larger",
    "Q4_K_S": "slightly smaller than Q4_K_M, a little lower quality",
    "Q6_K": "near-lossless",
    "Q8_0": "near-lossless, large",
    "Q5_K_S": "between Q4_K_M and Q5_K_M",
    "Q3_K_L": "small, noticeable quality loss",
    "Q3_K_M": "small, noticeable quality loss",
    "Q3_K_S": "very small, large quality loss",
    "Q2_K": "smallest, large quality loss",
    "Q4_0": "legacy 4-bit; prefer Q4_K_M",
    "Q4_1": "legacy 4-bit; prefer Q4_K_M",
    "Q5_0": "legacy 5-bit; prefer Q5_K_M",
    "Q5_1": "legacy 5-bit; prefer Q5_K_M",
    "BF16": "unquantised (bfloat16)",
    "F16": "unquantised (float16)",
    "F32": "unquantised (float32)",
}

_QUANT_TAG = re.compile(r"^(I?Q\d\w*|TQ\d\w*|F16|F32|BF16)$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


class CardError(LazyMoEError, ValueError):
    """A model card cannot be rendered from what was given (the message names the fix)."""


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
        if any(".block_sparse_moe." in name or ".mlp.experts.0." in name for name in tensors):
            layout = "classic"
        elif any(".mlp.experts.gate_up_proj" in name for name in tensors):
            layout = "fused"
        else:
            raise CardError(f"{folder} has no expert tensors (block_sparse_moe or mlp.experts); is it a MoE?")
        total = sum(t.numel for t in tensors.values())
        layers, hidden = int(out["num_hidden_layers"]), int(out["hidden_size"])
        expert_params = 3 * hidden * int(out["intermediate_size"]) * layers  # one expert's MLPs, all layers
        return cls(
            config=moe,
            config_yaml=(folder / CONFIG_FILENAME).read_text(encoding="utf-8"),
            total_params=total,
            active_params=total - (experts - per_token) * expert_params,
            dtype=str(out.get("torch_dtype") or out.get("dtype") or "float32"),
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


@dataclass(frozen=True)
class GGUFFile:
    name: str
    size_bytes: int

    @property
    def quant(self) -> str | None:
        """``NAME.Q4_K_M.gguf`` -> ``Q4_K_M`` (the naming the gguf command uses)."""
        stem = self.name.removesuffix(".gguf")
        tag = stem.rsplit(".", 1)[1].upper() if "." in stem else ""
        return tag if _QUANT_TAG.match(tag) else None  # "Moe-v3.1.gguf" has no quant "1"


def find_gguf_files(source: str | os.PathLike | Iterable[str | os.PathLike | GGUFFile]) -> list[GGUFFile]:
    """GGUF files from a folder (every ``*.gguf`` in it) or a list of paths, smallest first."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise CardError(f"{folder} is not a folder of GGUF files.")
        source = sorted(folder.glob("*.gguf"))
        if not source:
            raise CardError(f"{folder} has no *.gguf files; make them with lazymoe gguf first.")
    files = []
    for item in source:
        if not isinstance(item, GGUFFile):
            path = Path(item)
            if not path.is_file():
                raise CardError(f"GGUF file {path} does not exist.")
            item = GGUFFile(path.name, path.stat().st_size)
        files.append(item)
    return sorted(files, key=lambda f: (f.size_bytes, f.name))


# ---------------------------------------------------------------------------------------- data


def resolve_license(license: str | None, config: MoEConfig | None = None) -> str:
    """The license id: the argument, else the config's ``license`` (once the config has one), else apache-2.0."""
    value = license or getattr(config, "license", None) or DEFAULT_LICENSE
    value = str(value).strip().lower()
    if not _LICENSE_ID.match(value):
        raise CardError(
            f"license {value!r} is not a Hub license id; use one like apache-2.0, mit, llama3 or cc-by-nc-4.0 "
            "(one that the licenses of your source models allow)."
        )
    return value


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
         "note": QUANT_NOTES.get(f.quant or "", "")}
        for f in sorted(files, key=lambda f: (f.size_bytes, f.name))  # smallest first, as GGUF repos list them
    ]


def _default_quant(files: list[GGUFFile]) -> str | None:
    quants = [f.quant for f in files if f.quant]
    for quant in QUANT_NOTES:  # ordered by what a reader should pick first
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
        raise CardError("The model name is empty; pass model_name (CLI: --name).")
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
        "gate_mode_note": GATE_MODE_NOTES.get(config.gate_mode, "see the configuration below"),
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


# ---------------------------------------------------------------------------------------- rendering


def _template_source(name: str) -> str:
    """Template text from the checkout's templates/ folder next to this package when there is one (so a
    checkout never renders another installation's templates), else the installed ``lazymoe.templates``."""
    path = Path(__file__).resolve().parent.parent / "templates" / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        from importlib.resources import files

        resource = files("lazymoe.templates").joinpath(name)
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    raise CardError(f"Card template {name} is missing from this lazymoe installation; reinstall lazymoe.")


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
def _environment():
    import jinja2

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


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a card
    return path


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
    return _write_text(folder / CARD_FILENAME, text)


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
    return _write_text(Path(model_dir) / CARD_FILENAME, build_card(model_dir, **options))


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
    return _write_text(Path(gguf_dir) / CARD_FILENAME, render_gguf_card(data))


# ---------------------------------------------------------------------------------------- CLI


def add_card_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lazymoe card MODEL_DIR``."""
    p = subparsers.add_parser(
        "card", help="(re)write README.md of a merged model folder from its files",
        description="Render the model card (README.md) of a folder built by lazymoe merge from config.json, "
                    f"{CONFIG_FILENAME} and the safetensors headers. With --gguf-of, DIR is a folder of GGUF "
                    "files and the card is the one of its NAME-GGUF repo.",
    )
    p.add_argument("model_dir", metavar="DIR", help="the merged model folder (or, with --gguf-of, the GGUF folder)")
    p.add_argument("--name", dest="model_name", help="title of the card (default: the repo or folder name)")
    p.add_argument("--license", help=f"license id for the metadata (default: {DEFAULT_LICENSE})")
    p.add_argument("--repo-id", help="Hub repo the model is pushed to, e.g. me/MyMoE-4x7B (used in the usage code)")
    p.add_argument("--gguf-dir", help="folder of NAME.QUANT.gguf files to list in a GGUF section")
    p.add_argument("--gguf-repo", help="Hub repo holding those GGUF files (default: REPO_ID-GGUF)")
    p.add_argument("--routing-image", help="image inside the model folder showing the routing, e.g. routing.png")
    p.add_argument("--gguf-of", metavar="MERGED_REPO",
                   help="write the card of the GGUF repo in DIR, quantised from MERGED_REPO")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    p.set_defaults(func=run_card)
    return p


def run_card(args: argparse.Namespace) -> int:
    folder = Path(args.model_dir)
    if args.gguf_of:
        data = gguf_card_data(find_gguf_files(folder), base_repo_id=args.gguf_of, repo_id=args.repo_id,
                              model_name=args.model_name, license=args.license)
        text = render_gguf_card(data)
    else:
        text = build_card(folder, model_name=args.model_name, license=args.license, repo_id=args.repo_id,
                          gguf_repo=args.gguf_repo, gguf_files=args.gguf_dir, routing_image=args.routing_image)
    if args.stdout:
        print(text, end="")
    else:
        print(f"Wrote {_write_text(folder / CARD_FILENAME, text)}")
    return 0
