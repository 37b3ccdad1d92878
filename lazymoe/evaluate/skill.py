"""Did the MoE keep its experts' skills? ``evaluate(model_dir)`` and ``lazymoe eval MODEL_DIR``.

For each expert, on texts of that expert's kind, it measures the loss of the base, of the expert and of
the MoE, the share of the expert's gain the MoE keeps, and how often those texts' tokens are routed to the
expert, per layer (see ``eval_report`` for the definitions). It writes ``eval.json`` and ``eval.png`` into
the model folder and re-renders the card, which then shows the table and the plot.

Texts per expert, in this order: ``eval_texts`` in the config (a list, a ``.txt`` file of blank-line
separated texts, a ``.jsonl`` file with a ``text`` field, or a Hub dataset read with ``datasets``); else
text the expert itself writes from its positive prompts (sampled, seeded), of which only the expert's own
words are scored: the prompts fitted the routers, so they never count.

Every model runs **one decoder layer at a time** from its safetensors files (``streamed.LayerStack``, as the
routing picture does): a 4x7B MoE and its 7B sources are measured in the memory of one MoE layer, on a free
Colab GPU or a CPU. The loss is computed from the final logits, so Mixtral's router auxiliary loss never
enters it. Writing texts (only when none are given) loads the expert whole, in 4-bit if that is all that fits,
as the notebook's "Try it" step does, or is skipped with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm

from ..config import ExpertConfig, HubTexts, MoEConfig, load_config
from ..errors import ConfigError, LazyMoEError, ModelNotFoundError, Setting, Text
from ..io.folder import CONFIG_FILENAME, load_folder_tokenizer, read_folder_config, require_lazymoe_output
from ..io.sources import METADATA_PATTERNS, ModelRef
from ..io.texts import read_text_file
from ..moe import arch
from ..runtime.machine import probe
from ..runtime.load import choose_loading, free_memory, load_merged, stored_dtype
from ..options import DEFAULT_EVAL_GENERATE_TOKENS, DEFAULT_EVAL_MAX_TEXTS, DEFAULT_EVAL_MAX_TOKENS, check_count
from ..publish.card import detected_extras, rerender_card
from ..publish.eval_report import EVAL_IMAGE, EvalReport, ExpertEval, plot_eval
from ..router.block import moe_mlp, shared_mlp
from ..router.device import pick_device
from ..router.prompts import PromptSet, continue_prompts, router_token_ids
from ..router.routing import _Weights, expert_labels
from ..router.streamed import LayerStack

logger = logging.getLogger(__name__)

DEFAULT_MAX_TEXTS = DEFAULT_EVAL_MAX_TEXTS  # per expert
DEFAULT_MAX_TOKENS = DEFAULT_EVAL_MAX_TOKENS  # per text, BOS included
DEFAULT_GENERATE_TOKENS = DEFAULT_EVAL_GENERATE_TOKENS  # per positive prompt, when the expert writes its own
#: tokens (batch x width) run through a layer at once; more texts are run in several passes over the weights
MAX_BATCH_TOKENS = 16384


# ------------------------------------------------------------------------------------------ texts


@dataclass
class Texts:
    """One expert's evaluation texts as token ids, with the first position whose next token is scored."""

    kind: str  # a key of eval_report.TEXT_KINDS
    detail: str
    seqs: list[list[int]]
    starts: list[int]  # scored predictions: positions start .. len-2 (the token after each)


def read_hub_texts(spec: HubTexts) -> list[str]:
    """Texts from a Hub dataset; ``LazyMoEError`` (the caller skips and says why) when that cannot be done."""
    try:
        import datasets
    except ImportError:
        raise LazyMoEError(f"eval_texts names the Hub dataset {spec.dataset}, but the 'datasets' package is not "
                           "installed (pip install datasets)") from None
    try:
        data = datasets.load_dataset(spec.dataset, spec.name, split=spec.split, streaming=True)
        rows = []
        for row in data:
            if spec.column not in row:
                raise LazyMoEError(f"dataset {spec.dataset} has no column {spec.column!r} (it has {', '.join(row)})")
            if isinstance(row[spec.column], str) and row[spec.column].strip():
                rows.append(row[spec.column])
            if len(rows) >= spec.limit:
                break
    except LazyMoEError:
        raise
    except Exception as err:  # datasets raises many types (offline, missing split, gated...)
        raise LazyMoEError(f"the Hub dataset {spec.dataset} could not be read ({type(err).__name__}: {err})") from None
    if not rows:
        raise LazyMoEError(f"the Hub dataset {spec.dataset} ({spec.split}) has no text in column {spec.column!r}")
    return rows


def given_texts(value, folder: Path) -> tuple[str, str, list[str]]:
    """(kind, detail, texts) of an ``eval_texts`` value: a list, a file path, or a :class:`HubTexts`."""
    if isinstance(value, HubTexts):
        return "dataset", f"{value.dataset}, split {value.split}", read_hub_texts(value)
    if isinstance(value, dict):
        return given_texts(HubTexts.model_validate(value), folder)
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute() and not path.exists() and (folder / path).exists():
            path = folder / path  # a path written relative to the model folder
        return "file", path.name, read_text_file(path)
    return "config", "", list(value)


def _tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    seqs = [list(tokenizer(t)["input_ids"])[:max_tokens] for t in texts]
    return [s for s in seqs if len(s) >= 3]  # at least two scored predictions after the first token


def write_own_texts(expert_dir: Path, tokenizer, prompts: Sequence[str], *, new_tokens: int, seed: int,
                    vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """The expert continues each prompt (sampled, seeded); returns the ids and where its own words start."""
    size = sum(p.stat().st_size for p in expert_dir.glob("*.safetensors"))
    choice = choose_loading(size, probe(expert_dir), dtype=stored_dtype(expert_dir))
    if choice.device is None:
        raise LazyMoEError(f"it cannot write its own texts here: {choice.reason}")
    model, _ = load_merged(expert_dir, choice)
    try:
        seqs = [router_token_ids(tokenizer, p) for p in prompts]
        n = len(seqs)
        written = continue_prompts(model, tokenizer, PromptSet(seqs, torch.zeros(n, dtype=torch.long),
                                                               torch.ones(n, dtype=torch.bool), torch.arange(n)),
                                   new_tokens=new_tokens, seed=seed)
    finally:
        del model
        free_memory()
    out, starts = [], []
    for prompt, full in zip(seqs, written.seqs):
        own = full[len(prompt):]
        cut = next((i for i, t in enumerate(own) if t >= vocab_size), len(own))  # an expert's extra tokens
        if cut >= 2:
            out.append(prompt + own[:cut])
            starts.append(len(prompt) - 1)  # the prediction of its first own token is the first scored one
    return out, starts


# ------------------------------------------------------------------------------------------ the passes


def _weight_files(folder: Path) -> set[Path]:
    return set(folder.glob("*.safetensors"))


def _complete(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return all((folder / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))
    return any(f.is_file() for f in folder.glob("*.safetensors"))


class Sources:
    """Source models' local folders, fetched on demand (``download``) and, with ``release``, deleted again once
    measured if this run downloaded them: with one source on disk at a time, a 4x7B evaluation needs the
    merged model's disk plus one 7B model, as low-disk merging does. Local folders and files that were
    already cached are never deleted."""

    def __init__(self, *, download: bool = False, release: bool = False):
        self.download, self.release_enabled = download, release
        self._fetched: dict[str, list[Path]] = {}

    def folder(self, ref: str) -> Path:
        parsed = ModelRef.parse(ref)
        if parsed.local_path is not None:
            return parsed.local_path
        patterns = [*METADATA_PATTERNS, "*.safetensors"]
        try:
            cached = Path(snapshot_download(parsed.repo_id, revision=parsed.revision, local_files_only=True,
                                            allow_patterns=patterns))
        except Exception:
            cached = None
        if cached is not None and _complete(cached):
            return cached
        if not self.download:
            download = Setting("download", True)
            raise ModelNotFoundError(Text(
                f"{ref} is not in the local Hugging Face cache (a low-disk merge deletes what it downloaded): "
                f"{download.placeholder} to fetch it for the evaluation", (download,)))
        before = _weight_files(cached) if cached is not None else set()
        try:
            folder = Path(snapshot_download(parsed.repo_id, revision=parsed.revision, allow_patterns=patterns))
        except Exception as err:
            raise ModelNotFoundError(f"{ref} could not be downloaded ({type(err).__name__}: {err})") from None
        self._fetched.setdefault(ref, []).extend(sorted(_weight_files(folder) - before))
        return folder

    def release(self, ref: str) -> None:
        if not self.release_enabled:
            return
        for link in self._fetched.pop(ref, []):
            blob = link.resolve()
            if blob.is_file():
                blob.unlink()
            link.unlink(missing_ok=True)
            logger.info("deleted downloaded %s to save disk", link.name)


@dataclass
class Scored:
    """Per sequence: the loss of each scored prediction; for a MoE, per layer, the router logits of the
    same positions (all sequences' scored positions concatenated in order)."""

    losses: list[torch.Tensor]
    router: list[torch.Tensor] | None = None


def _batches(seqs: list[list[int]], max_tokens: int) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, current, width = [], [], 0
    for i in order:
        w = max(width, len(seqs[i]))
        if current and w * (len(current) + 1) > max_tokens:
            out.append(current)
            current, w = [], len(seqs[i])
        current.append(i)
        width = w
    if current:
        out.append(current)
    return out


@torch.no_grad()
def score(folder: str | os.PathLike, seqs: list[list[int]], starts: list[int], *, device: str | None = None,
          progress: bool = False, desc: str = "Eval", max_batch_tokens: int = MAX_BATCH_TOKENS) -> Scored:
    """Run ``seqs`` through a dense or Mixtral folder one layer at a time; score each next-token prediction
    from ``starts[i]`` on (nats, float32 cross-entropy from the logits). A MoE also gives its router logits."""
    folder = Path(folder)
    dev = pick_device(device)
    cfg = read_folder_config(folder)
    output = next((o for o in arch.OUTPUTS.values() if o.model_type == cfg.get("model_type")), None)
    is_moe = output is not None
    weights = _Weights(folder, dev, output)
    num_layers = int(cfg["num_hidden_layers"])
    losses: list[torch.Tensor | None] = [None] * len(seqs)
    router_by_seq: list[list[torch.Tensor]] = [[] for _ in seqs]
    batches = _batches(seqs, max_batch_tokens)
    bar = tqdm(total=num_layers * len(batches), desc=desc, disable=not progress, leave=False)
    head_name = "lm_head.weight" if "lm_head.weight" in weights.tensors else "model.embed_tokens.weight"
    for batch in batches:
        bseqs = [seqs[i] for i in batch]
        stack = LayerStack(folder, bseqs, weights.get("model.embed_tokens.weight"), dev)
        for layer in range(num_layers):
            x = stack.mlp_input(layer, weights.get)
            if is_moe:
                logits = x @ weights.gate(layer).T
                for j, i in enumerate(batch):
                    router_by_seq[i].append(logits[j, starts[i]: len(seqs[i]) - 1].cpu())
                out = moe_mlp(x, logits, weights.experts(layer, int(cfg[output.experts_key])),
                              int(cfg["num_experts_per_tok"]), stack.act,
                              normalise=bool(cfg.get("norm_topk_prob", True)))
                if output.shared_block:
                    out = out + shared_mlp(x, *weights.shared(layer), stack.act)
            else:
                p = f"model.layers.{layer}.mlp"
                gate, up, down = (weights.get(f"{p}.{n}_proj.weight") for n in ("gate", "up", "down"))
                out = (stack.act(x @ gate.T) * (x @ up.T)) @ down.T
            stack.add_mlp_output(out)
            bar.update(1)
        h = stack.final_norm(weights.get)
        head = weights.get(head_name)
        for j, i in enumerate(batch):
            end = len(seqs[i]) - 1
            logits = h[j, starts[i]:end] @ head.T
            target = torch.tensor(seqs[i][starts[i] + 1: end + 1], device=dev)
            losses[i] = torch.nn.functional.cross_entropy(logits, target, reduction="none").cpu()
        del stack, h, head
    bar.close()
    router = None
    if is_moe:
        router = [torch.cat([router_by_seq[i][layer] for i in range(len(seqs))]) for layer in range(num_layers)]
    return Scored(losses, router)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ evaluate


def _given(e: int, value, folder: Path, tokenizer, *, max_texts: int, max_tokens: int,
           notes: list[str]) -> Texts | None:
    """The texts the user gave for expert ``e`` (None: none given, or a dataset that cannot be read here)."""
    if value is None:
        return None
    try:
        kind, detail, texts = given_texts(value, folder)
    except ConfigError:
        raise
    except LazyMoEError as err:  # a dataset that cannot be read here: say so, use the expert's own text
        notes.append(f"{err}; used text the expert wrote instead")
        return None
    seqs = _tokenize(tokenizer, texts[:max_texts], max_tokens)
    if not seqs:
        raise ConfigError(f"experts[{e}].eval_texts: every text is shorter than 3 tokens; give longer texts.")
    return Texts(kind, detail, seqs, [1] * len(seqs))


def _generated(spec: ExpertConfig, tokenizer, *, max_texts: int, generate_tokens: int, sources: Sources, seed: int,
               vocab_size: int, notes: list[str]) -> Texts | None:
    """Text the expert writes from its positive prompts (None, with the reason in ``notes``, when it cannot)."""
    if not spec.positive_prompts:
        notes.append("no eval_texts and no positive prompts to write from: not measured")
        return None
    if generate_tokens < 2:
        notes.append("no eval_texts, and writing texts is off (generate_tokens 0): not measured")
        return None
    try:
        expert_dir = sources.folder(spec.source_model)
        seqs, starts = write_own_texts(expert_dir, tokenizer, spec.positive_prompts[:max_texts],
                                       new_tokens=generate_tokens, seed=seed, vocab_size=vocab_size)
    except LazyMoEError as err:
        notes.append(f"no eval_texts, and {err}: not measured")
        return None
    if not seqs:
        notes.append("the expert wrote (almost) nothing after its prompts: not measured")
        return None
    return Texts("generated", f"{generate_tokens} tokens per prompt, seed {seed}", seqs, starts)


def _resolve_overrides(texts, labels: list[str]) -> dict[int, object]:
    if texts is None:
        return {}
    if isinstance(texts, Mapping):
        out = {}
        for key, value in texts.items():
            idx = key if isinstance(key, int) else labels.index(key) if key in labels else (
                int(key) if str(key).isdigit() else None)
            if idx is None or not 0 <= idx < len(labels):
                raise ConfigError(f"eval texts given for {key!r}: use an expert index (0-{len(labels) - 1}) or one "
                                  f"of {', '.join(labels)}.")
            out[idx] = value
        return out
    texts = list(texts)
    if len(texts) != len(labels):
        raise ConfigError(f"eval texts: {len(texts)} lists given but the model has {len(labels)} experts.")
    return {i: t for i, t in enumerate(texts) if t is not None}


def evaluate(
    model_dir: str | os.PathLike,
    texts: Mapping[int | str, object] | Sequence[object] | None = None,
    *,
    max_texts: int = DEFAULT_MAX_TEXTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    generate_tokens: int = DEFAULT_GENERATE_TOKENS,
    download: bool = False,
    release: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> EvalReport:
    """Measure each expert's skill retention in the merged folder ``model_dir`` (writes nothing).

    ``texts`` overrides the recipe's ``eval_texts``: per expert (index or label) a list of texts, a file path or
    a :class:`~lazymoe.config.HubTexts`. Source models are read from their local folders or the Hugging Face
    cache; ``download=True`` fetches missing ones, and ``release=True`` deletes what it fetched once measured (one
    source model on disk at a time). What cannot be measured is listed in ``report.skipped`` and
    the rows' notes, with the reason.
    """
    start = time.perf_counter()
    check_count("generate_tokens", generate_tokens)
    folder = require_lazymoe_output(model_dir)
    cfg = read_folder_config(folder)
    output = next((o for o in arch.OUTPUTS.values() if o.model_type == cfg.get("model_type")), None)
    if output is None:
        raise ConfigError(f"{folder} is a '{cfg.get('model_type')}' model, not a MoE lazymoe writes "
                          f"({', '.join(o.name for o in arch.OUTPUTS.values())}).")
    if max_texts < 1 or max_tokens < 3:
        raise ConfigError("max_texts must be at least 1 and max_tokens at least 3.")
    recipe: MoEConfig = load_config(folder / CONFIG_FILENAME)
    E, k, L = int(cfg[output.experts_key]), int(cfg["num_experts_per_tok"]), int(cfg["num_hidden_layers"])
    if recipe.num_experts != E:
        raise ConfigError(f"{folder}: config.json has {E} experts but {CONFIG_FILENAME} has {recipe.num_experts}.")
    labels = expert_labels([e.source_model for e in recipe.experts])
    overrides = _resolve_overrides(texts, labels)
    dev = pick_device(device)
    tokenizer = load_folder_tokenizer(folder)
    seed = (recipe.seed or 0) + 1  # not the seed the routers' continuations were sampled with
    # every text the user gave is read (and any mistake in it reported) before an expert writes anything
    notes: list[list[str]] = [[] for _ in recipe.experts]
    given = [_given(e, overrides.get(e, spec.eval_texts), folder, tokenizer, max_texts=max_texts,
                    max_tokens=max_tokens, notes=notes[e]) for e, spec in enumerate(recipe.experts)]
    sources = Sources(download=download, release=release)
    rows, sets, skipped = [], {}, []
    for e, spec in enumerate(recipe.experts):
        row = ExpertEval(e, labels[e], spec.source_model, "none", "", notes=notes[e])
        rows.append(row)
        try:  # written texts need the expert; its loss is measured while it is here (then released)
            got = given[e] or _generated(spec, tokenizer, max_texts=max_texts, generate_tokens=generate_tokens,
                                         sources=sources, seed=seed + e, vocab_size=int(cfg["vocab_size"]),
                                         notes=notes[e])
            if got is None:
                skipped.append(f"expert {e} ({labels[e]}): {notes[e].pop()}")
                continue
            row.texts_kind, row.texts_detail, row.texts = got.kind, got.detail, len(got.seqs)
            row.tokens = sum(len(s) - 1 - st for s, st in zip(got.seqs, got.starts))
            sets[e] = got
            if spec.source_model == recipe.base_model:
                continue  # the base's own pass measures it, on exactly the same sequences
            try:
                expert_dir = sources.folder(spec.source_model)
            except LazyMoEError as err:
                skipped.append(f"expert {e} ({labels[e]}) loss: {err}")
                continue
            scored = score(expert_dir, got.seqs, got.starts, device=str(dev), progress=progress,
                           desc=f"Eval: {labels[e]} layers")
            row.loss_expert = _mean(scored.losses)
        finally:
            if spec.source_model != recipe.base_model:  # the base is needed again below
                sources.release(spec.source_model)
    report = EvalReport(folder.resolve().name, E, k, L, rows, skipped, str(dev), 0.0, max_tokens)
    if not sets:
        report.seconds = time.perf_counter() - start
        return report

    # every sequence once through the base and once through the MoE
    order = [(e, j) for e in sorted(sets) for j in range(len(sets[e].seqs))]
    all_seqs = [sets[e].seqs[j] for e, j in order]
    all_starts = [sets[e].starts[j] for e, j in order]
    by_expert = {e: [i for i, (owner, _) in enumerate(order) if owner == e] for e in sets}
    try:
        base_dir = sources.folder(recipe.base_model)
    except LazyMoEError as err:
        skipped.append(f"base loss ({recipe.base_model}): {err}; gain kept cannot be computed")
    else:
        base = score(base_dir, all_seqs, all_starts, device=str(dev), progress=progress, desc="Eval: base layers")
        for e, picks in by_expert.items():
            rows[e].loss_base = _mean([base.losses[i] for i in picks])
            if recipe.experts[e].source_model == recipe.base_model:
                rows[e].loss_expert = rows[e].loss_base
    finally:
        sources.release(recipe.base_model)

    moe = score(folder, all_seqs, all_starts, device=str(dev), progress=progress, desc="Eval: MoE layers")
    offsets = [0]
    for s, st in zip(all_seqs, all_starts):
        offsets.append(offsets[-1] + len(s) - 1 - st)
    for e, picks in by_expert.items():
        row = rows[e]
        row.loss_moe = _mean([moe.losses[i] for i in picks])
        positions = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in picks])
        top1, topk, matrix = [], [], []
        for z in moe.router:
            chosen = z[positions].topk(k, dim=-1).indices
            top1.append(float((chosen[:, 0] == e).float().mean()))
            topk.append(float((chosen == e).any(-1).float().mean()))
            matrix.append(torch.bincount(chosen[:, 0], minlength=E).double().div(len(positions)).tolist())
        row.top1_by_layer, row.topk_by_layer, row.top1_matrix = top1, topk, matrix
    report.seconds = time.perf_counter() - start
    return report


def _mean(losses: list[torch.Tensor]) -> float:
    """Token-weighted mean: every scored token counts once, whichever text it is in."""
    return float(torch.cat(losses).double().mean())


def write_evaluation(model_dir: str | os.PathLike, *, update_card: bool = True, **options) -> EvalReport:
    """:func:`evaluate`, then ``eval.json`` and ``eval.png`` into the folder and (``update_card``) the card."""
    folder = Path(model_dir)
    report = evaluate(folder, **options)
    try:
        plot_eval(report, folder / EVAL_IMAGE)
    except ImportError:
        (folder / EVAL_IMAGE).unlink(missing_ok=True)  # an older picture would not match these numbers
        report.skipped.append(f"{EVAL_IMAGE}: not drawn, matplotlib is not installed (pip install 'lazymoe[plot]')")
    report.write(folder)
    if update_card:
        rerender_card(folder, **detected_extras(folder))
    return report
