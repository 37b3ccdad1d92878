"""The routing picture: which experts a merged MoE picks, layer by layer, for each expert's prompts.

``routing_report(model_dir)`` runs every expert's positive prompts (read from the recipe saved next to
the model, or given) and any extra text through the merged model and counts, per layer, how often each
expert is chosen; ``plot_routing(report, path)`` draws it as heatmaps (PNG, matplotlib's Agg backend).
The report also says when routing is degenerate: one expert takes almost every token, an expert is never
used, an expert's own prompts mostly go elsewhere, or a layer's gate rows are nearly parallel.

The model is run **one layer at a time** straight from its safetensors files: only one layer's weights
are ever in memory, so a 4x7B MoE (48 GB) is pictured on a free Colab as easily as a test model. The
attention half of each layer is transformers' own (``streamed.LayerStack``); the sparse block is written
out here (top-k experts as in Mixtral) and a test checks the router logits against transformers' Mixtral.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import arch
from .config import CONFIG_FILENAME
from .errors import ConfigError, ModelNotFoundError
from .optional import require
from .safetensors_io import TensorInfo, read_tensor
from .sources import ModelRef, describe
from .streamed import LayerStack

logger = logging.getLogger(__name__)

DOMINANT_SHARE = 0.9  # one expert chosen first for this share of tokens: the others are wasted
SINGULAR_CONDITION = 5.0  # gate_condition above this: some experts are hard to tell apart (mergekit warns at 5 too)


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
        fused = any(name.endswith(".mlp.experts.gate_up_proj") for name in self.tensors)
        self.names = arch.MoENames(output, "fused" if fused else "classic") if output is not None else None

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


def shared_mlp(x: torch.Tensor, gate: torch.Tensor, expert, act) -> torch.Tensor:
    """Qwen2-MoE's shared expert: its MLP times sigmoid(gate . x)."""
    gate_proj, up_proj, down_proj = expert
    return torch.sigmoid(x @ gate)[..., None] * ((act(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T)


def moe_mlp(x: torch.Tensor, logits: torch.Tensor, experts, k: int, act, *, normalise: bool = True) -> torch.Tensor:
    """The sparse block: softmax over all experts, keep the top k, renormalise them (Mixtral, Qwen3-MoE) or not
    (Qwen2-MoE as lazymoe writes it), mix their MLPs."""
    weights, chosen = logits.softmax(-1).topk(k, dim=-1)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    flat, out = x.reshape(-1, x.shape[-1]), torch.zeros(x.numel() // x.shape[-1], x.shape[-1], device=x.device)
    share = weights.reshape(-1, k)
    picked = chosen.reshape(-1, k)
    for e, (gate_proj, up_proj, down_proj) in enumerate(experts):
        rows = (picked == e).any(-1).nonzero().squeeze(1)  # only the tokens that chose e run it
        if rows.numel():
            xe = flat[rows]
            w = (share[rows] * (picked[rows] == e)).sum(-1, keepdim=True)
            out.index_add_(0, rows, w * ((act(xe @ gate_proj.T) * (xe @ up_proj.T)) @ down_proj.T))
    return out.view_as(x)


@torch.no_grad()
def stream_router_logits(model_dir: str | os.PathLike, seqs: list[list[int]], *, device: str | None = None,
                         progress: bool = False) -> list[torch.Tensor]:
    """Run token sequences through a merged Mixtral folder one layer at a time.

    Returns, per layer, the router logits (batch, tokens, experts) in float32 (right padding: the rows of
    padded positions are meaningless and must be masked by the caller).
    """
    from tqdm.auto import tqdm

    from .gates import pick_device

    folder = Path(model_dir)
    dev = pick_device(device)
    output = _output(folder)
    w = _Weights(folder, dev, output)
    stack = LayerStack(folder, seqs, w.get("model.embed_tokens.weight"), dev)
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
    cfg = json.loads((folder / "config.json").read_text())
    try:
        return arch.output_of(cfg)
    except StopIteration:
        raise ConfigError(f"{folder} is a '{cfg.get('model_type')}' model, not a MoE lazymoe writes "
                          f"({', '.join(o.name for o in arch.OUTPUTS.values())}).") from None


# ------------------------------------------------------------------------------------------ the report


def _recipe(folder: Path) -> dict | None:
    path = folder / CONFIG_FILENAME
    if not path.is_file():
        return None
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def expert_labels(sources: Sequence[str]) -> list[str]:
    """Short, unique column labels from expert source models (the folder or repo name)."""
    names = [Path(str(s).rstrip("/").split("@")[0]).name or str(s) for s in sources]
    return [f"{n} #{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def gate_condition(gate: torch.Tensor) -> float:
    """How close a layer's router is to being unable to tell some experts apart (about 1 = fully distinct).

    A softmax router ignores whatever all rows share (adding a vector to every row adds the same number to
    every logit), so the rows are scaled to unit length and centred, and the result is 1 / the smallest of
    the E - 1 singular values that remain: 1 for orthonormal rows, 0.87 for four rows summing to zero,
    large when two rows nearly coincide or when one shared direction dominates every row (then the logits
    differ by little). mergekit-moe's warning takes the condition number of the raw rows instead, which
    flags every well-fitted router whose rows sum to zero.
    """
    rows = gate.double() / gate.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    E = rows.shape[0]
    if E < 2:
        return 1.0
    smallest = float(torch.linalg.svdvals(rows - rows.mean(0))[E - 2])
    return float("inf") if smallest <= 1e-12 else 1.0 / smallest


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
    from transformers import AutoTokenizer

    from .gates import router_token_ids

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; pass the folder a merge wrote.")
    cfg = json.loads((folder / "config.json").read_text())
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

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    groups: list[tuple[str, int | None, list[str]]] = [(experts[e], e, prompts[e]) for e in range(E) if prompts[e]]
    for i, text in enumerate(extra_texts):
        snippet = " ".join(text.split())
        groups.append((f"text {i + 1}: {snippet[:24]}{'…' if len(snippet) > 24 else ''}", None, [text]))
    if not groups:
        raise ConfigError("Nothing to route: the recipe has no prompts; pass prompts_by_expert or extra_texts.")
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


def plot_routing(report: RoutingReport, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw one heatmap per prompt group (layers x experts, share of tokens choosing each expert) as a PNG."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    G, L, E = report.chosen.shape
    cols = min(G, 4)
    rows = math.ceil(G / cols)
    cell = 0.42
    fig = Figure(figsize=(max(3.0, cols * (1.2 + E * cell * 1.3)), rows * (1.4 + min(L, 40) * cell * 0.75) + 0.6),
                 dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    annotate = L * E <= 160
    for g in range(rows * cols):
        ax = axes[g // cols][g % cols]
        if g >= G:
            ax.axis("off")
            continue
        data = report.chosen[g]
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"{report.groups[g]}\n({report.tokens[g]} tokens)", fontsize=8)
        ax.set_xticks(range(E), [e[:12] for e in report.experts], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(0, L, max(1, L // 16)))
        ax.tick_params(axis="y", labelsize=7)
        if g % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
        expected = report.expected[g]
        if expected is not None:  # frame the column these tokens should land in
            ax.add_patch(Rectangle((expected - 0.5, -0.5), 1, L, fill=False, edgecolor="red", linewidth=1.5))
        if annotate:
            for layer in range(L):
                for e in range(E):
                    v = data[layer, e]
                    ax.text(e, layer, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"share of tokens routed there (top-{report.experts_per_token})")
    acc = report.accuracy()
    subtitle = f" — own-expert first choice {100 * acc:.0f}%" if acc is not None else ""
    fig.suptitle(title or f"Expert choice per layer: {report.model_dir.name}{subtitle}", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def write_routing_picture(
    model_dir: str | os.PathLike,
    extra_texts: Sequence[str] = (),
    *,
    device: str | None = None,
    progress: bool = True,
    update_card: bool = True,
) -> RoutingReport:
    """Route the recipe's prompts (and ``extra_texts``) through a merged folder, draw ``routing.png`` into it
    and, with ``update_card``, re-render its card so the picture is embedded. Returns the report."""
    from .card import ROUTING_IMAGE, detected_extras, rerender_card

    require("matplotlib")  # before minutes of routing, not after
    folder = Path(model_dir)
    report = routing_report(folder, extra_texts=extra_texts, device=device, progress=progress)
    plot_routing(report, folder / ROUTING_IMAGE)
    if update_card:
        rerender_card(folder, **detected_extras(folder))
    return report


def add_route_parser(subparsers) -> None:
    """Register ``lazymoe route MODEL_DIR``."""
    p = subparsers.add_parser(
        "route", help="draw which experts each layer picks for the recipe's prompts (routing.png + card)",
        description="Runs each expert's positive prompts (and any --text) through the merged model one layer at "
                    "a time, writes MODEL_DIR/routing.png, prints per-expert routing and warns when routing is "
                    "degenerate. The model card is re-rendered to embed the picture.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--text", action="append", default=[], help="extra text to route (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-card", action="store_true", help="leave README.md as it is")
    p.set_defaults(func=run_route)


def run_route(args) -> int:
    report = write_routing_picture(args.model_dir, args.text, device=args.device,
                                   progress=not getattr(args, "quiet", False), update_card=not args.no_card)
    print(report.summary())  # ends with the warnings, if any
    print(f"Routing picture: {Path(args.model_dir) / 'routing.png'}")
    return 0

