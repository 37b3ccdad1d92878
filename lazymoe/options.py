"""What a front end passes beside the MoE config, as typed models: the merge options (``lazymoe merge`` flags,
the notebook's Advanced box) and the notebook settings (a preset's ``notebook:`` block, the form). Each field
is declared once, with its default, its validation and the help text the CLI and the form show.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError, Setting, Text
from .gguf.quants import DEFAULT_QUANTS, QUANT_TYPES
from .io.hub_ids import MAX_HUB_NAME_CHARS
from .moe.arch import Layout
from .units import parse_bytes

#: 2 GB: a free Colab (12.7 GB RAM) never holds more than one tensor anyway
DEFAULT_MAX_SHARD = "2GB"
DEFAULT_MAX_SHARD_BYTES = parse_bytes(DEFAULT_MAX_SHARD)
#: lazymoe eval: texts per expert, tokens per text, tokens an expert writes per positive prompt when it has no texts
DEFAULT_EVAL_MAX_TEXTS = 16
DEFAULT_EVAL_MAX_TOKENS = 256  # BOS included
DEFAULT_EVAL_GENERATE_TOKENS = 64
#: longest answer to a question asked side by side (lazymoe eval --questions, the notebook's Ask step)
DEFAULT_ANSWER_TOKENS = 96
#: lazymoe eval --tasks default: lm-evaluation-harness tasks, and documents per task
DEFAULT_BENCHMARK_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "winogrande")
DEFAULT_BENCHMARK_LIMIT = 100
#: the most threads llama.cpp runs: its thread pool and CPU masks are sized by GGML_MAX_N_THREADS (512 in the
#: ggml.h of the pinned llama-cpp-python); more crashes it (a segfault, or bad_alloc in the quantiser). A fixed
#: cap, not a multiple of this machine's cores: a notebook may plan on one machine and run on another.
LLAMA_MAX_THREADS = 512
#: counts each front end passes on as they are (``lazymoe eval --generate-tokens``, ``lazymoe gguf --threads``,
#: ``lazymoe chat --threads``, the same keywords in Python; the notebook keeps their defaults): the setting as a
#: message names it, the least value allowed and what it does, the most (None: no most) and why
_LLAMA_CAP = (LLAMA_MAX_THREADS, f"llama.cpp runs at most {LLAMA_MAX_THREADS} threads")
COUNT_RANGES = {setting.name: (setting, least, effect, *most) for setting, least, effect, most in (
    (Setting("generate_tokens", ..., noun=True), 0, "writes no texts", (None, "")),
    (Setting("threads", ..., noun=True), 0, "uses every core, the default", _LLAMA_CAP),
    (Setting("n_threads", ..., noun=True), 0, "uses half the cores, the default", _LLAMA_CAP),
)}
#: the merged model's licence on its card and the Hub when neither the recipe nor the caller names one
DEFAULT_LICENSE = "apache-2.0"

#: a Hub repo id: ``name`` or ``namespace/name``, each part a letter or digit then letters, digits, ``-_.``, not
#: ending in ``-`` or ``.`` (the Hub's rule: huggingface_hub.utils.validate_repo_id)
_PART = rf"[A-Za-z0-9](?:[\w.-]{{0,{MAX_HUB_NAME_CHARS - 2}}}\w)?"
_REPO_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def repo_name_problem(name: str) -> str | None:
    """Why ``name`` (``name`` or ``namespace/name``) cannot be a Hub repo id, or None when it can."""
    name = name.strip()
    if not name:
        return "the name is empty"
    if name.count("/") > 1 or not _REPO_ID.match(name) or "--" in name or ".." in name or name.endswith(".git"):
        return (f"{name!r} is not a valid repo name: use letters, digits, '-', '_' and '.' (no spaces, no '--' or "
                f"'..', not ending in '-', '.' or .git), at most {MAX_HUB_NAME_CHARS} characters a part, optionally as "
                "namespace/name")
    return None


def check_count(name: str, value: Any) -> None:
    """Refuse a count option ``name`` (a key of :data:`COUNT_RANGES`) that is not None (its default) nor a whole
    number in its range, naming the option as each front end spells it (``--threads``, ``threads=``)."""
    given, least, effect, most, why = COUNT_RANGES[name]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if value is None or (whole and least <= value and (most is None or value <= most)):
        return
    if most is None:
        allowed = f"{least} or more ({least} {effect})"
    else:
        allowed = f"from {least} to {most} ({least} {effect}; {why})"
    raise ConfigError(Text(f"{given.placeholder} is {value!r}; it must be a whole number, {allowed}.", (given,)))


def _cli(flag: str, **extra: Any) -> dict[str, Any]:
    """How a field appears on the command line (``flag``, and argparse extras such as ``metavar``)."""
    return {"cli": {"flag": flag, **extra}}


class MergeOptions(BaseModel):
    """How ``merge()`` writes the folder: the same for ``lazymoe merge``, the notebook and Python."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_shard_bytes: int = Field(
        DEFAULT_MAX_SHARD_BYTES, gt=0,
        description=f"largest shard, in bytes with a unit: {DEFAULT_MAX_SHARD} (default), 500MB, 1.5GiB",
        json_schema_extra=_cli("--max-shard-size", metavar="BYTES"))
    layout: Layout = Field(
        "classic",
        description="classic: block_sparse_moe.experts.E.w1/w2/w3, read by every consumer (default); "
                    "fused: transformers-5 native mlp.experts.gate_up_proj, not read by llama.cpp",
        json_schema_extra=_cli("--layout"))
    low_disk: bool = Field(
        False,
        description="write the base's tensors first, then one source model at a time, deleting each fetched "
                    "tensor once written (disk: output + the base + one shard instead of output + all fetched)",
        json_schema_extra=_cli("--low-disk"))
    overwrite: bool = Field(
        False, description="replace an earlier lazymoe output in the output folder",
        json_schema_extra=_cli("--overwrite"))
    device: str = Field(
        "auto", description="device for the router pass: auto, cpu, cuda",
        json_schema_extra=_cli("--device"))

    @field_validator("max_shard_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``merge()`` / ``make_plan()``."""
        return self.model_dump()


class NotebookSettings(MergeOptions):
    """What the notebook does with the config besides merging it. The token is never part of it."""

    model_name: str = Field("my-frankenmoe", description="Name of the merged model: the output folder and the Hub "
                            "repo (in your namespace unless you write namespace/name)")
    overwrite: bool = Field(True, description="Replace an earlier lazymoe build with the same name")
    upload: bool = Field(False, description="Upload to the Hugging Face Hub")
    private: bool = Field(False, description="Private repo")
    hf_secret: str = Field("HF_TOKEN", description="Name of the Colab secret (key icon, left bar) holding a write "
                           "token")
    gguf: bool = Field(False, description="Also make GGUF files (llama.cpp)")
    quants: tuple[str, ...] = Field(DEFAULT_QUANTS, description="The GGUF quantisation types to make; Ctrl/Cmd-click "
                                    "to pick several")

    @property
    def folder_name(self) -> str:
        return self.model_name.rsplit("/", 1)[-1]

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, name: str) -> str:
        problem = repo_name_problem(name)  # it names the Hub repo too: the Hub's rule, checked in one place
        if problem:
            raise ValueError(problem)
        return name.strip()

    @field_validator("hf_secret")
    @classmethod
    def _secret(cls, secret: str, info: ValidationInfo) -> str:
        secret = secret.strip()
        if info.data.get("upload") and secret and not _SECRET_NAME.match(secret):
            raise ValueError(f"Colab secret {secret!r} is not a secret name (letters, digits and _), e.g. HF_TOKEN")
        return secret

    @field_validator("quants", mode="before")
    @classmethod
    def _quants(cls, value: Any, info: ValidationInfo) -> Any:
        for quant in value or ():
            if quant not in QUANT_TYPES:
                raise ValueError(f"Unknown quantisation type {quant!r}; choose from {', '.join(QUANT_TYPES)}")
        if info.data.get("gguf") and not value:
            raise ValueError("GGUF is ticked but no quantisation is selected: pick at least one (e.g. Q4_K_M)")
        return tuple(value or ())


def validation_problems(model: type[BaseModel], values: dict[str, Any],
                        labels: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Every problem with ``values`` as (field, message), the message starting with the field's label; [] if none."""
    try:
        model.model_validate(values)
    except ValidationError as err:
        return [_problem(e, labels) for e in err.errors()]
    return []


def _problem(error: Any, labels: dict[str, str] | None) -> tuple[str, str]:
    field = str(error["loc"][0]) if error["loc"] else ""
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    label = (labels or {}).get(field, f"{field}:") if field else ""
    return field, f"{label} {message}.".strip()


def validated(model: type[BaseModel], values: dict[str, Any], labels: dict[str, str] | None = None) -> Any:
    """``model`` built from ``values``, or one :class:`ConfigError` that starts with the field's ``labels`` entry
    (default ``name:``) and says what to change."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_problem(err.errors()[0], labels)[1]) from None


def cli_fields(model: type[BaseModel], names: tuple[str, ...]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(field name, field info, its ``cli`` extras) for each of ``names``: what the CLI turns into flags."""
    out = []
    for name in names:
        info = model.model_fields[name]
        out.append((name, info, dict((info.json_schema_extra or {}).get("cli", {}))))
    return out
