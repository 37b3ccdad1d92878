"""The merge plan: every output tensor, where its bytes come from, and which shard it lands in.

Built from configs and safetensors headers alone. It is what ``lazymoe plan`` prints, what the notebook
previews, what the checks run against, and what the writer executes byte for byte.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import arch
from .config import MoEConfig
from .errors import ConfigError, ModelMismatchError
from .safetensors_io import NAME_TO_ST, ST_DTYPES, TensorInfo
from .sources import ModelInfo

DEFAULT_MAX_SHARD_BYTES = 2 * 1000**3  # 2 GB: a free Colab (12.7 GB RAM) never holds more than one tensor anyway

_ST_TO_NAME = {v: k for k, v in NAME_TO_ST.items()}


@dataclass(frozen=True)
class Piece:
    """A run of output bytes: one source tensor, optionally transformed (dtype, noise, residual scale)."""

    source: TensorInfo | None  # None for computed tensors (the router)
    expert: int | None = None  # which expert's transform applies
    is_residual: bool = False  # down_proj: residual_scale applies

    @property
    def nbytes_in(self) -> int:
        return self.source.nbytes if self.source else 0


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    gate_layer: int | None = None  # set for router tensors
    expert: int | None = None  # set for single-expert tensors (classic layout)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPES[self.dtype][1]


@dataclass
class Shard:
    filename: str
    tensors: list[OutTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    config: MoEConfig
    models: dict[str, ModelInfo]
    out_config: dict
    layout: arch.Layout
    dtype: str  # torch name, e.g. "bfloat16"
    tensors: list[OutTensor]
    shards: list[Shard]
    total_params: int
    active_params: int
    expert_params: int  # one expert's MLP parameters, all layers
    download_bytes: int
    max_shard_bytes: int
    warnings: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        return sum(p.nbytes_in for t in self.tensors for p in t.pieces)

    @property
    def num_layers(self) -> int:
        return int(self.out_config["num_hidden_layers"])

    @property
    def base(self) -> ModelInfo:
        return self.models[self.config.base_model]

    @property
    def hidden_pass_bytes(self) -> int:
        """Memory the hidden-state router pass holds: the base model in bfloat16."""
        if self.config.gate_mode not in ("hidden", "hidden_last", "hidden_avg"):
            return 0
        return sum(t.numel for t in self.base.tensors.values()) * 2

    @property
    def peak_ram_bytes(self) -> int:
        """Streaming holds at most one tensor (plus its dtype-converted copy); the hidden pass holds the base."""
        biggest = max(t.nbytes for t in self.tensors)
        return max(3 * biggest, self.hidden_pass_bytes) + 600 * 1000**2  # + interpreter, torch, transformers

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.download_bytes + (64 << 20)

    def summary(self) -> dict:
        return {
            "architecture": "MixtralForCausalLM",
            "layout": self.layout,
            "layers": self.num_layers,
            "experts": self.config.num_experts,
            "experts_per_token": self.config.experts_per_token,
            "gate_mode": self.config.gate_mode,
            "dtype": self.dtype,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "output_bytes": self.output_bytes,
            "shards": len(self.shards),
            "download_bytes": self.download_bytes,
            "disk_bytes": self.disk_bytes,
            "ram_bytes": self.peak_ram_bytes,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- checks

_SAME_KEYS = (
    ("hidden_size", "hidden size"),
    ("intermediate_size", "intermediate (MLP) size"),
    ("num_hidden_layers", "layer count"),
    ("num_attention_heads", "attention head count"),
    ("num_key_value_heads", "key/value head count"),
    ("head_dim", "head dimension"),
    ("hidden_act", "MLP activation"),
    ("rope_theta", "RoPE theta"),
    ("rope_scaling", "RoPE scaling"),
    ("rope_parameters", "RoPE parameters"),
)


def _label(config: MoEConfig, ref: str) -> str:
    names = [f"experts[{i}]" for i, e in enumerate(config.experts) if e.source_model == ref]
    who = "base_model" if ref == config.base_model else ""
    return " / ".join(([who] if who else []) + names) + f" ({ref})"


def _norm_rope(cfg: dict, key: str):
    value = cfg.get(key)
    if key == "rope_theta" and value is None:
        value = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    if key == "head_dim" and value is None:
        value = cfg["hidden_size"] // cfg["num_attention_heads"]
    if key == "num_key_value_heads" and value is None:
        value = cfg.get("num_attention_heads")
    return value


def check_models(config: MoEConfig, models: dict[str, ModelInfo]) -> list[str]:
    """Raise :class:`ModelMismatchError` for anything that would build a broken MoE; return warnings."""
    warnings: list[str] = []
    base = models[config.base_model]
    btype = base.model_type
    if btype not in arch.FAMILIES:
        raise ModelMismatchError(
            f"base_model ({config.base_model}) is a '{btype}' model; lazymoe builds Mixtral MoEs from "
            f"Llama or Mistral models ({', '.join(arch.FAMILIES)}). Pick a base of that family."
        )
    if base.config.get("attention_bias") or base.config.get("mlp_bias"):
        raise ModelMismatchError(
            f"base_model ({config.base_model}) uses attention/MLP biases, which Mixtral has no place for."
        )
    for ref, info in models.items():
        if ref == config.base_model:
            continue
        label = _label(config, ref)
        if arch.FAMILIES.get(info.model_type) != arch.FAMILIES[btype]:
            raise ModelMismatchError(
                f"{label} is a '{info.model_type}' model but the base is '{btype}': experts must be of the "
                "base's family (fine-tunes of the same architecture). Remove it or choose another base."
            )
        if info.model_type != btype:
            warnings.append(f"{label} is '{info.model_type}' and the base '{btype}'; their MLPs are compatible.")
        for key, what in _SAME_KEYS:
            mine, theirs = _norm_rope(info.config, key), _norm_rope(base.config, key)
            if mine != theirs:
                raise ModelMismatchError(
                    f"{label} has {what} {key}={mine!r} but the base has {theirs!r}. Its MLPs were trained "
                    "for different inputs; use experts fine-tuned from the same base model."
                )
    num_layers = int(base.config["num_hidden_layers"])
    H, I = int(base.config["hidden_size"]), int(base.config["intermediate_size"])
    expected = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    for ref, info in models.items():
        if ref != config.base_model and ref not in {e.source_model for e in config.experts}:
            continue
        label = _label(config, ref)
        extra_layers = sorted({l for n in info.tensors if (l := arch.layer_of(n)) is not None and l >= num_layers})
        if extra_layers:
            raise ModelMismatchError(f"{label} has tensors for layer {extra_layers[0]} but config says {num_layers} layers.")
        if ref not in {e.source_model for e in config.experts}:
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
                if t.dtype not in _ST_TO_NAME and t.dtype != "F64":
                    raise ModelMismatchError(f"{label}: {name} has dtype {t.dtype}; only float weights can be merged.")
    # base: every shared tensor present, nothing unknown
    for name, t in base.tensors.items():
        if arch.SHARED_RE.match(name) or arch.MLP_RE.match(name) or arch.IGNORED_RE.match(name):
            continue
        raise ModelMismatchError(
            f"base_model ({config.base_model}) has tensor {name}, which Mixtral has no place for "
            "(quantised or adapter weights?). Use a plain float checkpoint."
        )
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{l}.{n}.weight"
        for l in range(num_layers)
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj")
    ]
    for name in needed:
        if name not in base.tensors:
            raise ModelMismatchError(f"base_model ({config.base_model}) has no tensor {name}.")
    tied = bool(base.config.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in base.tensors:
        raise ModelMismatchError(
            f"base_model ({config.base_model}) has no lm_head.weight and tie_word_embeddings is false; "
            "the checkpoint is incomplete."
        )
    vocab = base.tensors["model.embed_tokens.weight"].shape[0]
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
    n = config.num_experts
    if n & (n - 1):
        warnings.append(
            f"{n} experts is not a power of two. transformers and current llama.cpp handle it, but some "
            "GGUF runtimes and older llama.cpp builds assume 2/4/8 experts; prefer a power of two if you "
            "plan to share GGUF files."
        )
    return warnings


def check_tokenizer(config: MoEConfig, base: ModelInfo) -> None:
    """The base tokenizer must not produce ids the embedding matrix does not have."""
    from transformers import AutoTokenizer

    vocab = base.tensors["model.embed_tokens.weight"].shape[0]
    try:
        tok = AutoTokenizer.from_pretrained(str(base.folder))
    except Exception as err:
        raise ModelMismatchError(
            f"base_model ({config.base_model}): its tokenizer cannot be loaded ({type(err).__name__}: {err}). "
            "The MoE reuses the base tokenizer, so the base folder must contain one."
        ) from None
    if len(tok) > vocab:
        raise ModelMismatchError(
            f"base_model ({config.base_model}): the tokenizer has {len(tok)} tokens but the embedding only "
            f"{vocab} rows, so some token ids would crash the model. Use a base whose tokenizer matches its weights."
        )


# --------------------------------------------------------------------------- plan


def parse_bytes(text: str | int) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (units are bytes, as the flag name says)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
             "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ConfigError(f"{text!r} is not a size; write it like 2GB, 500MB or 1.5GiB.")
    return int(value * units[unit])


def _out_dtype(config: MoEConfig, base: ModelInfo) -> str:
    if config.dtype:
        return config.dtype
    name = base.config.get("torch_dtype") or base.config.get("dtype")
    if name in NAME_TO_ST:
        return name
    return _ST_TO_NAME.get(base.tensors["model.embed_tokens.weight"].dtype, "float32")


def _assign_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[Shard]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    if n == 1:
        return [Shard("model.safetensors", groups[0])]
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def build_plan(
    config: MoEConfig,
    models: dict[str, ModelInfo],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    layout: arch.Layout = "classic",
    warnings: list[str] | None = None,
) -> MergePlan:
    if layout not in arch.LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(arch.LAYOUTS)}, got {layout!r}.")
    if max_shard_bytes < 1:
        raise ConfigError("max_shard_bytes must be positive.")
    base = models[config.base_model]
    dtype = _out_dtype(config, base)
    st = NAME_TO_ST[dtype]
    L = int(base.config["num_hidden_layers"])
    H = int(base.config["hidden_size"])
    I = int(base.config["intermediate_size"])
    E = config.num_experts
    names = arch.MixtralNames(layout)
    experts = [models[e.source_model] for e in config.experts]

    def shared(name: str) -> OutTensor:
        src = base.tensors[name]
        return OutTensor(name, st, src.shape, (Piece(src),))

    def expert_piece(e: int, layer: int, part: str) -> Piece:
        return Piece(experts[e].tensors[arch.mlp_name(layer, part)], expert=e, is_residual=part == "down_proj")

    tensors: list[OutTensor] = [shared("model.embed_tokens.weight")]
    for layer in range(L):
        prefix = f"model.layers.{layer}."
        for name in sorted(n for n in base.tensors if n.startswith(prefix) and arch.SHARED_RE.match(n)):
            tensors.append(shared(name))
        tensors.append(OutTensor(names.gate(layer), st, (E, H), (Piece(None),), gate_layer=layer))
        if layout == "classic":
            for e in range(E):
                for part in arch.MLP_PARTS:
                    p = expert_piece(e, layer, part)
                    tensors.append(OutTensor(names.expert(layer, e, part), st, p.source.shape, (p,), expert=e))
        else:
            gate_up = tuple(expert_piece(e, layer, part) for e in range(E) for part in ("gate_proj", "up_proj"))
            tensors.append(OutTensor(names.fused(layer, "gate_up_proj"), st, (E, 2 * I, H), gate_up))
            down = tuple(expert_piece(e, layer, "down_proj") for e in range(E))
            tensors.append(OutTensor(names.fused(layer, "down_proj"), st, (E, H, I), down))
    tensors.append(shared("model.norm.weight"))
    if "lm_head.weight" in base.tensors and not base.config.get("tie_word_embeddings", False):
        tensors.append(shared("lm_head.weight"))

    total = sum(t.numel for t in tensors)
    expert_params = 3 * H * I * L
    active = total - (E - config.experts_per_token) * expert_params
    download = sum(m.weight_bytes for m in models.values() if m.ref.repo_id is not None and not _cached(m))
    out_config = arch.mixtral_config(base.config, num_experts=E, experts_per_token=config.experts_per_token, dtype=dtype)
    return MergePlan(
        config=config,
        models=models,
        out_config=out_config,
        layout=layout,
        dtype=dtype,
        tensors=tensors,
        shards=_assign_shards(tensors, max_shard_bytes),
        total_params=total,
        active_params=active,
        expert_params=expert_params,
        download_bytes=download,
        max_shard_bytes=max_shard_bytes,
        warnings=list(warnings or []),
    )


def _cached(info: ModelInfo) -> bool:
    return all(t.file.is_file() for t in info.tensors.values())


def free_disk_bytes(path: Path) -> int:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
