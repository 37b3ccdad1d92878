"""``lazymoe eval``: skills kept per expert, the user's questions side by side, lm-evaluation-harness tasks."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, ModelNotFoundError
from ..options import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_BENCHMARK_LIMIT,
    DEFAULT_BENCHMARK_TASKS,
    DEFAULT_EVAL_GENERATE_TOKENS,
    DEFAULT_EVAL_MAX_TEXTS,
    DEFAULT_EVAL_MAX_TOKENS,
    check_count,
)


def add(sub) -> None:
    """Register eval."""
    _add_eval(sub)


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
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_ANSWER_TOKENS, help="with --questions: answer length (default %(default)s)")
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
    from ..evaluate.benchmarks import check_benchmarks, parse_tasks, run_benchmarks, write_benchmarks
    from ..evaluate.questions import answer_questions, check_questions, read_questions, write_answers
    from ..evaluate.skill import write_evaluation
    from ..publish.card import detected_extras, rerender_card
    from ..publish.eval_report import EVAL_IMAGE, EVAL_JSON, benchmark_table

    folder = Path(args.model_dir)
    check_count("generate_tokens", args.generate_tokens)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; give the folder lazymoe merge wrote.")
    texts = _parse_texts_option(args.texts)
    questions = read_questions(Path(args.questions)) if args.questions else None
    progress = not getattr(args, "quiet", False)
    tasks = parse_tasks(args.tasks) if args.tasks else None
    if args.skip_retention and questions is None and tasks is None:
        raise ConfigError("--skip-retention leaves nothing to do without --questions FILE or --tasks.")
    # every later step's options are checked now, not after minutes of measuring skills
    if questions is not None:
        check_questions(folder, questions, compare=args.compare, max_new_tokens=args.max_new_tokens)
    if tasks is not None:
        check_benchmarks(tasks, limit=args.limit, compare=args.benchmark_compare, include_path=args.include_path)
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
