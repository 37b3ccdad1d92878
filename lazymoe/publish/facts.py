"""What a model card states, and the rules its fields follow: the facts of a finished model (``ModelFacts``, read
from the merge plan or from the folder alone, equal either way), the card's fixed words and tags, the licence and
repo-id checks. ``card`` (the model's card) and ``gguf_card`` (its ``NAME-GGUF`` repo's) build on this.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import MoEConfig, license_id, load_config
from ..errors import CardError, ModelNotFoundError, Setting, Text
from ..io.folder import CARD_FILENAME, CONFIG_FILENAME, ROUTING_IMAGE
from ..io.outdir import final_name
from ..io.sources import ModelRef, describe, read_model_config
from ..moe import arch
from ..options import DEFAULT_LICENSE

if TYPE_CHECKING:  # the plan is only read here; moe/ never imports publish/
    from ..moe.plan import MergePlan

BASE_TAGS = ("moe", "frankenmoe", "merge", "lazymoe")
TAGS = (*BASE_TAGS, "mixtral")  # a Mixtral model's tags; other outputs end with their model type instead
GGUF_TAGS = ("gguf", "llama-cpp", *TAGS)
HUB_URL = "https://huggingface.co"
EXAMPLE_PROMPT = "Explain in three sentences what a mixture of experts is."
PLACEHOLDER_NAMESPACE = "your-username"

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")



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
            local_refs=frozenset(ref for ref in moe.model_refs() if is_local_ref(ref)),
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


def hub_ref(ref: str) -> ModelRef | None:
    """``ref`` parsed as a Hub id with a valid revision, else None (it is then shown as code, never linked)."""
    try:
        parsed = ModelRef.parse(ref)
    except ModelNotFoundError:
        return None
    return parsed if parsed.repo_id else None


def is_local_ref(ref: str) -> bool:
    try:
        return ModelRef.parse(ref).local_path is not None
    except ModelNotFoundError:  # neither an existing folder nor Hub-shaped: a local path that has since moved
        return True


def resolve_license(license: str | None, config: MoEConfig | None = None) -> str:
    """The license id: the argument, else the config's ``license`` (once the config has one), else apache-2.0."""
    value = license or getattr(config, "license", None) or DEFAULT_LICENSE
    try:
        return license_id(value)
    except ValueError as err:
        raise CardError(f"license {str(value).strip().lower()!r} {err}.") from None


#: the arguments that name a Hub repo on a card, as a message names them (``repo_id=``, ``--repo-id``)
_REPO_ARGUMENTS = {s.name: s for s in (Setting("repo_id", ..., noun=True), Setting("gguf_repo", ..., noun=True),
                                       Setting("base_repo_id", ..., noun=True))}


def check_repo_id(value: str | None, name: str) -> None:
    """Refuse a ``value`` of the argument ``name`` (a key of :data:`_REPO_ARGUMENTS`) that is not a full Hub repo
    id, naming the argument as the user's front end spells it."""
    if value is not None and not _REPO_ID.match(value):
        given = _REPO_ARGUMENTS[name]
        raise CardError(Text(f"{given.placeholder} {value!r} must be a full Hub repo id, namespace/name (like "
                             "me/MyMoE-4x7B).", (given,)))
