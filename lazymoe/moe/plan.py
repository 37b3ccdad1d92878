"""The merge plan: every output tensor, where its bytes come from, and which shard it lands in.

Built from configs and safetensors headers alone. It is what ``lazymoe plan`` prints, what the notebook
previews, what the checks run against, and what the writer executes byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from .._version import __version__
from ..config import MoEConfig
from ..errors import ConfigError
from ..io.fetch import ROUTER_STEP
from ..io.safetensors import NAME_TO_ST, ST_TO_NAME, TensorInfo, dtype_bytes
from ..io.sources import ModelInfo
from ..options import DEFAULT_MAX_SHARD_BYTES
from ..router.cost import fit_estimate
from ..router.modes import BY_NAME, FITTED_MODES, HIDDEN_MODES, WRITTEN_MODES
from . import arch
from ..io.outdir import DISK_MARGIN_BYTES
from .checks import choose_output



@dataclass(frozen=True)
class Piece:
    """A run of output bytes: one source tensor, optionally transformed (dtype, noise, residual scale)."""

    source: TensorInfo | None  # None for computed tensors (routers, zeros)
    model: str | None = None  # the model reference the bytes come from
    expert: int | None = None  # which expert's transform applies (num_experts: the shared expert)
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
    #: computed tensors: "gate" (router rows), "shared_gate" (the shared expert's gate row), "zeros"
    computed: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


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
    output: arch.Output
    output_reason: str  # why this output architecture: the family, a shared expert, or ``architecture:``
    dtype: str  # torch name, e.g. "bfloat16"
    tensors: list[OutTensor]
    shards: list[Shard]
    total_params: int
    active_params: int
    expert_params: int  # one expert's MLP parameters, all layers
    download_bytes: int
    max_shard_bytes: int
    low_disk: bool = False
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
    def family(self) -> str:
        """The input family (lazymoe.arch.FAMILIES) every model belongs to."""
        return arch.FAMILIES[self.base.model_type]

    @property
    def gate_rows(self) -> int:
        """Router rows per layer that gates.compute_gates returns: the experts', then the shared gate's."""
        return self.config.num_experts + (1 if self.output.shared_block else 0)

    @property
    def router_pass_bytes(self) -> int:
        """Memory (RAM, or GPU memory when there is a GPU) the router initialisation holds.

        ``hidden`` modes stream the base one layer at a time in bfloat16 (embeddings + one layer, plus one
        tensor as stored while it is cast when the base is not bfloat16). Fitted modes stream the MoE one
        layer at a time in float32 (embeddings + one layer + its experts' MLPs), but first load the whole base
        in the output dtype to write continuations, unless ``router_continuation_tokens`` is 0.
        ``tests/test_memory.py`` holds these figures against memory measured on a real pass.
        """
        mode = self.config.gate_mode
        if mode in WRITTEN_MODES:
            return int(self.router_fit["peak_bytes"])
        base = self.base.tensors
        embed = math.prod(base[arch.EMBED].shape)
        per_layer: dict[int, int] = {}
        for name, t in base.items():
            if (layer := arch.layer_of(name)) is not None:
                per_layer[layer] = per_layer.get(layer, 0) + t.numel
        layer = max(per_layer.values(), default=0)
        if mode in HIDDEN_MODES:
            cast = max((t.nbytes for n, t in base.items() if t.dtype != "BF16" and arch.layer_of(n) is not None),
                       default=0)
            return 2 * (embed + layer) + cast
        if mode in FITTED_MODES:
            streamed = 4 * (embed + layer + self.config.num_experts * self.expert_params // max(self.num_layers, 1))
            whole = 0
            if self.config.router_continuation_tokens != 0:
                whole = sum(t.numel for t in base.values()) * dtype_bytes(self.dtype)
            return max(streamed, whole)
        return 0

    @property
    def router_fit(self) -> dict[str, float] | None:
        """For the modes whose experts write calibration text: estimated fit seconds on a GPU and on a CPU,
        calibration tokens and peak bytes (``router.cost.fit_estimate``); None for the other modes."""
        return fit_estimate(self) if self.config.gate_mode in WRITTEN_MODES else None

    @property
    def peak_ram_bytes(self) -> int:
        """Streaming holds at most one tensor (plus its dtype-converted copy); the router pass its own share,
        at the same time when it overlaps the writer (``router_overlaps``)."""
        writer, router = 3 * max(t.nbytes for t in self.tensors), self.router_pass_bytes
        both = writer + router if self.router_overlaps else max(writer, router)
        return both + 600 * 1000**2  # + interpreter, torch, transformers

    @property
    def whole_models(self) -> frozenset[str]:
        """Models the router pass loads as whole transformers models: their weight files are downloaded whole.
        The others' tensors are fetched by ranges, only those the merge reads (``reads``)."""
        return _whole_models(self.config, self.models, self.low_disk)

    @property
    def fetch_window(self) -> int:
        """How far ahead of the writer ranged fetching runs, in bytes: one shard (at least 256 MiB)."""
        return max(self.max_shard_bytes, FETCH_WINDOW_MIN)

    @property
    def router_overlaps(self) -> bool:
        """Whether the router pass runs while the shards are written. It reads the base (or the MoE being
        built) layer by layer, as the writer does, and only the last shard holds what it computes (the
        routers), so every other shard is written, and uploaded, meanwhile. Modes whose router pass first loads
        a whole model (the base continuing the prompts, experts writing calibration text) run it before the
        writer instead: the whole model is downloaded before anything else."""
        return not self.whole_models

    def router_reads(self) -> list[tuple[str, str]]:
        """(model, tensor) the router pass reads, in reading order."""
        return _router_reads(self.config, self.models, self.num_layers, self.low_disk, self.tensors)

    def reads(self, *, skip_shards: frozenset[int] = frozenset(), router: bool = True
              ) -> list[tuple[str, str, int, int, bool]]:
        """Every (model, tensor, step, group, router) the merge reads, in fetch order. The writer's: step is the
        output tensor's index, group its shard's, router False. The router pass's (router True): when it
        overlaps the writer (``router_overlaps``), step and group are those of the first output tensor of the
        same layer, so each layer of the base arrives with the shards that write that layer and both passes
        keep pace on one stream of fetches; otherwise ``ROUTER_STEP``, before any output tensor.
        ``skip_shards`` (shard indexes) and ``router=False`` leave out what a resumed push needs no more."""
        writer, index = [], 0
        first_of_layer: dict[int | None, tuple[int, int]] = {}
        for s, shard in enumerate(self.shards):
            for t in shard.tensors:
                if t.computed is None:
                    first_of_layer.setdefault(arch.layer_of(t.name), (index, s))
                if s not in skip_shards:
                    writer.extend((p.model, p.source.name, index, s, False) for p in t.pieces if p.model is not None)
                index += 1
        reads = []
        for ref, name in (self.router_reads() if router else ()):
            step, group = (first_of_layer.get(arch.layer_of(name), (0, 0)) if self.router_overlaps
                           else (ROUTER_STEP, ROUTER_STEP))
            reads.append((ref, name, step, group, True))
        return sorted(reads + writer, key=lambda r: r[2])  # stable: a layer's router reads come first

    def fingerprint(self) -> str:
        """What the output's bytes depend on, hashed: lazymoe's version, the recipe (with its seed), each
        model's commit (a local folder: its weight files' sizes and times), and every shard's tensors and
        sources. A resumed push trusts what an interrupted one recorded only under the same fingerprint."""
        def source(info: ModelInfo):
            if info.commit is not None:
                return info.commit
            files = sorted({t.file for t in info.tensors.values()})
            return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]

        facts = {
            "lazymoe": __version__,
            "recipe": self.config.to_yaml(),
            "models": {ref: source(info) for ref, info in sorted(self.models.items())},
            "shards": [[s.filename, [[t.name, t.dtype, list(t.shape), t.computed,
                                      [[p.model, p.source and p.source.name] for p in t.pieces]]
                                     for t in s.tensors]] for s in self.shards],
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def peak_download_bytes(self) -> int:
        """Downloaded bytes on disk at the worst moment. Without low-disk mode, everything fetched stays
        (the range cache, or whole files in the Hugging Face cache); in low-disk mode each is deleted once
        written (see ``_released_peak``)."""
        return self._released_peak() if self.low_disk else self.download_bytes

    def _released_peak(self) -> int:
        """Downloaded bytes on disk at the worst moment when each download is deleted once written: the
        models read whole (in low-disk order the base plus the largest other one, else all of them), what the
        router pass reads of the base, and one fetch window of ranges."""
        whole = self.whole_models
        pending = {r: m.weight_bytes for r, m in self.models.items() if r in whole and m.ref.repo_id and not _cached(m)}
        base = pending.pop(self.config.base_model, 0)
        held = base + (max(pending.values(), default=0) if self.low_disk else sum(pending.values()))
        ranged = _read_bytes(self.models, self.router_reads(), whole) + min(self.fetch_window, self.download_bytes)
        return min(held + ranged, self.download_bytes)

    @property
    def disk_bytes(self) -> int:
        return self.output_bytes + self.peak_download_bytes + DISK_MARGIN_BYTES

    def streamed_disk_bytes(self) -> int:
        """Disk a merge needs that deletes each shard once uploaded, with at most ``STREAMED_SHARDS_ON_DISK`` on
        disk (its downloads are deleted once written too)."""
        biggest = max((s.nbytes for s in self.shards), default=0)
        return min(self.output_bytes, STREAMED_SHARDS_ON_DISK * biggest) + self._released_peak() + DISK_MARGIN_BYTES

    def last_use(self) -> dict[str, int]:
        """For each model, the index (in write order) of the last output tensor that reads it."""
        out: dict[str, int] = {}
        for i, t in enumerate(self.tensors):
            for p in t.pieces:
                if p.model is not None:
                    out[p.model] = i
        return out

    def summary(self) -> dict:
        return {
            "architecture": self.output.architecture,
            "output": self.output.name,
            "output_reason": self.output_reason,
            "shared_expert": self.config.shared_expert.source_model if self.config.shared_expert else None,
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
            "router_fit": self.router_fit,
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------- plan


def _out_dtype(config: MoEConfig, base: ModelInfo) -> str:
    if config.dtype:
        return config.dtype
    name = arch.config_dtype(base.config)
    if name in NAME_TO_ST:
        return name
    return ST_TO_NAME.get(base.tensors[arch.EMBED].dtype, "float32")


def _pack(sizes: list[int], cap: int) -> list[int]:
    """Where each group starts when ``sizes`` are packed in order, a group closed before it would exceed
    ``cap`` (a size above ``cap`` makes a group of its own)."""
    starts, size = [0], 0
    for i, n in enumerate(sizes):
        if i > starts[-1] and size + n > cap:
            starts.append(i)
            size = 0
        size += n
    return starts


def even_cuts(sizes: list[int], max_bytes: int) -> list[int]:
    """Where to cut ``sizes`` (kept in order) into as few groups as packing them at ``max_bytes`` makes, with
    the largest group as small as any such cut allows: the least cap that packs into that many groups
    (packing is monotone in the cap, so a binary search finds it). Returns each group's first index."""
    max_bytes = max(max_bytes, 1)
    count = len(_pack(sizes, max_bytes))
    lo, hi = 1, max_bytes
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_pack(sizes, mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return _pack(sizes, lo)


def _assign_shards(weights: list[OutTensor], routers: list[OutTensor], max_shard_bytes: int) -> list[Shard]:
    """Weights in write order, in as many shards as cutting them at ``max_shard_bytes`` makes, but cut where
    the largest shard is smallest (``even_cuts``): a streamed push can upload a shard only once all of it is
    written, so the upload waits longest for the largest; then the routers, in a small shard of their own
    (with the weights when everything fits in one shard). No shard but the last needs the router pass: each
    can be written and uploaded while it runs, and a resumed push can skip it whatever device computed the
    routers."""
    starts = even_cuts([t.nbytes for t in weights], max_shard_bytes)
    groups = [weights[a:b] for a, b in zip(starts, [*starts[1:], len(weights)])] or [[]]
    size = sum(t.nbytes for t in groups[-1])
    if routers:
        if len(groups) > 1 or size + sum(t.nbytes for t in routers) > max_shard_bytes:
            groups.append([])
        groups[-1].extend(routers)
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
    low_disk: bool = False,
    output: tuple[arch.Output, str] | None = None,
) -> MergePlan:
    """Every output tensor in write order.

    The default order is layer by layer, the routers last (in the last shard). ``low_disk`` writes the base's
    tensors first and then the experts grouped by source model, so each downloaded expert can be deleted as
    soon as it is written: a 4x7B merge then needs disk for the output plus the base's tensors and one shard
    of fetched ones.
    """
    if layout not in arch.LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(arch.LAYOUTS)}, got {layout!r}.")
    if low_disk and layout != "classic":
        raise ConfigError("low_disk needs the classic layout: the fused layout mixes every expert in one tensor.")
    if max_shard_bytes < 1:
        raise ConfigError("max_shard_bytes must be positive.")
    base = models[config.base_model]
    if output is None:
        output = choose_output(config, models)
    out_arch, out_reason = output
    dtype = _out_dtype(config, base)
    st = NAME_TO_ST[dtype]
    L = int(base.config["num_hidden_layers"])
    H = int(base.config["hidden_size"])
    I = int(base.config["intermediate_size"])
    E = config.num_experts
    names = arch.MoENames(out_arch, layout)
    family = arch.FAMILIES[base.model_type]
    shared_re = arch.SHARED_RE_BY_FAMILY[family]
    spec = config.shared_expert
    sources = [models[e.source_model] for e in config.experts] + ([models[spec.source_model]] if spec else [])
    refs = [e.source_model for e in config.experts] + ([spec.source_model] if spec else [])

    def shared(name: str, out_name: str | None = None) -> OutTensor:
        src = base.tensors[name]
        return OutTensor(out_name or name, st, src.shape, (Piece(src, config.base_model),))

    def expert_piece(e: int, layer: int, part: str) -> Piece:
        return Piece(sources[e].tensors[arch.mlp_name(layer, part)], refs[e], expert=e, is_residual=part == "down_proj")

    def expert_tensors(e: int, layer: int) -> list[OutTensor]:
        return [OutTensor(names.expert(layer, e, part), st, (p := expert_piece(e, layer, part)).source.shape, (p,),
                          expert=e) for part in arch.MLP_PARTS]

    def shared_block(layer: int) -> list[OutTensor]:
        """Qwen MoE's shared expert and its gate: the configured one, or a width-1 expert of zeros."""
        gate = OutTensor(names.shared_gate(layer), st, (1, H), (Piece(None),), gate_layer=layer, computed="shared_gate")
        if spec is None:
            w = arch.EMPTY_SHARED_WIDTH
            shapes = {"gate_proj": (w, H), "up_proj": (w, H), "down_proj": (H, w)}
            return [OutTensor(names.shared(layer, part), st, shapes[part], (Piece(None),), computed="zeros")
                    for part in arch.MLP_PARTS] + [gate]
        return [OutTensor(names.shared(layer, part), st, (p := expert_piece(E, layer, part)).source.shape, (p,),
                          expert=E) for part in arch.MLP_PARTS] + [gate]

    def zero_biases(layer: int) -> list[OutTensor]:
        """Qwen2-MoE always has q/k/v biases; a base without them gets zeros (the same attention)."""
        if family == "qwen2" or not out_arch.qkv_bias:
            return []
        head_dim = int(base.config.get("head_dim") or H // int(base.config["num_attention_heads"]))
        kv = int(base.config.get("num_key_value_heads") or base.config["num_attention_heads"])
        widths = {"q": int(base.config["num_attention_heads"]) * head_dim, "k": kv * head_dim, "v": kv * head_dim}
        return [OutTensor(f"{arch.layer_prefix(layer)}self_attn.{x}_proj.bias", st, (n,), (Piece(None),),
                          computed="zeros") for x, n in widths.items()]

    tensors: list[OutTensor] = [shared(arch.EMBED)]
    for layer in range(L):
        prefix = arch.layer_prefix(layer)
        for name in sorted(n for n in base.tensors if n.startswith(prefix) and shared_re.match(n)):
            tensors.append(shared(name))
        tensors.extend(zero_biases(layer))
        tensors.append(OutTensor(names.gate(layer), st, (E, H), (Piece(None),), gate_layer=layer, computed="gate"))
        if out_arch.shared_block and not low_disk:
            tensors.extend(shared_block(layer))
        if layout == "classic" and not low_disk:
            for e in range(E):
                tensors.extend(expert_tensors(e, layer))
        elif layout == "fused":
            gate_up = tuple(expert_piece(e, layer, part) for e in range(E) for part in ("gate_proj", "up_proj"))
            tensors.append(OutTensor(names.fused(layer, "gate_up_proj"), st, (E, 2 * I, H), gate_up))
            down = tuple(expert_piece(e, layer, "down_proj") for e in range(E))
            tensors.append(OutTensor(names.fused(layer, "down_proj"), st, (E, H, I), down))
    tensors.append(shared(arch.FINAL_NORM))
    tied = bool(base.config.get("tie_word_embeddings", False))
    if arch.LM_HEAD in base.tensors and not tied:
        tensors.append(shared(arch.LM_HEAD))
    elif out_arch.untie:  # the tie written out: llama.cpp's qwen2moe requires output.weight
        tensors.append(shared(arch.LM_HEAD if arch.LM_HEAD in base.tensors else arch.EMBED, arch.LM_HEAD))
    if low_disk:  # base first (its model is needed longest), then one source model after another
        order = sorted(range(len(refs)), key=lambda e: (refs[e] != config.base_model, config.model_refs().index(refs[e])))
        for e in order:
            for layer in range(L):
                if e == E:
                    tensors.extend(shared_block(layer))
                else:
                    tensors.extend(expert_tensors(e, layer))
        if out_arch.shared_block and spec is None:
            for layer in range(L):
                tensors.extend(shared_block(layer))

    # what the router pass computes goes last (see _assign_shards); the rest keeps its order
    routers = [t for t in tensors if t.gate_layer is not None]
    weights = [t for t in tensors if t.gate_layer is None]
    tensors = weights + routers
    total = sum(t.numel for t in tensors)
    expert_params = arch.expert_params(H, I, L)
    active = total - (E - config.experts_per_token) * expert_params
    whole = _whole_models(config, models, low_disk)
    router = _router_reads(config, models, L, low_disk, tensors)
    writes = [(p.model, p.source.name) for t in tensors for p in t.pieces if p.model is not None]
    download = sum(m.weight_bytes for r, m in models.items() if r in whole and m.ref.repo_id and not _cached(m))
    download += _read_bytes(models, router + writes, whole)
    shared_width = (I if spec else arch.EMPTY_SHARED_WIDTH) if out_arch.shared_block else None
    out_config = arch.moe_config(out_arch, base.config, num_experts=E, experts_per_token=config.experts_per_token,
                                 dtype=dtype, shared_width=shared_width)
    return MergePlan(
        config=config,
        models=models,
        out_config=out_config,
        layout=layout,
        output=out_arch,
        output_reason=out_reason,
        dtype=dtype,
        tensors=tensors,
        shards=_assign_shards(weights, routers, max_shard_bytes),
        total_params=total,
        active_params=active,
        expert_params=expert_params,
        download_bytes=download,
        max_shard_bytes=max_shard_bytes,
        low_disk=low_disk,
        warnings=list(warnings or []),
    )


def _cached(info: ModelInfo) -> bool:
    return all(t.file.is_file() for t in info.tensors.values())


FETCH_WINDOW_MIN = 256 << 20
#: a merge that deletes each shard once uploaded keeps at most this many on disk: one being written, one
#: waiting, one uploading (``publish.hub.StreamingPush``'s two in flight plus the writer's)
STREAMED_SHARDS_ON_DISK = 3


def _whole_models(config: MoEConfig, models: dict[str, ModelInfo], low_disk: bool) -> frozenset[str]:
    mode = config.gate_mode
    if mode in WRITTEN_MODES and not low_disk:  # every expert writes text: each runs as a whole model
        return frozenset(models)
    if mode in FITTED_MODES + WRITTEN_MODES and config.router_continuation_tokens != 0:
        return frozenset({config.base_model})  # the base continues the prompts as a whole model
    return frozenset()


def _router_reads(config: MoEConfig, models: dict[str, ModelInfo], num_layers: int, low_disk: bool,
                  tensors: list[OutTensor]) -> list[tuple[str, str]]:
    """What ``router.gates.compute_gates`` reads, by gate mode group (see its branches)."""
    group = BY_NAME[config.gate_mode].group
    base_ref = config.base_model
    base = models[base_ref]
    if group == "random":
        return []
    if group == "embedding":
        return [(base_ref, arch.EMBED)]
    # hidden: the residual stream entering each layer (layers 0..L-2 run); fitted: every layer's MLP input
    layers = num_layers - 1 if group == "hidden" else num_layers
    prefixes = tuple(arch.layer_prefix(i) for i in range(layers))
    out = [(base_ref, arch.EMBED)] + [(base_ref, n) for n in base.tensors
                                      if n.startswith(prefixes) and not arch.IGNORED_RE.match(n)]
    if group != "hidden" and not low_disk:  # the MoE's own MLP outputs feed the next layer's router
        out += [(p.model, p.source.name) for t in tensors for p in t.pieces if p.expert is not None]
    return out


def _read_bytes(models: dict[str, ModelInfo], reads: list[tuple[str, str]], whole: frozenset[str]) -> int:
    """Bytes of the distinct tensors in ``reads`` that must come from the Hub by ranges."""
    seen = {(r, n) for r, n in reads if r not in whole and models[r].ref.repo_id is not None}
    return sum(models[r].tensors[n].nbytes for r, n in seen if not models[r].tensors[n].file.is_file())
