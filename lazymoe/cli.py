"""``lazymoe`` command line: every subcommand's flags, the call it makes, and what it prints.

Library code raises :class:`LazyMoEError`; only :func:`main` turns one into a single readable line and exit
status 2. Each handler imports the module it drives when it runs, so ``lazymoe --help`` (and a command that
needs no model) starts without loading torch. To add a subcommand: a ``_add_NAME`` function that registers
its flags and a ``cmd_NAME`` handler, both here.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Literal, get_args, get_origin

from ._version import __version__
from .config import load_config
from .errors import (ConfigError, GGUFError, LazyMoEError, ModelNotFoundError, OutputExistsError, Setting, Words,
                     python_words, worded)
from .gguf.files import find_gguf_files
from .gguf.quants import DEFAULT_QUANTS, OUTTYPES, QUANT_TYPES, parse_quants
from .io.folder import CONFIG_FILENAME, write_text_atomic
from .io.token import env_tokens, redact
from .router.modes import RECOMMENDED_GATE_MODE
from .options import (
    DEFAULT_BENCHMARK_LIMIT,
    DEFAULT_BENCHMARK_TASKS,
    DEFAULT_EVAL_GENERATE_TOKENS,
    DEFAULT_EVAL_MAX_TEXTS,
    DEFAULT_EVAL_MAX_TOKENS,
    DEFAULT_LICENSE,
    MergeOptions,
    cli_fields,
    validated,
)

log = logging.getLogger("lazymoe")


# ------------------------------------------------------------------------------------------ plan, merge, demo


#: the merge options each command takes (flags, defaults and help come from options.MergeOptions)
_PLAN_OPTIONS = ("max_shard_bytes", "layout", "low_disk")
_MERGE_OPTIONS = (*_PLAN_OPTIONS, "device", "overwrite")


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
    from .moe.report import format_plan
    from .notebook.runtime import FREE_COLAB, FREE_COLAB_LABEL, fit_lines, probe
    from .pipeline.merge import make_plan
    from .pipeline.preflight import NotReadyError, blocking, check_ahead, check_gguf_disk, format_checks

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
            print(format_checks(ahead, cli_words(args.command)), file=sys.stderr)
        raise
    if quants is not None:
        ahead.append(check_gguf_disk(plan, quants, disk))
    print(format_plan(plan))
    here = probe(disk)  # where the merge will write
    print("\nFits?")
    for line in fit_lines(plan, [(FREE_COLAB_LABEL, FREE_COLAB),
                                 ("This runtime" + (" (Colab)" if here.in_colab else ""), here)],
                          cli_words(args.command)):
        print(f"  {line}")
    if ahead:
        print()
        print(format_checks(ahead, cli_words(args.command)))
    problems = blocking(ahead)
    if problems:
        raise NotReadyError(f"not ready to merge: {len(problems)} problem(s) marked ✖ above; fix them first "
                            "(or drop --push / --gguf if you will not run those steps).")
    return 0


def _quants(text: str | None) -> list[str] | None:
    return None if text is None else parse_quants(text)


def cmd_merge(args) -> int:
    from .pipeline.merge import merge

    out = merge(_load(args), args.output_dir, **_options(args, _MERGE_OPTIONS).merge_kwargs(), progress=not args.quiet)
    print(f"Merged model written to {out}")
    return 0


def cmd_demo(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo import build_demo
    from .pipeline.merge import merge

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


# ------------------------------------------------------------------------------------------ route


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
    from .pipeline.route import write_routing_picture
    from .publish.card import ROUTING_IMAGE

    report = write_routing_picture(args.model_dir, args.text, device=args.device,
                                   progress=not getattr(args, "quiet", False), update_card=not args.no_card)
    print(report.summary())  # ends with the warnings, if any
    print(f"Routing picture: {Path(args.model_dir) / ROUTING_IMAGE}")
    return 0


# ------------------------------------------------------------------------------------------ eval


def _parse_texts_option(values: list[str]) -> dict[str, str] | None:
    out = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key.strip() or not path.strip():
            raise ConfigError(f"--texts {value!r}: write EXPERT=FILE, e.g. --texts 1=code.txt (index or label).")
        out[key.strip()] = path.strip()
    return out or None


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="did the MoE keep its experts' skills? losses, gain kept and routing per expert",
        description="For each expert, on its evaluation texts (eval_texts in the recipe, --texts, or text the expert "
                    "writes from its positive prompts), measures the loss of the base, the expert and the MoE, the "
                    "share of the expert's gain the MoE keeps and how often those tokens are routed to it, per layer. "
                    "Every model runs one layer at a time. Writes MODEL_DIR/eval.json and eval.png and adds an "
                    "Evaluation section to the card. With --questions, also answers your questions side by side.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--texts", action="append", default=[], metavar="EXPERT=FILE",
                   help="evaluation texts for one expert (index or label), overriding the recipe (repeatable)")
    p.add_argument("--max-texts", type=int, default=DEFAULT_EVAL_MAX_TEXTS, help="texts per expert (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_EVAL_MAX_TOKENS, help="tokens per text (default %(default)s)")
    p.add_argument("--generate-tokens", type=int, default=DEFAULT_EVAL_GENERATE_TOKENS,
                   help="tokens an expert writes per positive prompt when it has no texts (0: skip; default %(default)s)")
    p.add_argument("--download", action="store_true", help="download source models missing from the local cache")
    p.add_argument("--release-downloads", action="store_true",
                   help="with --download: delete each model it downloaded once measured (one on disk at a time)")
    p.add_argument("--questions", metavar="FILE", help="also answer these questions side by side (see lazymoe.evaluate.questions)")
    p.add_argument("--compare", default="moe", help="with --questions: moe, or moe,base or moe,base,experts")
    p.add_argument("--max-new-tokens", type=int, default=96, help="with --questions: answer length (default %(default)s)")
    p.add_argument("--questions-in-card", action="store_true", help="with --questions: show the answers in the card")
    p.add_argument("--tasks", metavar="TASKS",
                   help="also run lm-evaluation-harness tasks (comma-separated, or 'default': "
                        f"{','.join(DEFAULT_BENCHMARK_TASKS)}); needs pip install 'lazymoe[eval]'")
    p.add_argument("--limit", type=int, default=DEFAULT_BENCHMARK_LIMIT, help="with --tasks: documents per task (default %(default)s)")
    p.add_argument("--benchmark-compare", default="moe", help="with --tasks: moe, moe,base or moe,base,experts")
    p.add_argument("--include-path", help="with --tasks: a folder of your own lm_eval task YAML files")
    p.add_argument("--skip-retention", action="store_true", help="only answer --questions and/or run --tasks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-card", action="store_true", help="leave README.md as it is")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluate.benchmarks import parse_tasks, run_benchmarks, write_benchmarks
    from .evaluate.questions import answer_questions, read_questions, write_answers
    from .evaluate.skill import write_evaluation
    from .publish.card import detected_extras, rerender_card
    from .publish.eval_report import EVAL_IMAGE, EVAL_JSON, benchmark_table

    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; give the folder lazymoe merge wrote.")
    texts = _parse_texts_option(args.texts)
    questions = read_questions(Path(args.questions)) if args.questions else None
    progress = not getattr(args, "quiet", False)
    tasks = parse_tasks(args.tasks) if args.tasks else None
    if args.skip_retention and questions is None and tasks is None:
        raise ConfigError("--skip-retention leaves nothing to do without --questions FILE or --tasks.")
    if not args.skip_retention:
        report = write_evaluation(folder, texts=texts, max_texts=args.max_texts, max_tokens=args.max_tokens,
                                  generate_tokens=args.generate_tokens, download=args.download,
                                  release=args.release_downloads, device=args.device,
                                  progress=progress, update_card=not args.no_card)
        print(report.summary())
        print(f"Wrote {folder / EVAL_JSON} and {folder / EVAL_IMAGE}")
    if tasks is not None:
        result = run_benchmarks(folder, tasks, limit=args.limit, compare=args.benchmark_compare,
                                include_path=args.include_path, download=args.download, release=args.release_downloads)
        path = write_benchmarks(folder, result)
        if not args.no_card:
            rerender_card(folder, **detected_extras(folder))
        table = benchmark_table(result)
        widths = [max(len(str(r[i])) for r in [table["header"], *table["rows"]]) for i in range(len(table["header"]))]
        for row in [table["header"], *table["rows"]]:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for item in table["skipped"]:
            print(f"skipped: {item}")
        print(f"Wrote {path}")
    if questions is not None:
        result = answer_questions(folder, questions, compare=args.compare, max_new_tokens=args.max_new_tokens,
                                  download=args.download, release=args.release_downloads)
        md, js = write_answers(folder, result, in_card=args.questions_in_card)
        if not args.no_card:
            rerender_card(folder, **detected_extras(folder))
        print(md.read_text(encoding="utf-8"))
        print(f"Wrote {md} and {js}")
    return 0


# ------------------------------------------------------------------------------------------ card


def _add_card(sub) -> None:
    p = sub.add_parser(
        "card", help="(re)write README.md of a merged model folder from its files",
        description="Render the model card (README.md) of a folder built by lazymoe merge from config.json, "
                    f"{CONFIG_FILENAME} and the safetensors headers. With --gguf-of, DIR is a folder of GGUF "
                    "files and the card is the one of its NAME-GGUF repo.",
    )
    p.add_argument("model_dir", metavar="DIR", help="the merged model folder (or, with --gguf-of, the GGUF folder)")
    p.add_argument("--name", dest="model_name", help="title of the card (default: the repo or folder name)")
    p.add_argument("--license", help=f"license id for the metadata (default: {DEFAULT_LICENSE})")
    p.add_argument("--repo-id", help="Hub repo the model is pushed to, e.g. me/MyMoE-4x7B (used in the usage code)")
    p.add_argument("--gguf-dir", help="folder of NAME.QUANT.gguf files to list in a GGUF section")
    p.add_argument("--gguf-repo", help="Hub repo holding those GGUF files (default: REPO_ID-GGUF)")
    p.add_argument("--routing-image", help="image inside the model folder showing the routing, e.g. routing.png")
    p.add_argument("--gguf-of", metavar="MERGED_REPO",
                   help="write the card of the GGUF repo in DIR, quantised from MERGED_REPO")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    p.set_defaults(func=cmd_card)


def cmd_card(args) -> int:
    from .publish.card import CARD_FILENAME, build_card, gguf_card_data
    from .publish.render import render_gguf_card

    folder = Path(args.model_dir)
    if args.gguf_of:
        data = gguf_card_data(find_gguf_files(folder), base_repo_id=args.gguf_of, repo_id=args.repo_id,
                              model_name=args.model_name, license=args.license)
        text = render_gguf_card(data)
    else:
        text = build_card(folder, model_name=args.model_name, license=args.license, repo_id=args.repo_id,
                          gguf_repo=args.gguf_repo, gguf_files=args.gguf_dir, routing_image=args.routing_image)
    if args.stdout:
        print(text, end="")
    else:
        print(f"Wrote {write_text_atomic(folder / CARD_FILENAME, text)}")
    return 0


# ------------------------------------------------------------------------------------------ push


def _add_push(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a merged model folder to the Hugging Face Hub",
        description="Upload a finished model folder to the Hub. Run it again to resume an interrupted upload.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", type=Path, help="folder written by `lazymoe merge`")
    p.add_argument("repo", metavar="REPO", help="'name' (in your own namespace) or 'namespace/name'")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument(
        "--token",
        default=None,
        help="Hub token with write access (default: HF_TOKEN, then your saved login). A token typed on the "
        "command line ends up in your shell history: prefer HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("--commit-message", default=None, help="message of the upload commit")
    p.add_argument("--gguf-of", dest="base_repo_id", default=None, metavar="MERGED_REPO",
                   help="for a folder of GGUF files: the merged model's repo they quantise "
                        "(default: REPO without its -GGUF suffix)")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from .publish.hub import push_to_hub

    pushed = push_to_hub(
        args.model_dir,
        args.repo,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        progress=not getattr(args, "quiet", False),  # the CLI's global -q
        base_repo_id=args.base_repo_id,
    )
    print(f"Pushed {args.model_dir} to {pushed.url}")
    return 0


def _add_publish(sub) -> None:
    p = sub.add_parser(
        "publish", help="upload a merged model and (with --gguf) its GGUF files, each with its card",
        description="Upload MODEL_DIR to REPO, then with --gguf convert it to GGUF, quantise it, list the files on "
                    "its card and upload them to REPO-GGUF with their own card: what the notebook's Upload and "
                    "GGUF steps do. Without REPO, --gguf makes the files and updates the local card only.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("repo", metavar="REPO", nargs="?", help="'name' (in your own namespace) or 'namespace/name'")
    p.add_argument("--gguf", action="store_true", help="also make GGUF files (needs llama-cpp-python)")
    p.add_argument("--quant", dest="quants", default=",".join(DEFAULT_QUANTS),
                   help=f"with --gguf: comma-separated quantisations (default {','.join(DEFAULT_QUANTS)})")
    p.add_argument("--private", action="store_true", help="create the repos private")
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN, then your saved "
                                                 "login); prefer those to a token in your shell history")
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    from .pipeline.release import release

    if not args.repo and not args.gguf:
        raise ConfigError("Nothing to publish: give a REPO to upload to, --gguf to make GGUF files, or both.")
    done = release(args.model_dir, args.repo, gguf=args.gguf, quants=args.quants, private=args.private,
                   token=args.token, progress=not getattr(args, "quiet", False))
    if done.model:
        print(f"Pushed {args.model_dir} to {done.model.url}")
    for path in done.gguf_files:
        print(f"{path}  ({path.stat().st_size / 1e6:,.1f} MB)")
    if done.gguf:
        print(f"Pushed the GGUF files to {done.gguf.url}")
    return 0


# ------------------------------------------------------------------------------------------ gguf, chat


def _add_gguf(sub) -> None:
    p = sub.add_parser("gguf", help="convert a merged model to GGUF and quantise it (llama.cpp)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--quant", dest="quants", default=",".join(DEFAULT_QUANTS),
                   help=f"comma-separated, 'all' or 'none' (default {','.join(DEFAULT_QUANTS)}); "
                        f"menu: {','.join(QUANT_TYPES)}")
    p.add_argument("--outdir", help="where to write (default: MODEL_DIR-GGUF beside the model)")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="unquantised file type (default f16)")
    p.add_argument("--threads", type=int, help="quantiser threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="rebuild files that already exist")
    p.set_defaults(func=cmd_gguf)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="answer prompts with a GGUF file (one per expert by default, or "
                                    "a conversation with -i)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("gguf_file", metavar="GGUF_FILE", help="a .gguf file written by `lazymoe gguf`")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: type messages, the model answers with the conversation so far")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per expert, built from "
                                                      f"its positive prompts in {CONFIG_FILENAME}")
    p.add_argument("--config", help=f"the {CONFIG_FILENAME} to build per-expert prompts from "
                                    "(default: beside the GGUF file or its parent)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU (-1: all, when the build has one)")
    p.add_argument("--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length, in tokens")
    p.set_defaults(func=cmd_chat)


def cmd_gguf(args) -> int:
    from .gguf.convert import convert_to_gguf

    paths = convert_to_gguf(args.model_dir, args.outdir, outtype=args.outtype, quants=args.quants,
                            threads=args.threads, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    for path in paths:
        print(f"{path}  ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


def cmd_chat(args) -> int:
    from .gguf.llama import chat, chat_loop, expert_prompts, find_config_for

    gguf_file = Path(args.gguf_file)
    if getattr(args, "interactive", False):  # a Namespace built in code may not have it
        chat_loop(gguf_file, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads, max_tokens=args.max_tokens,
                  n_ctx=args.n_ctx)
        return 0
    if args.prompt:
        labelled = [(None, p) for p in args.prompt]
    else:
        config = Path(args.config) if args.config else find_config_for(gguf_file)
        if config is None:
            raise GGUFError(f"no --prompt given and no {CONFIG_FILENAME} beside {gguf_file} to build one prompt per "
                            "expert from; pass --prompt TEXT or --config PATH.")
        labelled = expert_prompts(config)
    replies = chat(gguf_file, [p for _, p in labelled], n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                   max_tokens=args.max_tokens, n_ctx=args.n_ctx)
    for (expert, prompt), reply in zip(labelled, replies):
        print(f"--- {'expert ' + expert + ': ' if expert else ''}{prompt}\n{reply.strip()}\n")
    return 0


# ------------------------------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazymoe", description="Build Mixture-of-Experts models from dense LLMs.")
    parser.add_argument("--version", action="version", version=f"lazymoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="build tiny local experts and merge them offline (under a minute)")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="work folder: inputs/ (the tiny models, demo.yaml) "
                                                              "and merged/ (the MoE) are written here")
    p.add_argument("--overwrite", action="store_true", help="rebuild a demo made earlier in OUTPUT_DIR")
    p.set_defaults(func=cmd_demo)

    _add_route(sub)
    _add_eval(sub)
    _add_card(sub)
    _add_push(sub)
    _add_publish(sub)
    _add_gguf(sub)
    _add_chat(sub)
    for command in sub.choices.values():  # -q / -v work after the subcommand too (`lazymoe demo DIR -q`)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    return parser


@functools.cache
def _options_by_dest(command: str | None) -> dict[str, argparse.Action]:
    """Every option of every command by the name it stores (a dest is the Python keyword it stands for), the
    options of ``command`` winning over other commands'."""
    commands = build_parser()._subparsers._group_actions[0].choices  # argparse keeps its subcommands here
    found: dict[str, argparse.Action] = {}
    for name in sorted(commands, key=lambda c: c == command):  # ``command`` last: its options win
        found.update({a.dest: a for a in commands[name]._actions if a.option_strings})
    return found


def cli_words(command: str | None = None) -> Words:
    """The CLI's words for a setting a message names: its flag (``add --overwrite``, ``add --token TOKEN``)."""

    def words(setting: Setting) -> str:
        action = _options_by_dest(command).get(setting.name)
        if action is None:  # a setting no command has a flag for: the library's own words
            return python_words(setting)
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if setting.noun:
            return f"your {flag} argument"
        if action.nargs == 0:  # a switch
            return f"add {flag}" if setting.value else f"leave out {flag}"
        value = action.metavar or action.dest.upper() if setting.value is ... else setting.value
        return f"add {flag} {value}"

    return words


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except LazyMoEError as err:
        # one line, whatever the message holds (a model name or path may carry a newline)
        message = worded(err, cli_words(args.command))  # each setting it names as this command's flag
        print(f"error: {' '.join(redact(message, [getattr(args, 'token', None), *env_tokens()]).split())}",
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
