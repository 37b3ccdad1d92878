"""``lazymoe plan``, ``merge``, ``demo`` and ``route``: from a recipe to a merged folder and its routing picture."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from ..config import load_config
from ..errors import ConfigError, LazyMoEError, OutputExistsError, python_words
from ..gguf.files import gguf_dir_of
from ..gguf.quants import DEFAULT_QUANTS, parse_quants
from ..io.folder import CARD_FILENAME, CARD_RECORD, CONFIG_FILENAME, card_edited
from ..options import MergeOptions, cli_fields, validated
from ..router.modes import RECOMMENDED_GATE_MODE


def add(sub) -> None:
    """Register plan, merge, demo and route."""
    p = sub.add_parser("plan", help="show what a config will build, reading only configs and headers")
    p.add_argument("config", help="mergekit-moe YAML config")
    _add_merge_options(p, _PLAN_OPTIONS)
    later = p.add_argument_group("later steps", "check now, before any download, what the upload and GGUF "
                                                "steps you mean to run will need")
    later.add_argument("--push", metavar="REPO", default=None,
                       help="you will push to REPO ('name' or 'namespace/name'): check the token may write there, "
                            "the name is valid and free (or an earlier lazymoe upload)")
    later.add_argument("--private", action="store_true", help="with --push: the repo will be private")
    later.add_argument("--token", default=None, help="with --push: the token to check (default: HF_TOKEN, then "
                                                     "your saved login)")
    later.add_argument("--gguf", metavar="QUANTS", nargs="?", const=DEFAULT_QUANTS[0], default=None,
                       help=f"you will make GGUF files (e.g. {','.join(DEFAULT_QUANTS)}; default {DEFAULT_QUANTS[0]}): "
                            "check llama-cpp-python and the disk for them")
    later.add_argument("--output-dir", default=None, metavar="DIR",
                       help="where the merge will write (for the disk check; default: here)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="build the MoE into OUTPUT_DIR")
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write the merged model into (made if missing)")
    _add_merge_options(p, _MERGE_OPTIONS)
    hub = p.add_argument_group("upload while merging")
    hub.add_argument("--push", metavar="REPO", default=None,
                     help="upload each shard to REPO ('name' or 'namespace/name') as soon as it is written, then make "
                          "one commit with everything: the repo never shows half a model. Re-run after an "
                          "interruption: shards the Hub already received are not sent again (with --no-keep, "
                          "neither fetched nor built again)")
    hub.add_argument("--no-keep", dest="keep", action="store_false",
                     help="with --push: delete each shard once uploaded (disk: about three shards instead of the "
                          "whole model; OUTPUT_DIR keeps config, tokenizer and card)")
    hub.add_argument("--private", action="store_true", help="with --push: create the repo private")
    hub.add_argument("--token", default=None, help="with --push: Hub token with write access (default: HF_TOKEN, "
                                                   "then your saved login)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="build tiny local experts and merge them offline (under a minute)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="work folder: inputs/ (the tiny models, demo.yaml) "
                                                              "and merged/ (the MoE) are written here")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a demo made earlier in OUTPUT_DIR (only the files it wrote; never files of yours)")
    p.set_defaults(func=cmd_demo)

    _add_route(sub)


#: the merge options each command takes (flags, defaults and help come from options.MergeOptions)
_PLAN_OPTIONS = ("max_shard_bytes", "layout", "low_disk", "overwrite")  # overwrite: with --output-dir
_MERGE_OPTIONS = (*_PLAN_OPTIONS, "device")


def _add_merge_options(p: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    for name, info, cli in cli_fields(MergeOptions, names):
        flag = cli.pop("flag")
        if info.annotation is bool:
            p.add_argument(flag, action="store_true", dest=name, help=info.description)
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else None
        p.add_argument(flag, dest=name, default=info.default, choices=choices, help=info.description, **cli)
    p.add_argument("--allow-all-same-experts", "--i-understand-this-is-not-useful-without-training",
                   action="store_true", dest="allow_all_same_experts",
                   help="allow every expert to be the same model (only useful if you train afterwards)")


def _options(args, names: tuple[str, ...]) -> MergeOptions:
    flags = {name: cli["flag"] + ":" for name, _, cli in cli_fields(MergeOptions, names)}
    return validated(MergeOptions, {name: getattr(args, name) for name in names}, flags)


def _load(args):
    config = load_config(Path(args.config))
    if args.allow_all_same_experts:
        config = config.model_copy(update={"allow_all_same_experts": True})
    return config


def cmd_plan(args) -> int:
    from ..moe.report import format_plan
    from ..runtime.fit import fit_verdicts
    from ..runtime.machine import probe
    from ..pipeline.merge import check_output_dir, make_plan
    from ..pipeline.preflight import NotReadyError, blocking, check_ahead, check_gguf_disk, format_checks

    config = _load(args)  # a broken recipe first: it is the cheapest thing to check
    options = _options(args, _PLAN_OPTIONS)
    quants = _quants(args.gguf)
    disk = Path(args.output_dir).parent if args.output_dir else Path.cwd()
    # the later steps' needs (token, repo, llama.cpp) take seconds: before any model header is read
    ahead = check_ahead(push_repo=args.push, private=args.private, token=args.token, gguf_quants=quants,
                        disk_path=disk)
    try:
        plan = make_plan(config, max_shard_bytes=options.max_shard_bytes, layout=options.layout,
                         low_disk=options.low_disk, progress=not args.quiet)
    except LazyMoEError:
        if ahead:
            print(format_checks(ahead, getattr(args, "words", python_words)), file=sys.stderr)
        raise
    if args.output_dir:  # what the merge would refuse about its folder, said now
        check_output_dir(args.output_dir, plan, overwrite=options.overwrite)
    if quants is not None:
        ahead.append(check_gguf_disk(plan, quants, disk))
    print(format_plan(plan))
    here = probe(disk)  # where the merge will write
    print("\nFits?")
    for verdict in fit_verdicts(plan, here):
        print(f"  {verdict}")
    if ahead:
        print()
        print(format_checks(ahead, getattr(args, "words", python_words)))
    problems = blocking(ahead)
    if problems:
        raise NotReadyError(f"not ready to merge: {len(problems)} problem(s) marked ✖ above; fix them first "
                            "(or drop --push / --gguf if you will not run those steps).")
    return 0


def _quants(text: str | None) -> list[str] | None:
    return None if text is None else parse_quants(text)


def cmd_merge(args) -> int:
    from ..pipeline.merge import merge, merge_and_push

    options = _options(args, _MERGE_OPTIONS).merge_kwargs()
    if args.push is None:
        if not args.keep:
            raise ConfigError("--no-keep deletes each shard once it is uploaded: it needs --push REPO.")
        out = merge(_load(args), args.output_dir, **options, progress=not args.quiet)
        print(f"Merged model written to {out}")
        return 0
    out, pushed = merge_and_push(_load(args), args.output_dir, args.push, keep=args.keep, private=args.private,
                                 token=args.token, **options, progress=not args.quiet)
    where = f"written to {out}" if args.keep else f"small files kept in {out}; the shards are on the Hub only"
    print(f"Merged model pushed to {pushed.url} in one commit ({where})")
    return 0


def cmd_demo(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..demo import build_demo
    from ..pipeline.merge import merge

    work = Path(args.output_dir)
    merged = work / "merged"
    gguf_dir = gguf_dir_of(merged)
    if merged.exists() and not args.overwrite:
        raise OutputExistsError(f"{merged} already holds a merged demo from an earlier run. Run `lazymoe demo "
                                f"{work} --overwrite` to rebuild it (the GGUF files made from it in {gguf_dir.name} "
                                "go too), or give another folder.")
    # the demo's own files only, never the user's; inputs without a merged model are a run that was stopped (Ctrl-C
    # during the merge, whose output is all or nothing), so they are rebuilt without asking for --overwrite
    config_path = build_demo(work / "inputs", overwrite=args.overwrite or not merged.exists(),
                             gate_mode=RECOMMENDED_GATE_MODE)  # as the notebook demo's preset
    print(f"Built tiny local experts and {config_path}")
    out = merge(config_path, merged, overwrite=True, progress=not args.quiet)
    if gguf_dir.is_dir():
        # the GGUF files of the model just replaced are stale (and `lazymoe gguf` would reuse them): the files that
        # step wrote go (and the card publish wrote, unless edited by hand), and the folder with them when nothing
        # else (an edited card, files of the user's) is left in it
        stale = [*gguf_dir.glob(f"{out.name}.*.gguf"), gguf_dir / CONFIG_FILENAME]
        if not card_edited(gguf_dir):
            stale += [gguf_dir / CARD_FILENAME, gguf_dir / CARD_RECORD]
        for path in stale:
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            gguf_dir.rmdir()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("def add(a, b):", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    print(f"Merged {type(model).__name__} at {out}\nSample (tiny random-ish model, not meant to be smart): {text!r}")
    print(f"""
Next steps:
  lazymoe route {out}                      # which experts each layer picks: routing.png in the folder
  lazymoe gguf {out} --quant Q8_0          # llama.cpp files in {gguf_dir}
  lazymoe chat {gguf_dir / (out.name + '.Q8_0.gguf')}   # one prompt per expert through llama.cpp
  lazymoe plan {config_path}   # a recipe's sizes and problems; edit a copy for your own models""")
    return 0


def _add_route(sub) -> None:
    p = sub.add_parser(
        "route", help="draw which experts each layer picks for the recipe's prompts (routing.png + card)",
        description="Runs each expert's positive prompts (and any --text) through the merged model one layer at "
                    "a time, writes MODEL_DIR/routing.png, prints per-expert routing and warns when routing is "
                    "degenerate. The model card is re-rendered to embed the picture.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--text", action="append", default=[], help="extra text to route (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-card", action="store_true", help="leave README.md as it is")
    p.set_defaults(func=cmd_route)


def cmd_route(args) -> int:
    from ..pipeline.route import write_routing_picture
    from ..publish.card import ROUTING_IMAGE

    report = write_routing_picture(args.model_dir, args.text, device=args.device,
                                   progress=not getattr(args, "quiet", False), update_card=not args.no_card)
    print(report.summary())  # ends with the warnings, if any
    print(f"Routing picture: {Path(args.model_dir) / ROUTING_IMAGE}")
    return 0
