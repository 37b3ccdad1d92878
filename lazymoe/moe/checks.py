"""Compatibility checks from configs and headers alone: refuse what would build a broken MoE.

Each error names the expert (or base), the field or tensor, and what to do instead.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from tokenizers import Tokenizer  # the Rust library transformers' tokenizers wrap: milliseconds to import

from . import arch
from ..config import MoEConfig
from ..errors import ModelFormatError, ModelMismatchError
from ..io.safetensors import ST_DTYPES, ST_TO_NAME
from ..io.sources import TOKENIZER_FILES, ModelInfo
from ..lazy import collector_paused, load_torch_libraries
from ..tokens import router_token_ids


_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

_SAME_KEYS = (
    ("hidden_size", "hidden size"),
    ("intermediate_size", "intermediate (MLP) size"),
    ("num_hidden_layers", "layer count"),
    ("num_attention_heads", "attention head count"),
    ("num_key_value_heads", "key/value head count"),
    ("head_dim", "head dimension"),
    ("hidden_act", "MLP activation"),
    ("rope", "RoPE settings"),
)


def _label(config: MoEConfig, ref: str) -> str:
    names = [label for label, r in _roles(config) if r == ref]
    return " / ".join(names) + f" ({ref})"


def rope_settings(cfg: dict) -> dict:
    """RoPE as one canonical dict, whichever transformers version wrote the config.

    transformers 4.x writes ``rope_theta`` + ``rope_scaling`` (with ``type`` or ``rope_type``); 5.x writes
    ``rope_parameters``. Fine-tunes of one base are often saved by different versions, so comparing the raw
    keys would refuse compatible experts.
    """
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.pop("rope_theta", arch.DENSE_ROPE_THETA))
    params.pop("rope_theta", None)
    merged = {**params, **scaling}
    if "type" in merged:
        merged.setdefault("rope_type", merged.pop("type"))
        merged.pop("type", None)
    if merged.get("rope_type", "default") == "default":
        merged.pop("rope_type", None)
    return {"rope_theta": float(theta), **merged}


def _setting(cfg: dict, key: str):
    if key == "rope":
        return rope_settings(cfg)
    value = cfg.get(key)
    if key == "head_dim" and value is None:
        value = cfg["hidden_size"] // cfg["num_attention_heads"]
    if key == "num_key_value_heads" and value is None:
        value = cfg.get("num_attention_heads")
    return value


def _roles(config: MoEConfig) -> list[tuple[str, str]]:
    """(label, model reference) of every input model: base, experts, shared expert."""
    out = [("base_model", config.base_model)]
    out += [(f"experts[{i}]", e.source_model) for i, e in enumerate(config.experts)]
    out += [(f"shared_experts[{i}]", e.source_model) for i, e in enumerate(config.shared_experts or [])]
    return out


def input_family(config: MoEConfig, models: dict[str, ModelInfo]) -> str:
    """The one family every input model belongs to; refuses unknown families and mixtures, naming them."""
    known = ", ".join(sorted(arch.FAMILIES))
    by_family: dict[str, list[str]] = {}
    for label, ref in _roles(config):
        mtype = models[ref].model_type
        if mtype not in arch.FAMILIES:
            raise ModelMismatchError(
                f"{label} ({ref}) is a '{mtype}' model; lazymoe merges {known} models. "
                "Pick models of one of those families."
            )
        by_family.setdefault(arch.FAMILIES[mtype], []).append(f"{label} ({mtype})")
    if len(by_family) > 1:
        parts = "; ".join(f"{family}: {', '.join(who)}" for family, who in by_family.items())
        raise ModelMismatchError(
            f"This merge mixes model families ({' and '.join(by_family)}): {parts}. Every model of a MoE must "
            "share the base's architecture (fine-tunes of one base model); remove the others."
        )
    return next(iter(by_family))


def choose_output(config: MoEConfig, models: dict[str, ModelInfo]) -> tuple[arch.Output, str]:
    """The output architecture for these inputs and the reason, or ModelMismatchError saying why none fits."""
    family = input_family(config, models)
    try:
        output, why = arch.choose_output(config.architecture, family, len(config.shared_experts or []))
    except ValueError as err:
        raise ModelMismatchError(f"{err}. Remove 'architecture' to let lazymoe choose, or change the experts.") from None
    base = models[config.base_model].config
    if output.key == "qwen2_moe" and rope_settings(base).get("rope_type") not in (None, "linear", "yarn"):
        raise ModelMismatchError(
            f"base_model ({config.base_model}) uses RoPE scaling '{rope_settings(base)['rope_type']}', which "
            "llama.cpp's qwen2moe does not apply (its GGUF would compute another model); build Mixtral instead "
            "(remove 'architecture' and shared_experts)."
        )
    return output, why


def check_models(config: MoEConfig, models: dict[str, ModelInfo]) -> list[str]:
    """Raise :class:`ModelMismatchError` for anything that would build a broken MoE; return warnings."""
    warnings: list[str] = []
    base = models[config.base_model]
    btype = base.model_type
    output, _ = choose_output(config, models)
    family = arch.FAMILIES[btype]
    if family == "llama" and (base.config.get("attention_bias") or base.config.get("mlp_bias")):
        raise ModelMismatchError(
            f"base_model ({config.base_model}) uses attention/MLP biases, which {output.name} has no place for."
        )
    for ref, info in models.items():
        for key in _REQUIRED_INTS:
            if info.config.get(key) is None:
                raise ModelFormatError(
                    f"{_label(config, ref)}: config.json has no {key}, which every {info.model_type} model has; "
                    "the file is incomplete, download the model again."
                )
    if family == "qwen3" and base.config.get("attention_bias"):
        raise ModelMismatchError(
            f"base_model ({config.base_model}) uses attention biases; lazymoe's Qwen3 MoE keeps q/k norms only."
        )
    for ref, info in models.items():
        if ref == config.base_model:
            continue
        label = _label(config, ref)
        if info.model_type != btype:
            warnings.append(f"{label} is '{info.model_type}' and the base '{btype}'; their MLPs are compatible.")
        for key, what in _SAME_KEYS:
            mine, theirs = _setting(info.config, key), _setting(base.config, key)
            if mine != theirs:
                shown = what if key == "rope" else f"{what} {key}="
                raise ModelMismatchError(
                    f"{label} has {shown}{' ' if key == 'rope' else ''}{mine!r} but the base has {theirs!r}. Its MLPs "
                    "were trained for different inputs; use experts fine-tuned from the same base model."
                )
    num_layers = int(base.config["num_hidden_layers"])
    H, I = int(base.config["hidden_size"]), int(base.config["intermediate_size"])
    expected = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    mlp_sources = {e.source_model for e in config.experts + list(config.shared_experts or [])}
    for ref, info in models.items():
        label = _label(config, ref)
        extra_layers = sorted({l for n in info.tensors if (l := arch.layer_of(n)) is not None and l >= num_layers})
        if extra_layers:
            raise ModelMismatchError(f"{label} has tensors for layer {extra_layers[0]} but config says {num_layers} layers.")
        if ref not in mlp_sources:
            continue
        for layer in range(num_layers):
            for part, shape in expected.items():
                name = arch.mlp_name(layer, part)
                t = info.tensors.get(name)
                if t is None:
                    raise ModelMismatchError(
                        f"{label} has no tensor {name}; an expert needs every layer's MLP "
                        "(is it a LoRA adapter or a differently named architecture?)."
                    )
                if t.shape != shape:
                    raise ModelMismatchError(f"{label}: {name} has shape {list(t.shape)}, expected {list(shape)}.")
                if t.dtype not in ST_TO_NAME and t.dtype != "F64":
                    raise ModelMismatchError(f"{label}: {name} has dtype {t.dtype}; only float weights can be merged.")
    # base: every shared tensor present, nothing unknown
    shared_re = arch.SHARED_RE_BY_FAMILY[family]
    for name, t in base.tensors.items():
        if shared_re.match(name) or arch.MLP_RE.match(name) or arch.IGNORED_RE.match(name):
            continue
        raise ModelMismatchError(
            f"base_model ({config.base_model}) has tensor {name}, which {output.name} has no place for "
            "(quantised or adapter weights?). Use a plain float checkpoint."
        )
    needed = [arch.EMBED, arch.FINAL_NORM] + [
        f"{arch.layer_prefix(l)}{n}"
        for l in range(num_layers)
        for n in arch.LAYER_TENSORS + arch.FAMILY_ATTENTION_EXTRAS[family]
    ]
    for name in needed:
        if name not in base.tensors:
            raise ModelMismatchError(f"base_model ({config.base_model}) has no tensor {name}.")
    _check_base_shapes(config, base, H)
    tied = bool(base.config.get("tie_word_embeddings", False))
    if not tied and arch.LM_HEAD not in base.tensors:
        raise ModelMismatchError(
            f"base_model ({config.base_model}) has no lm_head.weight and tie_word_embeddings is false; "
            "the checkpoint is incomplete."
        )
    vocab = base.tensors[arch.EMBED].shape[0]
    if vocab != base.config.get("vocab_size", vocab):
        raise ModelMismatchError(
            f"base_model ({config.base_model}): config vocab_size={base.config['vocab_size']} but "
            f"embed_tokens has {vocab} rows; the checkpoint is inconsistent."
        )
    for ref, info in models.items():
        other = info.config.get("vocab_size")
        if ref != config.base_model and other is not None and other != vocab:
            warnings.append(
                f"{_label(config, ref)} has a vocabulary of {other} tokens, the base {vocab}. Only its MLPs are "
                "used and they do not depend on the vocabulary, but tokens it added do not exist in the MoE."
            )
    return warnings


def _check_base_shapes(config: MoEConfig, base: ModelInfo, H: int) -> None:
    """The base's tensors are read by the router pass and copied as they are: each must have a dtype lazymoe
    reads and the shape its config implies, or the merge would fail (or write a broken model) much later."""
    cfg = base.config
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or H // heads)
    vocab = base.tensors["model.embed_tokens.weight"].shape[0] if base.tensors["model.embed_tokens.weight"].shape else 0
    expected = {"model.embed_tokens.weight": (vocab, H), "lm_head.weight": (vocab, H), "model.norm.weight": (H,)}
    per_layer = {"input_layernorm": (H,), "post_attention_layernorm": (H,), "self_attn.q_proj": (heads * head_dim, H),
                 "self_attn.k_proj": (kv * head_dim, H), "self_attn.v_proj": (kv * head_dim, H),
                 "self_attn.o_proj": (H, heads * head_dim)}
    for layer in range(int(cfg["num_hidden_layers"])):
        expected.update({f"model.layers.{layer}.{n}.weight": shape for n, shape in per_layer.items()})
    for name, t in base.tensors.items():
        if arch.IGNORED_RE.match(name):
            continue
        if t.dtype not in ST_DTYPES:
            raise ModelMismatchError(
                f"base_model ({config.base_model}): {name} has dtype {t.dtype}, which lazymoe cannot read; "
                "use a plain float (bfloat16/float16/float32) checkpoint."
            )
        want = expected.get(name)
        if want is not None and t.shape != want:
            raise ModelMismatchError(
                f"base_model ({config.base_model}): {name} has shape {list(t.shape)} but its config.json implies "
                f"{list(want)}; the checkpoint is inconsistent."
            )


def check_tokenizer_files(config: MoEConfig, base: ModelInfo) -> bool:
    """The part of the tokenizer check that needs no transformers, in milliseconds (its import costs about 2 s
    of CPU, as long as copying a few GB on two cores): the files are there, ``tokenizer.json`` loads with the
    `tokenizers` library (the one transformers' own tokenizers wrap) and no token id it can produce exceeds the
    embedding (:func:`tokenizer_size`), and the prompts fit the base's context. Raises what
    :func:`check_tokenizer` would; returns whether it decided everything :func:`check_tokenizer` checks (which
    then cannot fail): not under transformers 4, whose rules differ in corners, nor with
    ``router_chat_template``, nor for a prompt within a few tokens of the context."""
    vocab = base.tensors[arch.EMBED].shape[0]
    if base.folder is not None and not any((base.folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelMismatchError(
            f"base_model ({config.base_model}) has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...). "
            "The MoE reuses the base tokenizer: add the tokenizer files of the model it was fine-tuned from."
        )
    if base.folder is None or not (base.folder / "tokenizer.json").is_file() or _transformers_major() < 5:
        return False
    try:
        tok, size = read_tokenizer(base.folder)
    except LeftToTransformers:
        return False
    except Exception as err:  # noqa: BLE001 - whatever the files' readers raise, the user's answer is one
        raise tokenizer_unloadable(config, base, err) from None
    _check_size(config, size, vocab)
    if not config.uses_prompts:
        return True
    context = base.config.get("max_position_embeddings")
    if config.router_chat_template or not isinstance(context, int):
        return False
    prompts = [p for e in config.experts for p in (*e.positive_prompts, *e.negative_prompts)]
    # transformers may add a BOS or EOS that tokenizer.json's post-processor does not: a margin, not a count
    return max(len(tok.encode(p).ids) for p in prompts) + _PROMPT_MARGIN <= context


#: tokens a prompt may gain between `tokenizers` and transformers (special tokens one adds and not the other)
_PROMPT_MARGIN = 8


def check_tokenizer(config: MoEConfig, base: ModelInfo):
    """The base tokenizer must load and must not produce ids the embedding matrix does not have. Where its files
    decide that (:func:`check_tokenizer_files`, nearly always) transformers is not loaded and this returns None;
    otherwise it loads the tokenizer to decide and returns it (the router pass tokenises the prompts with it).
    The verdict is transformers' own either way (``tests/test_tokenizer_check.py`` holds the two to it)."""
    if check_tokenizer_files(config, base):
        return None
    vocab = base.tensors[arch.EMBED].shape[0]
    tok = load_tokenizer(config, base)
    if config.router_chat_template and config.uses_prompts:  # a template that fails, fails now, not after downloads
        router_token_ids(tok, config.experts[0].positive_prompts[0], chat_template=True)
    context = base.config.get("max_position_embeddings")
    for i, expert in enumerate(config.experts if config.uses_prompts and context else ()):
        for field in ("positive_prompts", "negative_prompts"):
            for j, prompt in enumerate(getattr(expert, field)):
                n = len(router_token_ids(tok, prompt))
                if n > context:  # the router pass would run the base past its context (and out of memory)
                    raise ModelMismatchError(
                        f"experts[{i}].{field}[{j}] is {n} tokens long but the base reads at most {context}; "
                        "shorten it: a few sentences describe a domain best."
                    )
    _check_size(config, len(tok), vocab)
    return tok


def _transformers_major() -> int:
    """The installed transformers' major version, read without importing it. :func:`tokenizer_size` follows
    transformers 5's rules (4.x differs in corners: it ignores a model's own ``image_token``, refuses a list of
    ``extra_special_tokens``), so under 4.x the check loads the tokenizer itself."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def load_tokenizer(config: MoEConfig, base: ModelInfo):
    """The base's tokenizer as transformers loads it (``AutoTokenizer``), or the one-line error saying it cannot."""
    with collector_paused():  # transformers' import, and the tokenizer modules it imports on first use
        load_torch_libraries()  # transformers imports torch: its libraries first, without stopping other threads
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(base.folder))
        except Exception as err:  # noqa: BLE001 - whatever transformers raises, the user's answer is one
            raise tokenizer_unloadable(config, base, err) from None


def tokenizer_unloadable(config: MoEConfig, base: ModelInfo, err: BaseException) -> ModelMismatchError:
    return ModelMismatchError(
        f"base_model ({config.base_model}): its tokenizer cannot be loaded ({type(err).__name__}: {err}). "
        f"The MoE reuses the base tokenizer, so the base {'repo' if base.ref.repo_id else 'folder'}'s "
        "tokenizer files must load: repair them, or use a base whose tokenizer loads."
    )


def _check_size(config: MoEConfig, size: int, vocab: int) -> None:
    if size > vocab:
        raise ModelMismatchError(
            f"base_model ({config.base_model}): the tokenizer has {size} tokens but the embedding only "
            f"{vocab} rows, so some token ids would crash the model. Use a base whose tokenizer matches its weights."
        )


#: the special tokens every transformers tokenizer has a setting for (``SPECIAL_TOKENS_ATTRIBUTES``)
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def tokenizer_size(folder: Path) -> int:
    """How many tokens the tokenizer in ``folder`` has once transformers loads it (:func:`read_tokenizer`)."""
    return read_tokenizer(folder)[1]


def read_tokenizer(folder: Path) -> tuple[Tokenizer, int]:
    """The tokenizer in ``folder`` as `tokenizers` reads it, and how many tokens it has once transformers
    loads it (``len(tokenizer)``), from its files alone: ``tokenizer.json``'s vocabulary and added tokens, plus
    each distinct token that ``tokenizer_config.json`` names and the vocabulary lacks, which transformers
    appends: the special-token settings (``bos_token`` ... ``mask_token``, any other ``*_token`` holding a
    token), ``extra_special_tokens`` (or the older ``additional_special_tokens``) and ``added_tokens_decoder``.
    Raises what the readers raise on a damaged file, TypeError or ValueError where transformers refuses a
    setting too, and :class:`LeftToTransformers` for an older tokenizer whose special_tokens_map.json or
    added_tokens.json transformers reads (no ``added_tokens_decoder``)."""
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    named: list[str] = []
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not isinstance(cfg, dict):
        raise TypeError(f"tokenizer_config.json holds a JSON {type(cfg).__name__}, not an object")
    if "added_tokens_decoder" not in cfg and any((folder / name).is_file() for name in _LEGACY_TOKEN_FILES):
        raise LeftToTransformers("transformers reads the older special_tokens_map.json / added_tokens.json")
    for key, value in cfg.items():
        if key in _SPECIAL_TOKENS and value is not None:
            if _token_text(value) is None:
                raise TypeError(f"{key} must be a token string, not {value!r}")
            named.append(_token_text(value))
        elif key.endswith("_token") and _token_text(value) is not None:  # a model's own, e.g. image_token
            named.append(_token_text(value))
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens")
    if isinstance(extra, dict):
        named.extend(t for t in map(_token_text, extra.values()) if t is not None)
    elif isinstance(extra, list):
        for value in extra:
            if _token_text(value) is None:
                raise TypeError(f"extra_special_tokens must hold token strings, not {value!r}")
            named.append(_token_text(value))
    elif extra is not None:
        raise TypeError("extra_special_tokens must be a list of tokens or a mapping of named tokens")
    decoder = cfg.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise TypeError("added_tokens_decoder must map ids to tokens")
    for key, value in decoder.items():
        int(key)  # an id, as transformers reads it: ValueError otherwise
        if _token_text(value, decoder=True) is None:
            raise TypeError(f"added_tokens_decoder[{key!r}] must be a token object, not {value!r}")
        named.append(_token_text(value, decoder=True))
    new = {t for t in named if t and tok.token_to_id(t) is None}  # transformers adds no empty token
    return tok, tok.get_vocab_size(with_added_tokens=True) + len(new)


#: the token files of older tokenizers: transformers 5 still reads them where tokenizer_config.json has no
#: ``added_tokens_decoder``, by rules :func:`read_tokenizer` does not repeat (it leaves those to transformers)
_LEGACY_TOKEN_FILES = ("special_tokens_map.json", "added_tokens.json")


class LeftToTransformers(Exception):
    """The files alone cannot tell what transformers would make of them: the full check loads the tokenizer."""


def _token_text(value, *, decoder: bool = False) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an object with its content (a serialised
    AddedToken, ``"__type": "AddedToken"``; any such object in ``added_tokens_decoder``); None otherwise."""
    if isinstance(value, str):
        return None if decoder else value  # the decoder holds token objects; transformers refuses a bare string
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        if decoder or value.get("__type") == "AddedToken":
            return value["content"]
    return None
