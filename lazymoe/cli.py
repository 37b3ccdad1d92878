"""``lazymoe`` command line: plan, merge, demo (and the commands other modules register).

Library code raises :class:`LazyMoEError`; only this wrapper turns one into a single readable line
and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import LazyMoEError, OutputExistsError
from .hub_token import env_tokens, redact
from .plan import DEFAULT_MAX_SHARD_BYTES

log = logging.getLogger("lazymoe")


def _add_merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), metavar="BYTES",
                   help="largest shard, in bytes with a unit: 2GB (default), 500MB, 1.5GiB")
    p.add_argument("--layout", choices=("classic", "fused"), default="classic",
                   help="classic: block_sparse_moe.experts.E.w1/w2/w3, read by every consumer (default); "
                        "fused: transformers-5 native mlp.experts.gate_up_proj, not read by llama.cpp")
    p.add_argument("--low-disk", action="store_true",
                   help="write experts one source model at a time and delete each downloaded expert once written "
                        "(disk: output + two models instead of output + all models)")
    p.add_argument("--allow-all-same-experts", "--i-understand-this-is-not-useful-without-training",
                   action="store_true", dest="allow_all_same",
                   help="allow every expert to be the same model (only useful if you train afterwards)")


def _load(args):
    from .config import load_config

    config = load_config(Path(args.config))
    if args.allow_all_same:
        config = config.model_copy(update={"allow_all_same_experts": True})
    return config


def cmd_plan(args) -> int:
    from .merge import make_plan
    from .preflight import NotReadyError, blocking, check_ahead, check_gguf_disk, format_checks
    from .report import format_plan
    from .ui_runtime import FREE_COLAB, FREE_COLAB_LABEL, fit_lines, probe

    config = _load(args)  # a broken recipe first: it is the cheapest thing to check
    quants = _quants(args.gguf)
    disk = Path(args.output_dir).parent if args.output_dir else Path.cwd()
    # the later steps' needs (token, repo, llama.cpp) take seconds: before any model header is read
    ahead = check_ahead(push_repo=args.push, private=args.private, token=args.token, gguf_quants=quants,
                        disk_path=disk)
    try:
        plan = make_plan(config, max_shard_bytes=args.max_shard_size, layout=args.layout, low_disk=args.low_disk,
                         progress=not args.quiet)
    except LazyMoEError:
        if ahead:
            print(format_checks(ahead), file=sys.stderr)
        raise
    if quants is not None:
        ahead.append(check_gguf_disk(plan, quants, disk))
    print(format_plan(plan))
    here = probe(disk)  # where the merge will write
    print("\nFits?")
    for line in fit_lines(plan, [(FREE_COLAB_LABEL, FREE_COLAB),
                                 ("This runtime" + (" (Colab)" if here.in_colab else ""), here)]):
        print(f"  {line}")
    if ahead:
        print()
        print(format_checks(ahead))
    problems = blocking(ahead)
    if problems:
        raise NotReadyError(f"not ready to merge: {len(problems)} problem(s) marked ✖ above; fix them first "
                            "(or drop --push / --gguf if you will not run those steps).")
    return 0


def _quants(text: str | None) -> list[str] | None:
    if text is None:
        return None
    from .gguf import parse_quants

    return parse_quants(text)


def cmd_merge(args) -> int:
    from .merge import merge

    out = merge(_load(args), args.output_dir, max_shard_bytes=args.max_shard_size, layout=args.layout,
                low_disk=args.low_disk, device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    print(f"Merged model written to {out}")
    return 0


def cmd_demo(args) -> int:
    from .config import RECOMMENDED_GATE_MODE
    from .demo import build_demo
    from .merge import merge

    work = Path(args.output_dir)
    merged, gguf_dir = work / "merged", work / "merged-GGUF"
    if merged.exists() and not args.overwrite:
        raise OutputExistsError(f"{merged} already holds a merged demo from an earlier run. Run `lazymoe demo "
                                f"{work} --overwrite` to rebuild it (its {gguf_dir.name} folder goes too), or give "
                                "another folder.")
    config_path = build_demo(work / "inputs", gate_mode=RECOMMENDED_GATE_MODE)  # as the notebook demo's preset
    print(f"Built tiny local experts and {config_path}")
    out = merge(config_path, merged, overwrite=True, progress=not args.quiet)
    if gguf_dir.is_dir() and all(p.suffix in (".gguf", ".md") for p in gguf_dir.iterdir()):
        shutil.rmtree(gguf_dir)  # GGUF files of the model just replaced: stale, and its card would say otherwise
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymoe", description="Build Mixture-of-Experts models from dense LLMs.")
    parser.add_argument("--version", action="version", version=f"lazymoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show what a config will build, reading only configs and headers")
    p.add_argument("config", help="mergekit-moe YAML config")
    _add_merge_options(p)
    later = p.add_argument_group("later steps", "check now, before any download, what the upload and GGUF "
                                                "steps you mean to run will need")
    later.add_argument("--push", metavar="REPO", default=None,
                       help="you will push to REPO ('name' or 'namespace/name'): check the token may write there, "
                            "the name is valid and free (or an earlier lazymoe upload)")
    later.add_argument("--private", action="store_true", help="with --push: the repo will be private")
    later.add_argument("--token", default=None, help="with --push: the token to check (default: HF_TOKEN, then "
                                                     "your saved login)")
    later.add_argument("--gguf", metavar="QUANTS", nargs="?", const="Q4_K_M", default=None,
                       help="you will make GGUF files (e.g. Q4_K_M,Q5_K_M; default Q4_K_M): check llama-cpp-python "
                            "and the disk for them")
    later.add_argument("--output-dir", default=None, metavar="DIR",
                       help="where the merge will write (for the disk check; default: here)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="build the MoE into OUTPUT_DIR")
    p.add_argument("config", help="mergekit-moe YAML config")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write the merged model into (made if missing)")
    _add_merge_options(p)
    p.add_argument("--device", default="auto", help="device for the hidden-state router pass: auto, cpu, cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier lazymoe output in OUTPUT_DIR")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="build tiny local experts and merge them offline (under a minute)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="work folder: inputs/ (the tiny models, demo.yaml) "
                                                              "and merged/ (the MoE) are written here")
    p.add_argument("--overwrite", action="store_true", help="rebuild a demo made earlier in OUTPUT_DIR")
    p.set_defaults(func=cmd_demo)

    # commands that live beside the module they drive
    from .card import add_card_parser
    from .eval_cli import add_eval_parser
    from .gguf import add_gguf_parsers
    from .hub import add_push_parser
    from .routing import add_route_parser

    add_route_parser(sub)
    add_eval_parser(sub)
    add_card_parser(sub)
    add_push_parser(sub)
    add_gguf_parsers(sub)
    for command in sub.choices.values():  # -q / -v work after the subcommand too (`lazymoe demo DIR -q`)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except LazyMoEError as err:
        # one line, whatever the message holds (a model name or path may carry a newline)
        print(f"error: {' '.join(redact(str(err), [getattr(args, 'token', None), *env_tokens()]).split())}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output folder was left behind", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: show the traceback, but never a token that some message may carry
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        print(redact(text, [getattr(args, "token", None), *env_tokens()]), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
