#!/usr/bin/env python3
"""Do a frankenMoE's routers route? Every gate mode, on a suite of small worlds of real trained experts.

    python bench/router_quality.py                       # the whole suite, default modes, 3 seeds
    python bench/router_quality.py --worlds prose-mlp-words --modes hidden,trained --seeds 0

1. Builds (once; cached under ``bench/.work/world-<spec>``) every world of ``bench/worlds.py``'s ``SUITE``:
   small Llamas pretrained on a domain set, one expert per domain (MLP-only or fully fine-tuned), and a
   prompt style (descriptive words, words plus one example, or examples).
2. Merges each world's experts with each gate mode through ``lazymoe.pipeline.merge.merge``, once per seed for
   the modes that use a seed (``random``, ``uniform_random``, the fitted modes), once for the others.
3. Runs held-out documents of each domain through each MoE (transformers' Mixtral, router logits on) and
   reports per world and mode:
   - top-1 routing: the share of held-out tokens of domain d (every token after BOS), over all layers,
     whose first choice is expert d; averaged over the world's domains, then mean and min over seeds;
   - worst domain's gain kept: min over domains of (loss_base - loss_moe) / (loss_base - loss_expert_d),
     the LM loss computed from the logits (``out.loss`` would add the router's auxiliary loss); 100% =
     as good as the expert, 0% = as good as the base; mean and min over seeds;
   and a **minimum** row per mode: the worst world's min over seeds.

Worlds marked *tune* were used while developing the modes; the *held-out* ones were only ever measured.
Results are printed as markdown and written to ``bench/results/router_quality.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import worlds  # noqa: E402

WORK = HERE / ".work"
RESULTS = HERE / "results"
#: the default suite. ``trained`` is measured on request (``--modes ...,trained``): it never won on the suite
#: and its router training costs more than every other mode together (docs/gate-modes.md)
MODES = ("random", "hidden", "cheap_embed", "classifier", "expert_classifier", "expert_classifier+docs",
         "expert_classifier+heldout")
#: modes whose routers depend on the seed (sampling or random init): run once per seed
SEEDED = {"random", "uniform_random", "centroid", "classifier", "expert_classifier", "trained"}
#: ``MODE+docs``: the mode with user calibration text, CALIBRATION_DOCS documents of each expert's domain from a
#: stream never used for training or scoring. ``MODE+heldout``: fitted on the very documents it is scored on --
#: not a method but a bound: the most a router fitted that way can do in that world.
CALIBRATION = ("docs", "heldout")
CALIBRATION_DOCS = 3
CALIBRATION_SEED = 555_555  # documents(d, n, spec.seed + this): disjoint from training, tokenizer and held out


def split_mode(spec: str) -> tuple[str, str | None]:
    mode, _, calibration = spec.partition("+")
    if calibration and calibration not in CALIBRATION:
        raise SystemExit(f"unknown calibration {calibration!r} in {spec!r}; use one of {CALIBRATION}")
    return mode, calibration or None


def with_calibration(recipe: dict, world, calibration: str | None) -> dict:
    """The recipe with each expert's ``calibration_text`` (see ``CALIBRATION``)."""
    if calibration is None:
        return recipe
    for d, expert in zip(world.spec.domains, recipe["experts"]):
        expert["calibration_text"] = (list(world.heldout[d]) if calibration == "heldout" else
                                      worlds.documents(d, CALIBRATION_DOCS, world.spec.seed + CALIBRATION_SEED))
    return recipe


@contextlib.contextmanager
def _timed_gates(sink: dict):
    """Time lazymoe's gate step inside a real merge (the merge step calls its module's compute_gates)."""
    gates = importlib.import_module("lazymoe.pipeline.merge")
    original = gates.compute_gates

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink["seconds"] = time.perf_counter() - start

    gates.compute_gates = timed
    try:
        yield
    finally:
        gates.compute_gates = original


def merge_ours(recipe: dict, out: Path) -> float:
    merge_module = importlib.import_module("lazymoe.pipeline.merge")
    sink: dict = {}
    with _timed_gates(sink):
        merge_module.merge(recipe, out, overwrite=True, progress=False, device="cpu")
    return sink["seconds"]


# ------------------------------------------------------------------------------------------ measuring


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def _token_ce(model, ids, mask) -> torch.Tensor:
    """Per-token LM loss of the tokens ``worlds.token_losses`` counts, flattened."""
    ce, keep = worlds.token_losses(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    return ce[keep]


def reference_losses(world, tokenizer, variant: str) -> dict[str, dict[str, float]]:
    """Held-out loss of the base and of each domain's expert, on the tokens after BOS; the base's per-token
    losses too (``base_tokens``), for the gain analysis."""
    out: dict = {"base": {}, "expert": {}, "base_tokens": {}}
    base = _load(world.base)
    for d in world.spec.domains:
        batch = worlds.heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len)
        out["base_tokens"][d] = _token_ce(base, *batch)
        out["base"][d] = float(out["base_tokens"][d].mean())
        out["expert"][d] = worlds.lm_loss(_load(world.experts[variant][d]), *batch)
    return out


@torch.no_grad()
def evaluate(moe_dir: Path, world, tokenizer, ref: dict, oracle_tokens: dict | None = None) -> dict:
    """Top-1 routing per domain and layer, LM loss from the logits, and the gain kept per domain.

    With ``oracle_tokens`` (per-token losses under perfect routing), also where the gain goes: the tokens
    whose first choice is right at every layer, their share of the tokens and of the oracle's gain, and the
    share of that gain the MoE keeps on them and on the other tokens (``split``).
    """
    model = _load(moe_dir)
    out: dict = {"top1": {}, "kept": {}, "loss": {}, "split": {}}
    for d_index, d in enumerate(world.spec.domains):
        ids, mask = worlds.heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len)
        res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        ce, keep = worlds.token_losses(res.logits, ids, mask)
        real = mask.bool().clone()
        real[:, 0] = False  # BOS: the same state whatever the domain
        flat = real.reshape(-1)
        out["top1"][d] = [float((z.reshape(-1, z.shape[-1])[flat].argmax(-1) == d_index).float().mean())
                          for z in res.router_logits]
        out["loss"][d] = float(ce[keep].mean())
        out["kept"][d] = (ref["base"][d] - out["loss"][d]) / (ref["base"][d] - ref["expert"][d])
        if oracle_tokens is not None:
            # a token's routing decides the MLPs at its own position, which predict the next token
            right = torch.stack([z.view(*ids.shape, -1).argmax(-1) == d_index for z in res.router_logits]).all(0)
            right = right[:, :-1][keep]
            base, oracle, moe = ref["base_tokens"][d], oracle_tokens[d], ce[keep]
            gain = float((base - oracle).sum())

            def kept(sel):  # None where the tokens carry under 5% of the gain: a ratio of two small numbers
                part = float((base - oracle)[sel].sum())
                return float((base - moe)[sel].sum()) / part if abs(part) >= 0.05 * abs(gain) else None

            out["split"][d] = {"right_tokens": float(right.float().mean()),
                               "right_gain": float((base - oracle)[right].sum()) / gain,
                               "kept_right": kept(right), "kept_rest": kept(~right)}
    out["top1_mean"] = sum(sum(v) / len(v) for v in out["top1"].values()) / len(out["top1"])
    out["worst_kept"] = min(out["kept"].values())
    return out


@torch.no_grad()
def oracle_kept(world, tokenizer, variant: str, ref: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Gain kept by perfect top-1 routing: domain d's text through base attention + expert d's MLPs (the
    MoE's ceiling; 100% for MLP-only experts, less for full fine-tunes whose attention the MoE never takes).
    Also returns its per-token losses."""
    base = _load(world.base)
    out, tokens = {}, {}
    for d in world.spec.domains:
        expert = dict(_load(world.experts[variant][d]).named_parameters())
        for n, p in base.named_parameters():
            if ".mlp." in n:
                p.copy_(expert[n])
        tokens[d] = _token_ce(base, *worlds.heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len))
        out[d] = (ref["base"][d] - float(tokens[d].mean())) / (ref["base"][d] - ref["expert"][d])
    return out, tokens


def run_world(entry: worlds.SuiteWorld, modes: list[str], seeds: list[int], work: Path, log) -> dict:
    from transformers import AutoTokenizer

    spec = dataclasses.replace(entry.spec, variants=(entry.variant,)) if entry.variant not in entry.spec.variants \
        else entry.spec
    world = worlds.build_world(work, spec, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(world.tokenizer))
    ref = reference_losses(world, tokenizer, entry.variant)
    oracle, oracle_tokens = oracle_kept(world, tokenizer, entry.variant, ref)
    rows: dict = {}
    for spec in modes:
        mode, calibration = split_mode(spec)
        runs = []
        for seed in (seeds if mode in SEEDED else seeds[:1]):
            recipe = with_calibration(world.recipe(entry.variant, entry.style, gate_mode=mode, seed=seed), world,
                                      calibration)
            out = work / "moe" / f"{entry.name}-{spec}"
            start = time.perf_counter()
            seconds = merge_ours(recipe, out)
            r = evaluate(out, world, tokenizer, ref, oracle_tokens)
            r.update(seed=seed, gate_seconds=seconds)
            runs.append(r)
            log(f"{entry.name} {spec} seed {seed}: top-1 {100 * r['top1_mean']:.1f}%, worst kept "
                f"{100 * r['worst_kept']:.0f}% ({time.perf_counter() - start:.1f} s)")
        rows[spec] = {"runs": runs,
                      "top1_mean": sum(r["top1_mean"] for r in runs) / len(runs),
                      "top1_min": min(r["top1_mean"] for r in runs),
                      "top1_spread": max(r["top1_mean"] for r in runs) - min(r["top1_mean"] for r in runs),
                      "kept_mean": sum(r["worst_kept"] for r in runs) / len(runs),
                      "kept_min": min(r["worst_kept"] for r in runs),
                      "gate_seconds": sum(r["gate_seconds"] for r in runs) / len(runs)}
    gain = {d: ref["base"][d] - ref["expert"][d] for d in world.spec.domains}
    return {"entry": {"name": entry.name, "variant": entry.variant, "style": entry.style,
                      "held_out": entry.held_out, "domains": list(world.spec.domains),
                      "layers": world.spec.num_hidden_layers, "hidden": world.spec.hidden_size,
                      "base_steps": world.spec.base_steps, "world": world.root.name},
            "expert_gain": gain, "oracle_kept": oracle, "modes": rows}


# ------------------------------------------------------------------------------------------ reporting


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def summary(results: dict) -> str:
    """The compact table (the README's): per world, each mode's top-1 and worst kept, min over seeds."""
    modes = results["modes"]
    head = ("| world | role | " + " | ".join(f"`{m}` top-1" for m in modes) + " | "
            + " | ".join(f"`{m}` kept" for m in modes) + " | oracle kept |")
    lines = [head, "|---|---|" + "---:|" * (2 * len(modes) + 1)]
    for w in results["worlds"]:
        e = w["entry"]
        cells = [pct(w["modes"][m]["top1_min"]) for m in modes] + [pct(w["modes"][m]["kept_min"]) for m in modes]
        lines.append(f"| {e['name']} | {'held out' if e['held_out'] else 'tune'} | " + " | ".join(cells)
                     + f" | {pct(min(w['oracle_kept'].values()))} |")
    mins = [pct(min(w["modes"][m]["top1_min"] for w in results["worlds"])) for m in modes]
    mins += [pct(min(w["modes"][m]["kept_min"] for w in results["worlds"])) for m in modes]
    lines.append("| **minimum** | | " + " | ".join(f"**{c}**" for c in mins) + " | |")
    return "\n".join(lines)


def render(results: dict) -> str:
    modes = results["modes"]
    lines = [
        "# Router quality: a suite of worlds",
        "",
        "Per world and gate mode: **top-1** = share of held-out tokens (after BOS, all layers) whose first "
        "choice is their domain's expert, averaged over domains; **worst kept** = the worst domain's share of "
        "its expert's loss gain over the base that the MoE keeps (LM loss from the logits). Each cell is "
        f"mean / min over seeds {results['seeds']} (modes without randomness run once). "
        f"{results['experts_per_token']} experts per token.",
        "",
        "| world | role | experts | layers × hidden | prompts | "
        + " | ".join(f"`{m}` top-1" for m in modes) + " | "
        + " | ".join(f"`{m}` worst kept" for m in modes) + " | oracle worst kept |",
        "|---|---|---:|---|---|" + "---:|" * (2 * len(modes) + 1),
    ]
    for w in results["worlds"]:
        e = w["entry"]
        cells = [f"{pct(w['modes'][m]['top1_mean'])} / {pct(w['modes'][m]['top1_min'])}" for m in modes]
        cells += [f"{pct(w['modes'][m]['kept_mean'])} / {pct(w['modes'][m]['kept_min'])}" for m in modes]
        lines.append(f"| {e['name']} | {'held out' if e['held_out'] else 'tune'} | {len(e['domains'])} "
                     f"({e['variant']}) | {e['layers']} × {e['hidden']} | {e['style']} | " + " | ".join(cells)
                     + f" | {pct(min(w['oracle_kept'].values())) if 'oracle_kept' in w else '—'} |")
    mins = [pct(min(w["modes"][m]["top1_min"] for w in results["worlds"])) for m in modes]
    mins += [pct(min(w["modes"][m]["kept_min"] for w in results["worlds"])) for m in modes]
    lines.append("| **minimum** | | | | | " + " | ".join(f"**{c}**" for c in mins) + " | |")
    lines += ["", "Chance top-1 is 25% with four experts, 12.5% with eight. *Oracle*: every token of domain d "
              "through base attention + expert d's MLPs (perfect top-1 routing), the most any router can keep.", "",
              "Top-1 spread over seeds (max − min, points) and gate fit time (s, CPU):", "",
              "| world | " + " | ".join(f"`{m}` spread" for m in modes) + " | "
              + " | ".join(f"`{m}` fit s" for m in modes) + " |",
              "|---|" + "---:|" * (2 * len(modes))]
    for w in results["worlds"]:
        lines.append(f"| {w['entry']['name']} | "
                     + " | ".join(f"{100 * w['modes'][m]['top1_spread']:.1f}" for m in modes) + " | "
                     + " | ".join(f"{w['modes'][m]['gate_seconds']:.1f}" for m in modes) + " |")
    if any("+" in m for m in modes):
        lines += ["", f"`MODE+docs`: the mode given {CALIBRATION_DOCS} documents of each expert's domain as "
                  "`calibration_text` (user calibration text, from a stream never trained on or scored). "
                  "`MODE+heldout`: fitted on the very documents it is scored on -- not a method but a bound, the "
                  "most a router fitted that way can reach in that world."]
    split_modes = [m for m in modes if any(r.get("split") for w in results["worlds"] for r in w["modes"][m]["runs"])]
    if split_modes:
        lines += ["", "Where the gain goes (first seed, mean over domains): the tokens whose first choice is their "
                  "domain's expert **at every layer**, their share of the tokens and of the oracle's gain, and the "
                  "share of the oracle's gain the MoE keeps on them and on the other tokens (— where those tokens carry "
                  "under 5% of the gain).", "",
                  "| world | mode | tokens right at every layer | their share of the gain | kept on them | "
                  "kept on the rest |", "|---|---|---:|---:|---:|---:|"]
        for w in results["worlds"]:
            for m in split_modes:
                sp = list(w["modes"][m]["runs"][0]["split"].values())

                def mean(key):
                    values = [v[key] for v in sp if v[key] is not None]
                    return pct(sum(values) / len(values)) if values else "—"

                lines.append(f"| {w['entry']['name']} | {m} | {mean('right_tokens')} | {mean('right_gain')} "
                             f"| {mean('kept_right')} | {mean('kept_rest')} |")
    lines += ["", "Per domain (first seed): top-1 / kept.", ""]
    for w in results["worlds"]:
        doms = w["entry"]["domains"]
        lines += [f"<details><summary>{w['entry']['name']}</summary>", "",
                  "| mode | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in modes:
            r = w["modes"][m]["runs"][0]
            lines.append(f"| {m} | " + " | ".join(
                f"{pct(sum(r['top1'][d]) / len(r['top1'][d]))} / {pct(r['kept'][d])}" for d in doms) + " |")
        lines.append("| expert gain (nats) | " + " | ".join(f"{w['expert_gain'][d]:.3f}" for d in doms) + " |")
        lines += ["", "</details>", ""]
    cpu = f", {results['cpu_seconds']:.0f} s of CPU" if "cpu_seconds" in results else ""
    lines.append(f"Suite run time: {results['seconds']:.0f} s wall{cpu}, {results.get('jobs', 1)} world(s) at once with "
                 f"{results['threads']} torch thread(s) each, worlds cached.")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[router_quality] {msg}", file=sys.stderr, flush=True)


def _quiet_merges() -> None:
    merge_module = importlib.import_module("lazymoe.pipeline.merge")
    if hasattr(merge_module, "_write_extras"):  # the model card is not what is measured here
        merge_module._write_extras = lambda *a, **k: None


def _run_in_worker(job: tuple) -> dict:
    """One world in a worker process (``--jobs``): the same code as a serial run, its own torch threads."""
    entry, modes, seeds, work, threads = job
    torch.set_num_threads(threads)
    _quiet_merges()
    return run_world(entry, modes, seeds, work, _log)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="", help="comma-separated suite world names (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help="gate modes to run")
    parser.add_argument("--seeds", default="0,1,2", help="seeds for the modes that use one")
    parser.add_argument("--work", type=Path, default=WORK, help="cache folder for the worlds and the MoEs")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_quality.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worlds measured at once, one process each (default: 2, the suite's 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="only the unit tests' tiny world (seconds)")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render the report of an earlier run")
    parser.add_argument("--summary", type=Path, metavar="JSON",
                        help="only print the compact table of an earlier run (min over seeds; the README's)")
    parser.add_argument("--summary-modes", default="", help="with --summary: the modes to show (default: all)")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    if args.summary:
        results = json.loads(args.summary.read_text())
        if args.summary_modes:
            results["modes"] = [m for m in args.summary_modes.split(",") if m]
        print(summary(results))
        return 0
    torch.set_num_threads(args.threads)
    _quiet_merges()
    if args.tiny:
        suite = [worlds.SuiteWorld("tiny", worlds.TINY_SPEC, "mlp", "words+example", held_out=False)]
    else:
        wanted = [w for w in args.worlds.split(",") if w]
        unknown = set(wanted) - {w.name for w in worlds.SUITE}
        if unknown:
            parser.error(f"unknown world(s) {sorted(unknown)}; the suite has {[w.name for w in worlds.SUITE]}")
        suite = [w for w in worlds.SUITE if not wanted or w.name in wanted]
    modes = [m for m in args.modes.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for spec in modes:
        split_mode(spec)  # an unknown calibration fails now, not after the first world
    for entry in suite:  # build (or find) every world first: worlds sharing a spec must not train it twice at once
        spec = dataclasses.replace(entry.spec, variants=(entry.variant,)) \
            if entry.variant not in entry.spec.variants else entry.spec
        worlds.build_world(args.work, spec, progress=False)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    jobs = [(entry, modes, seeds, args.work, args.threads) for entry in suite]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs)))
        try:
            measured = pool.map(_run_in_worker, jobs, chunksize=1)
        finally:
            pool.close()
            pool.join()
    else:
        measured = [run_world(entry, modes, seeds, args.work, _log) for entry in suite]
    results = {"modes": modes, "seeds": seeds, "experts_per_token": 2, "threads": args.threads, "jobs": args.jobs,
               "worlds": measured}
    results["seconds"] = time.perf_counter() - start
    results["cpu_seconds"] = _cpu_seconds() - cpu_start
    report = render(results)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    _log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
