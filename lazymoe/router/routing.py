"""The routing picture: which experts a merged MoE picks, layer by layer, for each expert's prompts.

``routing_report(model_dir)`` runs every expert's positive prompts (read from the recipe saved next to
the model, or given) and any extra text through the merged model and counts, per layer, how often each
expert is chosen; ``plot.plot_routing(report, path)`` draws it as heatmaps.
The report also says when routing is degenerate: one expert takes almost every token, an expert is never
used, an expert's own prompts mostly go elsewhere, or a layer's gate rows are nearly parallel.

The model is run **one layer at a time** straight from its safetensors files: only one layer's weights
are ever in memory, so a 4x7B MoE (48 GB) is pictured on a free Colab as easily as a test model. The
attention half of each layer is transformers' own (``streamed.LayerStack``); the sparse block is
``block.moe_mlp``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, ModelNotFoundError, Setting, Text
from ..io.folder import load_folder_tokenizer, read_folder_config, read_folder_recipe
from ..io.safetensors import TensorInfo, read_tensor
from ..io.sources import ModelRef, describe
from ..lazy import no_grad, torch
from ..moe import arch
from .block import SINGULAR_CONDITION, gate_condition, moe_mlp, shared_mlp
from .device import pick_device
from .prompts import router_token_ids
from .streamed import LayerStack

logger = logging.getLogger(__name__)

DOMINANT_SHARE = 0.9  # one expert chosen first for this share of tokens: the others are wasted


@dataclass
class RoutingReport:
    """Shares of tokens routed to each expert. Arrays are (groups, layers, experts)."""

    model_dir: Path
    experts: list[str]  # column labels
    groups: list[str]  # one per prompt set: each expert's prompts, then each extra text
    expected: list[int | None]  # the expert a group's tokens should go to (None: user text)
    chosen: np.ndarray  # share of the group's tokens whose top-k includes the expert
    top1: np.ndarray  # share of the group's tokens whose first choice is the expert
    tokens: list[int]
    experts_per_token: int
    gate_condition: list[float]  # per layer, condition number of the unit-length gate rows
    warnings: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return self.chosen.shape[1]

    def accuracy(self, *, top_k: bool = False) -> float | None:
        """Share of the experts' own prompt tokens routed to their expert, over all layers (None without prompts)."""
        table = self.chosen if top_k else self.top1
        rows = [(table[g, :, e].mean(), self.tokens[g]) for g, e in enumerate(self.expected) if e is not None]
        total = sum(n for _, n in rows)
        return float(sum(a * n for a, n in rows) / total) if total else None

    def summary(self) -> str:
        lines = [f"Routing of {self.model_dir.name}: share of each group's tokens whose first choice is the expert "
                 f"(mean over {self.num_layers} layers; routing.png shows the top-{self.experts_per_token} share)"]
        width = max(len(g) for g in self.groups)
        lines.append(" " * width + "  " + "  ".join(f"{e[:10]:>10}" for e in self.experts))
        for g, name in enumerate(self.groups):
            cells = "  ".join(f"{100 * self.top1[g, :, e].mean():9.0f}%" for e in range(len(self.experts)))
            lines.append(f"{name:<{width}}  {cells}")
        acc = self.accuracy()
        if acc is not None:
            lines.append(f"prompt tokens routed first to their own expert: {100 * acc:.0f}% "
                         f"(chance {100 / len(self.experts):.0f}%)")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ the layer-wise forward


class _Weights:
    """Tensors of a merged folder by name, read one at a time (any output architecture, classic or fused)."""

    def __init__(self, folder: Path, device: torch.device, output: arch.Output | None):
        """``output`` None: a dense folder (base or expert), read by tensor name only."""
        # describe() follows the index and names a missing or unreadable shard
        self.tensors: dict[str, TensorInfo] = describe(ModelRef.parse(str(folder))).tensors
        self.device = device
        layout = arch.layout_of(self.tensors) or "classic"
        self.names = arch.MoENames(output, layout) if output is not None else None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise ModelNotFoundError(f"The model has no tensor {name}; is it a MoE written by lazymoe?")
        return read_tensor(self.tensors[name]).to(self.device, torch.float32)

    def experts(self, layer: int, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(gate_proj, up_proj, down_proj) per expert."""
        if self.names.layout == "classic":
            return [tuple(self.get(self.names.expert(layer, e, part)) for part in arch.MLP_PARTS)
                    for e in range(num_experts)]
        gate_up = self.get(self.names.fused(layer, "gate_up_proj"))
        down = self.get(self.names.fused(layer, "down_proj"))
        half = gate_up.shape[1] // 2
        return [(gate_up[e, :half], gate_up[e, half:], down[e]) for e in range(num_experts)]

    def gate(self, layer: int) -> torch.Tensor:
        return self.get(self.names.gate(layer))

    def shared(self, layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The shared expert's gate row and (gate_proj, up_proj, down_proj)."""
        parts = tuple(self.get(self.names.shared(layer, part)) for part in arch.MLP_PARTS)
        return self.get(self.names.shared_gate(layer))[0], parts


@no_grad
def stream_router_logits(model_dir: str | os.PathLike, seqs: list[list[int]], *, device: str | None = None,
                         progress: bool = False) -> list[torch.Tensor]:
    """Run token sequences through a merged Mixtral folder one layer at a time.

    Returns, per layer, the router logits (batch, tokens, experts) in float32 (right padding: the rows of
    padded positions are meaningless and must be masked by the caller).
    """
    folder = Path(model_dir)
    dev = pick_device(device)
    output = _output(folder)
    w = _Weights(folder, dev, output)
    stack = LayerStack(folder, seqs, w.get(arch.EMBED), dev)
    E, k = int(stack.cfg[output.experts_key]), int(stack.cfg["num_experts_per_tok"])
    out = []
    for layer in tqdm(range(int(stack.cfg["num_hidden_layers"])), desc="Routing: layers", disable=not progress):
        x = stack.mlp_input(layer, w.get)
        logits = x @ w.gate(layer).T  # (B, T, E)
        out.append(logits.cpu())
        y = moe_mlp(x, logits, w.experts(layer, E), k, stack.act, normalise=bool(stack.cfg.get("norm_topk_prob", True)))
        if output.shared_block:
            y = y + shared_mlp(x, *w.shared(layer), stack.act)
        stack.add_mlp_output(y)
    return out


def _output(folder: Path) -> arch.Output:
    """The output architecture of a merged folder, from its config.json."""
    cfg = read_folder_config(folder)
    try:
        return arch.output_of(cfg)
    except StopIteration:
        raise ConfigError(f"{folder} is a '{cfg.get('model_type')}' model, not a MoE lazymoe writes "
                          f"({', '.join(o.name for o in arch.OUTPUTS.values())}).") from None


# ------------------------------------------------------------------------------------------ the report


def _recipe(folder: Path) -> dict | None:
    return read_folder_recipe(folder)


def expert_labels(sources: Sequence[str]) -> list[str]:
    """Short, unique column labels from expert source models (the folder or repo name)."""
    names = [Path(str(s).rstrip("/").split("@")[0]).name or str(s) for s in sources]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]

def _layer_ranges(layers: list[int]) -> str:
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(spans)


def routing_warnings(report: RoutingReport) -> list[str]:
    """Plain-language warnings for degenerate routing."""
    out = []
    weights = np.array(report.tokens, dtype=float)[:, None, None]
    pooled_top1 = (report.top1 * weights).sum(0) / max(weights.sum(), 1)  # (L, E)
    pooled_chosen = (report.chosen * weights).sum(0) / max(weights.sum(), 1)
    E = len(report.experts)
    for e, name in enumerate(report.experts):
        hot = [layer for layer in range(report.num_layers) if pooled_top1[layer, e] >= DOMINANT_SHARE]
        if hot and E > 1:
            share = 100 * pooled_top1[hot, e].mean()
            out.append(f"expert '{name}' is the first choice for {share:.0f}% of tokens in layer(s) "
                       f"{_layer_ranges(hot)}: the other experts barely run there (routing collapse).")
        if report.experts_per_token < E and float(pooled_chosen[:, e].max()) == 0.0:
            out.append(f"expert '{name}' is never chosen for these texts in any layer.")
    for g, e in enumerate(report.expected):
        if e is None or report.tokens[g] == 0:
            continue
        acc = float(report.top1[g, :, e].mean())
        if acc <= 1.0 / E:
            out.append(f"the prompts of '{report.experts[e]}' go to it first for only {100 * acc:.0f}% of tokens "
                       f"(chance is {100 / E:.0f}%): its prompts may not describe it, or the gate mode misses it.")
    bad = [layer for layer, c in enumerate(report.gate_condition) if c > SINGULAR_CONDITION]
    if bad:
        worst = max(report.gate_condition[layer] for layer in bad)
        out.append(f"the gate matrix is nearly singular in layer(s) {_layer_ranges(bad)} (condition number up to "
                   f"{worst:.0f}): some experts' router rows point the same way, so they split traffic arbitrarily.")
    return out


def routing_report(
    model_dir: str | os.PathLike,
    prompts_by_expert: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None = None,
    extra_texts: Sequence[str] = (),
    *,
    chat_template: bool | None = None,
    device: str | None = None,
    progress: bool = False,
) -> RoutingReport:
    """Route each expert's prompts (default: the positives in the saved recipe) and ``extra_texts``.

    ``prompts_by_expert`` is one list of prompts per expert, in expert order, or a mapping whose keys are
    expert labels (as in ``report.experts``) or indices. Tokens are counted like the fitted gate modes see
    them: every real token after the leading BOS.
    """
    folder = Path(model_dir)
    cfg = read_folder_config(folder)
    E = int(cfg.get(_output(folder).experts_key, 0))
    if E < 1:
        raise ConfigError(f"{folder} is not a MoE (config.json has no expert count).")
    recipe = _recipe(folder) or {}
    experts = expert_labels([e["source_model"] for e in recipe.get("experts", [])]) or [f"expert {e}" for e in range(E)]
    if len(experts) != E:
        experts = [f"expert {e}" for e in range(E)]
    if prompts_by_expert is None:
        prompts = [list(e.get("positive_prompts") or []) for e in recipe.get("experts", [])] or [[] for _ in range(E)]
    elif isinstance(prompts_by_expert, Mapping):
        prompts = [[] for _ in range(E)]
        for key, values in prompts_by_expert.items():
            idx = key if isinstance(key, int) else experts.index(key) if key in experts else None
            if idx is None or not 0 <= idx < E:
                raise ConfigError(f"prompts_by_expert has key {key!r}; use an expert index or one of {experts}.")
            prompts[idx] = list(values)
    else:
        prompts = [list(p) for p in prompts_by_expert]
        if len(prompts) != E:
            raise ConfigError(f"prompts_by_expert has {len(prompts)} lists but the model has {E} experts.")
    if chat_template is None:
        chat_template = bool(recipe.get("router_chat_template"))

    tokenizer = load_folder_tokenizer(folder)
    groups: list[tuple[str, int | None, list[str]]] = [(experts[e], e, prompts[e]) for e in range(E) if prompts[e]]
    for i, text in enumerate(extra_texts):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"Text {i + 1} to route is {'blank' if isinstance(text, str) else repr(text)}: give "
                              "some text (a sentence of the kind an expert should take).")
        snippet = " ".join(text.split())
        groups.append((f"text {i + 1}: {snippet[:24]}{'…' if len(snippet) > 24 else ''}", None, [text]))
    if not groups:
        text = Setting("text", ..., python="pass prompts_by_expert or extra_texts")  # the CLI: add --text TEXT
        raise ConfigError(Text("Nothing to route: the recipe has no prompts. To see how text routes, {text}.", (text,)))
    seqs, owner = [], []
    for g, (_, _, texts) in enumerate(groups):
        for text in texts:
            seqs.append(router_token_ids(tokenizer, text, chat_template=chat_template))
            owner.append(g)
    logits = stream_router_logits(folder, seqs, device=device, progress=progress)
    lengths = torch.tensor([len(s) for s in seqs])
    T = logits[0].shape[1]
    real = torch.arange(T)[None, :] < lengths[:, None]
    if tokenizer.bos_token_id is not None:
        real[:, 0] &= torch.tensor([s[0] != tokenizer.bos_token_id for s in seqs])
    k = int(cfg["num_experts_per_tok"])
    G, L = len(groups), len(logits)
    chosen, top1 = np.zeros((G, L, E)), np.zeros((G, L, E))
    tokens = [0] * G
    owner_t = torch.tensor(owner)
    for g in range(G):
        sel = real & (owner_t == g)[:, None]
        tokens[g] = int(sel.sum())
        for layer, z in enumerate(logits):
            zz = z[sel]
            if zz.shape[0] == 0:
                continue
            top = zz.topk(k, dim=-1).indices
            chosen[g, layer] = torch.nn.functional.one_hot(top, E).sum(1).float().mean(0).numpy()
            top1[g, layer] = torch.nn.functional.one_hot(top[:, 0], E).float().mean(0).numpy()
    weights = _Weights(folder, torch.device("cpu"), _output(folder))
    condition = [gate_condition(weights.gate(layer)) for layer in range(L)]
    report = RoutingReport(folder, experts, [g[0] for g in groups], [g[1] for g in groups], chosen, top1, tokens,
                           k, condition)
    report.warnings = routing_warnings(report)  # shown by the caller (summary(), the CLI, the notebook)
    return report
