#!/usr/bin/env python3
"""Do a frankenMoE's routers route? Every gate mode, measured on a small world of real trained experts.

    python bench/router_quality.py                  # both expert variants, every mode, mergekit-moe too
    python bench/router_quality.py --variants mlp --modes hidden,classifier --no-mergekit   # quicker

1. Builds (once; cached under ``bench/.work/world-<spec>``) the world of ``bench/world.py``: a small Llama
   pretrained on four synthetic domains, and one expert per domain fine-tuned from it, in two variants:
   ``mlp`` (only MLPs fine-tuned: base attention + expert d's MLPs *is* expert d, so the MoE's loss
   measures routing alone) and ``full`` (every weight fine-tuned: what people really merge).
2. Merges the four experts of each variant with every gate mode, from the same five prompts per expert:
   lazymoe's implementation of the reference modes, lazymoe's fitted modes, and the reference itself
   (``mergekit-moe`` from PyPI in its own virtualenv ``bench/.work/mkvenv``) on the same YAML.
3. Runs held-out documents of each domain through each MoE and reports, per method:
   - routing accuracy: the share of held-out tokens of domain d (every token after BOS) whose first choice
     is expert d (top-1), or whose top-k includes it (top-k), per layer and overall;
   - gain kept: (loss_base - loss_moe) / (loss_base - loss_expert_d) on domain d's held-out text; 100% means
     the MoE is as good as the expert there, 0% as good as the base, negative worse than the base;
   - the time the gate fitting took (for mergekit-moe, its whole run: it does not report the gate step).
   ``classifier-prompts-only`` is the classifier without the base's continuations of the prompts
   (``router_continuation_tokens: 0``): the ablation that shows what they add.
   An ``oracle`` row routes every token of domain d to expert d alone (for ``mlp`` that is the expert
   itself); it bounds what any router can keep.

Results are printed as markdown and written to ``bench/results/router_quality.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))  # world.py, the trained test world, lives beside this script

import torch  # noqa: E402
import yaml  # noqa: E402

from lazymoe.router.routing import stream_router_logits  # noqa: E402
from world import DOMAINS, TINY_SPEC, WorldSpec, build_world, heldout_batch, lm_loss  # noqa: E402

WORK = HERE / ".work"
RESULTS = HERE / "results"
OURS = ("random", "uniform_random", "cheap_embed", "hidden", "hidden_avg", "centroid", "classifier",
        "classifier-prompts-only")
#: ablations: a name -> (gate mode, extra config keys)
VARIANT_MODES = {"classifier-prompts-only": ("classifier", {"router_continuation_tokens": 0}),
                 "centroid-prompts-only": ("centroid", {"router_continuation_tokens": 0})}
MERGEKIT = ("cheap_embed", "hidden", "hidden_avg")
MKVENV = WORK / "mkvenv"


# ------------------------------------------------------------------------------------------ merging


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
        merge_module.merge(dict(recipe, seed=0), out, overwrite=True, progress=False)
    return sink["seconds"]


def mergekit_ready(log) -> bool:
    exe = MKVENV / "bin" / "mergekit-moe"
    if exe.is_file():
        return True
    log(f"installing mergekit into {MKVENV} (torch pinned to the local {torch.__version__.split('+')[0]})")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MKVENV)], check=True)
        pip = [str(MKVENV / "bin" / "pip"), "install", "-q"]
        subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run(pip + ["mergekit"], check=True)
    except (subprocess.CalledProcessError, OSError) as err:
        log(f"mergekit could not be installed ({err}); comparing with lazymoe's reference modes only")
        return False
    return exe.is_file()


def merge_mergekit(recipe: dict, out: Path, logs: Path) -> float:
    cfg = out.with_suffix(".yml")
    cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([str(MKVENV / "bin" / "mergekit-moe"), str(cfg), str(out), "--random-seed", "0"],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    (logs / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"mergekit-moe failed on {cfg} (log: {logs / (out.name + '.log')}):\n{proc.stderr[-2000:]}")
    return seconds


# ------------------------------------------------------------------------------------------ measuring


def reference_losses(world, tokenizer, variant: str) -> dict[str, dict[str, float]]:
    """Held-out loss of the base and of each domain's expert, on the tokens after BOS (see lm_loss)."""
    from transformers import AutoModelForCausalLM

    out: dict[str, dict[str, float]] = {"base": {}, "expert": {}}
    base = AutoModelForCausalLM.from_pretrained(str(world.base), dtype=torch.float32).eval()
    for d in DOMAINS:
        batch = heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len)
        expert = AutoModelForCausalLM.from_pretrained(str(world.experts[variant][d]), dtype=torch.float32).eval()
        out["base"][d] = lm_loss(base, *batch, after_bos=True)
        out["expert"][d] = lm_loss(expert, *batch, after_bos=True)
    return out


def kept(loss: float, ref: dict, d: str) -> float:
    return (ref["base"][d] - loss) / (ref["base"][d] - ref["expert"][d])


def evaluate(moe_dir: Path, world, tokenizer, ref: dict) -> dict:
    """Routing accuracy per domain and layer, and the loss gain kept per domain."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    out = {"top1": {}, "topk": {}, "loss": {}, "kept": {}, "tokens": {}}
    for d_index, d in enumerate(DOMAINS):
        ids, mask = heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len)
        seqs = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        logits = stream_router_logits(moe_dir, seqs)
        real = mask.bool().clone()
        real[:, 0] = False  # BOS: the same state whatever the domain
        top = [z[real].topk(k, dim=-1).indices for z in logits]
        out["top1"][d] = [float((t[:, 0] == d_index).float().mean()) for t in top]
        out["topk"][d] = [float((t == d_index).any(-1).float().mean()) for t in top]
        out["tokens"][d] = int(real.sum())
        out["loss"][d] = lm_loss(model, ids, mask, after_bos=True)
        out["kept"][d] = kept(out["loss"][d], ref, d)
    return out


def oracle(world, tokenizer, variant: str, ref: dict) -> dict:
    """Every token of domain d through base attention + expert d's MLPs: perfect top-1 routing."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(world.base), dtype=torch.float32).eval()
    mlp_names = [n for n, _ in base.named_parameters() if ".mlp." in n]
    out = {"top1": {}, "topk": {}, "loss": {}, "kept": {}, "tokens": {}}
    L = base.config.num_hidden_layers
    for d in DOMAINS:
        expert = dict(AutoModelForCausalLM.from_pretrained(str(world.experts[variant][d]),
                                                           dtype=torch.float32).named_parameters())
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n in mlp_names:
                    p.copy_(expert[n])
        ids, mask = heldout_batch(tokenizer, world.heldout[d], world.spec.seq_len)
        out["loss"][d] = lm_loss(base, ids, mask, after_bos=True)
        out["kept"][d] = kept(out["loss"][d], ref, d)
        out["top1"][d] = out["topk"][d] = [1.0] * L
        out["tokens"][d] = int(mask[:, 1:].sum())
    return out


def overall(acc: dict[str, list[float]], tokens: dict[str, int]) -> float:
    total = sum(tokens.values())
    return sum(sum(v) / len(v) * tokens[d] for d, v in acc.items()) / total


# ------------------------------------------------------------------------------------------ reporting


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def render(results: dict) -> str:
    w, k = results["world"], results["experts_per_token"]
    lines = [
        "# Router quality: routing accuracy and gain kept, per gate mode",
        "",
        f"World `{w['name']}` ({w['layers']} layers, hidden {w['hidden']}, {len(DOMAINS)} domains, trained in "
        f"{w['train_seconds']:.0f} s); {k} experts per token; {sum(results['tokens'].values())} held-out tokens "
        f"per method; chance top-1 = {pct(1 / len(DOMAINS))}, top-{k} = {pct(k / len(DOMAINS))}.",
        "",
        "Expert gain over the base (nats/token, held out, after BOS): "
        + "; ".join(f"{v}: " + ", ".join(f"{d} {ref['base'][d] - ref['expert'][d]:.3f}" for d in DOMAINS)
                    for v, ref in results["references"].items()),
        "",
        "Kept = (loss_base - loss_moe) / (loss_base - loss_expert) on each domain's held-out text, counting every "
        "prediction after the first: at BOS nothing tells the domain yet, so no router can help there, while "
        "each expert 'knows' its domain by construction. *Of oracle* = the worst domain's kept / the oracle's "
        "kept there: the share of what perfect routing could keep.",
        "",
    ]
    tokens = results["tokens"]
    for variant, methods in results["variants"].items():
        best = methods["oracle"]["kept"]
        lines += [f"## Variant `{variant}`", "",
                  f"| method | gate fit (s) | top-1 | top-{k} | top-1 per layer | "
                  + " | ".join(f"kept {d}" for d in DOMAINS) + " | worst kept | of oracle |",
                  "|---|---:|---:|---:|---|" + "---:|" * (len(DOMAINS) + 2)]
        for name, r in methods.items():
            layers = len(next(iter(r["top1"].values())))
            per_layer = [sum(r["top1"][d][i] * tokens[d] for d in DOMAINS) / sum(tokens.values())
                         for i in range(layers)]
            fit = "—" if r.get("seconds") is None else f"{r['seconds']:.2f}"
            of_oracle = min(r["kept"][d] / best[d] for d in DOMAINS) if min(best.values()) > 0 else float("nan")
            lines.append(
                f"| {name} | {fit} | {pct(r['top1_all'])} | {pct(r['topk_all'])} | "
                + " / ".join(f"{100 * a:.0f}" for a in per_layer) + " | "
                + " | ".join(pct(r["kept"][d]) for d in DOMAINS) + f" | {pct(min(r['kept'].values()))} | "
                + f"{pct(of_oracle)} |")
        lines.append("")
        for name, r in methods.items():
            if name == "oracle":
                continue
            layers = len(next(iter(r["top1"].values())))
            lines += [f"<details><summary>{variant} / {name}: per domain and layer</summary>", "",
                      "| domain | " + " | ".join(f"L{i} top-1" for i in range(layers)) + f" | top-1 | top-{k} | "
                      "loss | kept |", "|---|" + "---:|" * (layers + 4)]
            for d in DOMAINS:
                t1 = r["top1"][d]
                lines.append(f"| {d} | " + " | ".join(pct(a) for a in t1) + f" | {pct(sum(t1) / layers)} | "
                             f"{pct(sum(r['topk'][d]) / layers)} | {r['loss'][d]:.3f} | {pct(r['kept'][d])} |")
            lines += ["", "</details>", ""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="mlp,full", help="expert variants: mlp, full (default both)")
    parser.add_argument("--modes", default=",".join(OURS), help="lazymoe gate modes to run")
    parser.add_argument("--mergekit-modes", default=",".join(MERGEKIT), help="gate modes run through mergekit-moe")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit-moe")
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--work", type=Path, default=WORK, help="cache folder for the world and the MoEs")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_quality.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--tiny", action="store_true", help="the unit tests' world: seconds to train, for a smoke run")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render the report of an earlier run")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[router_quality] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    variants = [v for v in args.variants.split(",") if v]
    spec = dataclasses.replace(TINY_SPEC if args.tiny else WorldSpec(),
                               variants=tuple(v for v in ("mlp", "full") if v in variants))
    log(f"world: {args.work}/world-{spec.key()} (trained once, then cached)")
    world = build_world(args.work, spec, progress=True, threads=args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world.tokenizer))
    moes, logs = args.work / "moe", args.work / "logs"
    moes.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    use_mergekit = not args.no_mergekit and mergekit_ready(log)
    results: dict = {"variants": {}, "tokens": {}, "notes": []}
    references: dict = results.setdefault("references", {})
    if not use_mergekit and not args.no_mergekit:
        results["notes"].append("mergekit-moe could not be installed: only lazymoe's reference modes are shown.")
    k = args.experts_per_token
    for variant in variants:
        rows: dict = {}
        ref = references[variant] = reference_losses(world, tokenizer, variant)
        runs = [("lazymoe", m) for m in args.modes.split(",") if m]
        if use_mergekit:
            runs += [("mergekit", m) for m in args.mergekit_modes.split(",") if m]
        for tool, mode in runs:
            name = mode if tool == "lazymoe" else f"mergekit {mode}"
            out = moes / f"{variant}-{tool}-{mode}"
            gate_mode, extra = VARIANT_MODES.get(mode, (mode, {}))
            recipe = world.recipe(variant, gate_mode=gate_mode, experts_per_token=k, **extra)
            log(f"{variant}: {name}")
            seconds = merge_ours(recipe, out) if tool == "lazymoe" else merge_mergekit(recipe, out, logs)
            r = evaluate(out, world, tokenizer, ref)
            r["seconds"] = seconds
            rows[name] = r
        rows["oracle"] = dict(oracle(world, tokenizer, variant, ref), seconds=None)
        for r in rows.values():
            results["tokens"] = r["tokens"] if "tokens" in r and r is not rows["oracle"] else results["tokens"]
        for r in rows.values():
            r["top1_all"] = overall(r["top1"], results["tokens"])
            r["topk_all"] = overall(r["topk"], results["tokens"])
        results["variants"][variant] = rows
    if use_mergekit:
        results["notes"].append("mergekit rows: gate fit time is mergekit-moe's whole run (load, gates, write).")
    results["notes"].append("lazymoe gate fit time: compute_gates inside a real `lazymoe.merge` run, on CPU "
                            f"with {args.threads} torch thread(s).")
    results["world"] = {"name": world.root.name, "layers": world.spec.num_hidden_layers,
                        "hidden": world.spec.hidden_size, "train_seconds": world.train_seconds}
    results["experts_per_token"] = k
    report = render(results)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"spec": world.spec.__dict__, "losses": world.losses, **results}, indent=1, default=str) + "\n")
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
