"""The MoE config: one validated object that YAML, the CLI, the notebook form and Python all fill in.

The schema is mergekit-moe's, accepted unchanged (BRIEF §2), plus a few lazymoe extensions that are
optional and documented in the README (``seed``, ``allow_all_same_experts``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random as _random
import re
import reprlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .moe import arch as _arch
from .errors import ConfigError, Setting, Text
from .io.safetensors import NAME_TO_ST
from .io.texts import expand_text_files
from .router.modes import GATE_MODES, RANDOM_MODES

# the names come from the gate-mode table (router/modes.py), the dtypes from the safetensors table
GateMode = Literal[GATE_MODES]  # type: ignore[valid-type]
DTYPES: tuple[str, ...] = tuple(NAME_TO_ST)
DType = Literal[DTYPES]  # type: ignore[valid-type]
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]{1,63}$")
LICENSE_HELP = (
    "is not a Hub license id; use one like apache-2.0, mit, llama3 or cc-by-nc-4.0 "
    "(one that the licenses of your source models allow)"
)


def license_id(value: Any) -> str:
    """``value`` as a Hub licence id (stripped, lower case), or ValueError saying what one looks like."""
    text = str(value).strip().lower()
    if not _LICENSE_ID.match(text):
        raise ValueError(LICENSE_HELP)
    return text

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}



#: noise and generator seeds are 64-bit; torch refuses anything from 2**63 on
MAX_SEED = 2**63 - 1
#: bounds past which an expert's weights are destroyed rather than varied (see validate_config)
MAX_NOISE_SCALE = 1.0
MAX_RESIDUAL_SCALE = 100.0
#: router_continuation_tokens above this would generate for hours on a free Colab GPU for no routing gain
MAX_CONTINUATION_TOKENS = 4096


def _no_bool(value: Any) -> Any:
    # YAML and Python both make true an int; a count or scale given as true/false is a mistake
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    if not TYPE_CHECKING:  # type checkers keep pydantic's signature, with every field as a keyword
        # Built from Python (``MoEConfig(base_model=..., experts=[...])``, ``model_validate``, an assignment):
        # the one-line ConfigError that load_config gives for the same data, in the same words.
        def __init__(self, /, **data: Any) -> None:
            _check_shape(type(self), data)
            with _one_line_errors():
                super().__init__(**data)

        # pydantic calls a model's own __init__ to build it inside another (an expert inside a config), where a
        # ConfigError would be wrapped and lose the expert's place; this marker (pydantic's, as on BaseModel and
        # RootModel) says ours only validates, so pydantic builds the parts itself and places their errors
        __init__.__pydantic_base_init__ = True

        def __setattr__(self, name: str, value: Any) -> None:
            with _one_line_errors():
                super().__setattr__(name, value)

        # pydantic's three ways in from data, each with the same words: a dict's shape first, then one line
        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            return _validated(cls, obj, lambda: super(_Strict, cls).model_validate(obj, *args, **kwargs))

        @classmethod
        def model_validate_json(cls, json_data: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                data = json.loads(json_data)
            except (ValueError, TypeError):
                data = None  # pydantic words what is wrong with the JSON itself, made one line
            return _validated(cls, data, lambda: super(_Strict, cls).model_validate_json(json_data, *args, **kwargs))

        @classmethod
        def model_validate_strings(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            return _validated(cls, obj, lambda: super(_Strict, cls).model_validate_strings(obj, *args, **kwargs))


class HubTexts(_Strict):
    """Evaluation texts from a Hub dataset (read with the ``datasets`` package, where it is installed)."""

    dataset: str
    split: str = "test"
    column: str = "text"
    name: str | None = None  # the dataset's configuration, if it has several
    limit: int = 32

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 (how many texts to read)")
        return value


class ExpertConfig(_Strict):
    """One expert: whose MLPs to take, and the prompts that describe what it is for."""

    source_model: str
    positive_prompts: list[str] = []
    negative_prompts: list[str] = []
    noise_scale: float | None = None
    residual_scale: float | None = None
    #: expert_classifier / trained: a few paragraphs of text of this expert's kind, to route on as well as
    #: the text the expert writes from its prompts (lazymoe extension); an item that is one line ending in
    #: .txt, .jsonl or .json is a file of such texts (``io.texts``)
    calibration_text: list[str] = []
    # lazymoe extensions read by `lazymoe eval` (evaluation.py), never by the merge
    #: texts of this expert's kind: a list, a text file (.txt: blank-line separated; .jsonl: "text"), or a Hub dataset
    eval_texts: list[str] | str | HubTexts | None = None
    #: questions of this expert's kind, answered side by side by the MoE (and optionally the base and experts)
    eval_questions: list[str] | None = None

    @field_validator("eval_texts", "eval_questions", mode="before")
    @classmethod
    def _no_blank_texts(cls, value: Any) -> Any:
        if isinstance(value, os.PathLike):  # eval_texts=Path("code.txt") from Python
            value = os.fspath(value)
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a list of texts, a text file or a Hub dataset")
        if isinstance(value, list):
            if not value:
                raise ValueError("is an empty list; remove it or add texts")
            if any(not isinstance(v, str) or not v.strip() for v in value):
                raise ValueError("holds an empty or non-text item; every item must be a non-empty text")
        return value

    _numbers = field_validator("noise_scale", "residual_scale", mode="before")(lambda cls, v: _no_bool(v))

    def calibration_texts(self, where: str = "calibration_text") -> list[str]:
        """``calibration_text`` with each item that names a text file replaced by the texts in it (read now:
        ``ConfigError`` when a file is missing or holds no text)."""
        return expand_text_files(self.calibration_text, where)

    @field_validator("positive_prompts", "negative_prompts", "calibration_text", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):  # a single prompt written without a list
            return [value]
        return value

    @field_validator("source_model", mode="before")
    @classmethod
    def _model_ref(cls, value: Any) -> Any:
        if isinstance(value, dict) and "model" in value:  # mergekit's long form {model: {path: ...}}
            model = value["model"]
            value = model.get("path") if isinstance(model, dict) else model
        if isinstance(value, os.PathLike):  # Python callers pass Path objects for local folders
            value = os.fspath(value)
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError("is empty: give a Hub id (org/name), org/name@revision or a local folder")
        return value


class MoEConfig(_Strict):
    """A whole frankenMoE recipe."""

    base_model: str
    experts: list[ExpertConfig]
    gate_mode: GateMode = "hidden"
    dtype: DType | None = None
    experts_per_token: int = 2
    shared_experts: list[ExpertConfig] | None = None
    architecture: str | None = None
    # lazymoe extensions
    seed: int | None = None
    allow_all_same_experts: bool = False
    #: the merged model's license on its card and the Hub (a Hub license id; default apache-2.0)
    license: str | None = None
    #: fitted gate modes: wrap each prompt as a user turn of the base's chat template (None = false)
    router_chat_template: bool | None = None
    #: fitted gate modes: tokens the base generates after each positive prompt (None = 48; 0 = prompts only)
    router_continuation_tokens: int | None = None
    #: `lazymoe eval`: questions not tied to one expert, answered side by side
    eval_questions: list[str] | None = None

    _eval_questions = field_validator("eval_questions", mode="before")(ExpertConfig._no_blank_texts.__func__)

    _expert_model_ref = field_validator("base_model", mode="before")(ExpertConfig._model_ref.__func__)
    _numbers = field_validator("experts_per_token", "seed", "router_continuation_tokens", mode="before")(
        lambda cls, v: _no_bool(v))

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"must be a whole number from 0 to 2**63-1 ({MAX_SEED})")
        return value

    @field_validator("router_continuation_tokens")
    @classmethod
    def _continuation(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_CONTINUATION_TOKENS:
            raise ValueError(f"must be from 0 (prompts only) to {MAX_CONTINUATION_TOKENS}; leave it out for 48")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower().removeprefix("torch.")
            return _DTYPE_ALIASES.get(value, value)
        return value

    @field_validator("license", mode="before")
    @classmethod
    def _license(cls, value: Any) -> Any:
        return None if value is None else license_id(value)

    @field_validator("gate_mode", mode="before")
    @classmethod
    def _gate_mode(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    # ----------------------------------------------------------------- helpers
    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def uses_prompts(self) -> bool:
        return self.gate_mode not in RANDOM_MODES

    @property
    def shared_expert(self) -> ExpertConfig | None:
        """The one shared expert (Qwen MoE output), if any."""
        return self.shared_experts[0] if self.shared_experts else None

    def expert_spec(self, index: int) -> ExpertConfig:
        """Routed expert ``index``; index ``num_experts`` is the shared expert."""
        return self.experts[index] if index < len(self.experts) else self.shared_experts[index - len(self.experts)]

    def model_refs(self) -> list[str]:
        """Every distinct model reference, base first, in order of appearance (the shared expert last)."""
        seen: dict[str, None] = {self.base_model: None}
        for expert in self.experts + list(self.shared_experts or []):
            seen.setdefault(expert.source_model, None)
        return list(seen)

    def with_seed(self, *, from_recipe: bool = False) -> "MoEConfig":
        """A copy whose randomness is pinned, so the saved config reproduces the merge exactly. The seed is
        random, or with ``from_recipe`` derived from the recipe itself: the same recipe then builds the same
        bytes every time (a re-run of an interrupted upload finds its shards on the Hub by their hash)."""
        if self.seed is not None:
            return self
        if from_recipe:
            digest = hashlib.sha256(self.to_yaml().encode("utf-8")).digest()
            return self.model_copy(update={"seed": int.from_bytes(digest[:4], "big") % 2**31})
        return self.model_copy(update={"seed": _random.SystemRandom().randrange(2**31)})

    def to_dict(self) -> dict[str, Any]:
        """The mergekit-compatible dict: extensions and defaults-only fields are left out."""
        data = self.model_dump(exclude_none=True)
        for expert in data["experts"] + data.get("shared_experts", []):
            for key in ("negative_prompts", "calibration_text"):
                if not expert.get(key):
                    expert.pop(key, None)
            if not expert.get("positive_prompts") and expert in data.get("shared_experts", []):
                expert.pop("positive_prompts", None)
        if not data.get("shared_experts"):
            data.pop("shared_experts", None)
        if not data.get("allow_all_same_experts"):
            data.pop("allow_all_same_experts", None)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100)


# --------------------------------------------------------------------- parsing

_TOP_KEYS = tuple(MoEConfig.model_fields)
_EXPERT_KEYS = tuple(ExpertConfig.model_fields)


def _did_you_mean(key: str, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(options)}."


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"Unknown key '{key}' in {where}.{_did_you_mean(str(key), allowed)}")


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ""
    for part in first["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        field = first["loc"][-1]
        allowed = GATE_MODES if field == "gate_mode" else DTYPES if field == "dtype" else ()
        close = difflib.get_close_matches(str(first.get("input")), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{loc}: {_short_repr(first.get('input'))} is not allowed; use one of {', '.join(allowed)}.{hint}"
    if first["type"] == "missing":
        return f"{loc} is required but missing from the config."
    return f"{loc or 'The config'}: {msg} (got {_short_repr(first.get('input'))})."  # no loc: the whole input


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 4, 4, 60, 60, 40


def _short_repr(value: Any, limit: int = 80) -> str:
    """A repr that stays short however big the input (YAML aliases can nest millions of items)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validated(model: type[BaseModel], data: Any, validate: Callable[[], Any]) -> Any:
    """``validate()``, after the shape check of ``data`` where it is a mapping, with pydantic's error made one line."""
    if isinstance(data, dict):
        _check_shape(model, data)
    with _one_line_errors():
        return validate()


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """pydantic's multi-line ValidationError as one ConfigError naming the first problem and its fix."""
    try:
        yield
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def _check_shape(model: type[BaseModel], data: dict[Any, Any]) -> None:
    """What pydantic would word badly, worded first: unknown keys (with the nearest known one), experts that
    are not a list of mappings. An ExpertConfig already built is taken as it is."""
    if model is not MoEConfig:
        _check_keys(data, tuple(model.model_fields), f"the {model.__name__}")
        return
    _check_keys(data, _TOP_KEYS, "the config")
    experts = data.get("experts")
    if experts is None:
        raise ConfigError("experts is required: list the models whose MLPs become experts (at least two).")
    if not isinstance(experts, list):
        raise ConfigError("experts must be a list of mappings, each with source_model and positive_prompts.")
    if data.get("shared_experts") is not None and not isinstance(data["shared_experts"], list):
        raise ConfigError("shared_experts must be a list of mappings like experts (at most one, for a Qwen MoE output).")
    for key in ("experts", "shared_experts"):
        for i, expert in enumerate(data.get(key) or []):
            if isinstance(expert, ExpertConfig):
                continue
            if not isinstance(expert, dict):
                raise ConfigError(f"{key}[{i}] must be a mapping with source_model and positive_prompts.")
            _check_keys(expert, _EXPERT_KEYS, f"{key}[{i}]")


def parse_config(data: Any) -> MoEConfig:
    """Validate a mapping (parsed YAML, form values) into a :class:`MoEConfig`, or raise :class:`ConfigError`."""
    if isinstance(data, MoEConfig):
        return validate_config(data)
    if not isinstance(data, dict):
        raise ConfigError(
            f"A MoE config must be a mapping with base_model and experts, got {type(data).__name__}."
        )
    _check_shape(MoEConfig, data)  # here too: a YAML key that is not a string cannot be a keyword argument
    return validate_config(MoEConfig(**data))


def validate_config(config: MoEConfig) -> MoEConfig:
    """The semantic rules of BRIEF §2, each with a message that names the fix."""
    n = len(config.experts)
    if n < 2:
        raise ConfigError(f"A MoE needs at least 2 experts; this config has {n}. Add experts under 'experts'.")
    if not 1 <= config.experts_per_token <= n:
        raise ConfigError(
            f"experts_per_token is {config.experts_per_token} but must be between 1 and the number of "
            f"experts ({n}). 2 is the usual choice."
        )
    if len(config.shared_experts or []) > 1:
        raise ConfigError(
            f"shared_experts has {len(config.shared_experts)} entries; Qwen MoE (Qwen2-MoE) has one shared expert "
            "per layer, so give 0 or 1."
        )
    if config.architecture is not None:
        names = ", ".join(o.name for o in _arch.OUTPUTS.values())
        why = _arch.not_written(config.architecture)
        if why and not _arch.match_architecture(config.architecture):
            raise ConfigError(f"architecture {config.architecture!r}: lazymoe does not write it ({why}); "
                              f"it writes {names}.")
        if not config.architecture.strip() or not _arch.match_architecture(config.architecture):
            raise ConfigError(f"Unknown architecture {config.architecture!r}; lazymoe writes {names} "
                              "(matched by prefix, as mergekit-moe does: 'qwen3' means Qwen3 MoE).")
    labelled = [(f"experts[{i}]", e) for i, e in enumerate(config.experts)]
    labelled += [(f"shared_experts[{i}]", e) for i, e in enumerate(config.shared_experts or [])]
    for where, expert in labelled:
        for field in ("noise_scale", "residual_scale"):
            value = getattr(expert, field)
            if value is not None and (value != value or value in (float("inf"), float("-inf"))):
                raise ConfigError(f"{where}.{field} must be a finite number, got {value}.")
        if expert.noise_scale is not None and expert.noise_scale < 0:
            raise ConfigError(f"{where}.noise_scale must be >= 0 (it is a standard deviation).")
        # MLP weights are ~0.02 in size: beyond these the expert is noise, or (a typo like 1e40) inf
        if expert.noise_scale is not None and expert.noise_scale > MAX_NOISE_SCALE:
            raise ConfigError(f"{where}.noise_scale is {expert.noise_scale:g}; above {MAX_NOISE_SCALE:g} the "
                              "noise drowns the weights (typical values: 0.001 to 0.05).")
        if expert.residual_scale is not None and abs(expert.residual_scale) > MAX_RESIDUAL_SCALE:
            raise ConfigError(f"{where}.residual_scale is {expert.residual_scale:g}; keep it within "
                              f"±{MAX_RESIDUAL_SCALE:g} (typical values: 0.5 to 2).")
        for field in ("positive_prompts", "negative_prompts", "calibration_text"):
            for j, prompt in enumerate(getattr(expert, field)):
                if not prompt.strip():
                    raise ConfigError(f"{where}.{field}[{j}] is empty; remove it or write some text.")
    if config.uses_prompts:
        for i, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                raise ConfigError(
                    f"experts[{i}] ({expert.source_model}) has no positive_prompts, which gate_mode "
                    f"'{config.gate_mode}' needs: add a few prompts that describe what this expert is for, "
                    "or use gate_mode 'random'."
                )
        prompts = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in config.experts}
        if len(prompts) == 1:
            raise ConfigError(
                "The positive and negative prompts are identical for every expert, so the router cannot "
                "tell them apart. Give each expert prompts that describe its own domain."
            )
    if not config.allow_all_same_experts and len({e.source_model for e in config.experts}) == 1:
        allow = Setting("allow_all_same_experts", True, python="set allow_all_same_experts: true in the config")
        raise ConfigError(Text(
            f"Every expert is the same model ({config.experts[0].source_model}): the MoE would cost "
            f"{n}x the MLP memory and compute the same thing. If you will train it afterwards, {allow.placeholder}.",
            (allow,)
        ))
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults": explicit keys may override those
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key ([a, b]: ...) is refused by the base class with a clear mark
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long to be a path: YAML text, then
        return False


def load_config(source: str | os.PathLike | dict | MoEConfig) -> MoEConfig:
    """Load a config from a YAML file path, a YAML string, a dict or a config object."""
    if isinstance(source, (MoEConfig, dict)):
        return parse_config(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"A MoE config is a YAML file path, YAML text, a dict or a MoEConfig, got {type(source).__name__}."
        )
    text: str
    path = Path(source)
    one_line = "\n" not in str(source)
    if isinstance(source, os.PathLike) or (one_line and (path.suffix.lower() in (".yml", ".yaml") or _is_file(path))):
        try:
            is_file, is_dir, exists = path.is_file(), path.is_dir(), path.exists()
        except OSError as err:  # a name too long for the filesystem, a link loop
            raise ConfigError(f"Config file {path} cannot be used ({err.strerror or err}).") from None
        if not is_file:
            if is_dir:
                raise ConfigError(f"{path} is a folder; give the YAML config file (e.g. {path / 'moe.yaml'}).")
            why = "is not a regular file" if exists else "does not exist"
            raise ConfigError(f"Config file {path} {why}.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"Config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); "
                "save it as UTF-8."
            ) from None
        except OSError as err:
            raise ConfigError(f"Config file {path} cannot be read ({err.strerror}).") from None
    else:
        text = source
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise ConfigError("The config nests too deeply to be a MoE config; check its indentation.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"The config is not valid YAML{where}: {problem}.") from None
    if isinstance(data, str) and one_line and text is source:  # a file name that is not there, not YAML text
        shown = text if len(text) <= 200 else text[:200] + "…"
        raise ConfigError(f"Config file {shown} does not exist; give the path of a YAML file, YAML text, a dict or a "
                          "MoEConfig.")
    if isinstance(data, dict) and isinstance(data.get("notebook"), dict):
        # a notebook preset or a recipe saved by the notebook form: its notebook: block holds the form's
        # settings (model name, upload, GGUF), not MoE config, so the CLI and Python take the file as it is
        data = {k: v for k, v in data.items() if k != "notebook"}
    return parse_config(data)
