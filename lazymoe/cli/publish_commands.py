"""``lazymoe card``, ``push``, ``publish``, ``gguf`` and ``chat``: the card, the Hub, llama.cpp files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError, GGUFError, OutputExistsError, Setting, Text
from ..gguf.files import find_gguf_files
from ..gguf.quants import DEFAULT_QUANTS, OUTTYPES, QUANT_TYPES
from ..io.folder import CONFIG_FILENAME
from ..options import DEFAULT_LICENSE, LLAMA_MAX_THREADS


def add(sub) -> None:
    """Register card, push, publish, gguf and chat."""
    _add_card(sub)
    _add_push(sub)
    _add_publish(sub)
    _add_gguf(sub)
    _add_chat(sub)


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
    # dest: the library's name for it, so a message naming base_repo_id says --gguf-of
    p.add_argument("--gguf-of", dest="base_repo_id", metavar="MERGED_REPO",
                   help="write the card of the GGUF repo in DIR, quantised from MERGED_REPO")
    p.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a README.md that was edited by hand since lazymoe wrote it")
    p.set_defaults(func=cmd_card)


def cmd_card(args) -> int:
    from ..publish.card import CARD_FILENAME, build_card, card_kept_because, write_card_text
    from ..publish.gguf_card import build_gguf_card

    folder = Path(args.model_dir)
    if args.base_repo_id:
        text = build_gguf_card(find_gguf_files(folder), base_repo_id=args.base_repo_id, repo_id=args.repo_id,
                               model_name=args.model_name, license=args.license)
    else:
        text = build_card(folder, model_name=args.model_name, license=args.license, repo_id=args.repo_id,
                          gguf_repo=args.gguf_repo, gguf_files=args.gguf_dir, routing_image=args.routing_image)
    if args.stdout:
        print(text, end="")
        return 0
    kept = card_kept_because(folder)  # a merged model's card or a NAME-GGUF folder's alike
    if kept and not args.overwrite:
        replace = Setting("overwrite", True)
        raise OutputExistsError(Text(
            f"{folder / CARD_FILENAME} {kept}; {replace.placeholder} to replace it "
            "with lazymoe's card (print it instead with --stdout).", (replace,)))
    print(f"Wrote {write_card_text(folder, text)}")
    return 0


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
    from ..publish.hub import push_to_hub

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
    from ..pipeline.release import release

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


def _add_gguf(sub) -> None:
    p = sub.add_parser("gguf", help="convert a merged model to GGUF and quantise it (llama.cpp)")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="folder written by `lazymoe merge`")
    p.add_argument("--quant", dest="quants", default=",".join(DEFAULT_QUANTS),
                   help=f"comma-separated, 'all' or 'none' (default {','.join(DEFAULT_QUANTS)}); "
                        f"menu: {','.join(QUANT_TYPES)}")
    p.add_argument("--outdir", help="where to write (default: MODEL_DIR-GGUF beside the model)")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="unquantised file type (default f16)")
    p.add_argument("--threads", type=int, help=f"quantiser threads, at most {LLAMA_MAX_THREADS} (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="rebuild files that already exist")
    p.set_defaults(func=cmd_gguf)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="answer prompts with a GGUF file (one per expert by default, or "
                                    "a conversation with -i)", formatter_class=_DefaultsShown)
    p.add_argument("gguf_file", metavar="GGUF_FILE", help="a .gguf file written by `lazymoe gguf`")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="a conversation: type messages, the model answers with the conversation so far")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per expert, built from "
                                                      f"its positive prompts in {CONFIG_FILENAME}")
    p.add_argument("--config", help=f"the {CONFIG_FILENAME} to build per-expert prompts from "
                                    "(default: beside the GGUF file or its parent)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--n-gpu-layers", type=int, default=-1, help="layers on the GPU (-1: all, when the build has one)")
    p.add_argument("--threads", dest="n_threads", type=int, metavar="N",
                   help=f"CPU threads, at most {LLAMA_MAX_THREADS} (default: half the cores)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context length, in tokens")
    p.set_defaults(func=cmd_chat)


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, except where there is none to show (its help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def cmd_gguf(args) -> int:
    from ..gguf.convert import convert_to_gguf

    paths = convert_to_gguf(args.model_dir, args.outdir, outtype=args.outtype, quants=args.quants,
                            threads=args.threads, progress=not getattr(args, "quiet", False), overwrite=args.overwrite)
    for path in paths:
        print(f"{path}  ({path.stat().st_size / 1e6:,.1f} MB)")
    return 0


def cmd_chat(args) -> int:
    from ..gguf.llama import chat, chat_loop, expert_prompts, find_config_for

    gguf_file = Path(args.gguf_file)
    if getattr(args, "interactive", False):  # a Namespace built in code may not have it
        chat_loop(gguf_file, n_gpu_layers=args.n_gpu_layers, n_threads=args.n_threads, max_tokens=args.max_tokens,
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
    replies = chat(gguf_file, [p for _, p in labelled], n_gpu_layers=args.n_gpu_layers, n_threads=args.n_threads,
                   max_tokens=args.max_tokens, n_ctx=args.n_ctx)
    for (expert, prompt), reply in zip(labelled, replies):
        print(f"--- {'expert ' + expert + ': ' if expert else ''}{prompt}\n{reply.strip()}\n")
    return 0
