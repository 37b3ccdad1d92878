"""``lazymoe`` command line: every subcommand's flags, the call it makes, and what it prints.

One module per group of subcommands: ``build_commands`` (plan, merge, demo, route), ``eval_commands`` (eval)
and ``publish_commands`` (card, push, publish, gguf, chat). Library code raises :class:`LazyMoEError`; only :func:`main` turns one into
a single readable line and exit status 2. Each handler imports the module it drives when it runs, so
``lazymoe --help`` (and a command that needs no model) starts without loading torch. To add a subcommand: a
``_add_NAME`` function that registers its flags and a ``cmd_NAME`` handler in its group's module.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

from .. import lazy
from .._version import __version__
from ..errors import LazyMoEError, Setting, Words, error_line, python_words, worded
from ..io.outdir import DISK_FULL, disk_full_error
from ..io.token import env_tokens, redact
from . import build_commands, eval_commands, publish_commands

log = logging.getLogger("lazymoe")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a value starting with a minus and a digit is always a value: ``--max-shard-size
    -5GB`` reaches the size check and its one line, as ``--max-shard-size=-5GB`` does, instead of argparse taking
    ``-5GB`` for a flag and printing its usage. No lazymoe flag starts with a digit, so nothing is lost."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")  # argparse's own test, widened (every subparser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lazymoe", description="Build Mixture-of-Experts models from dense LLMs.")
    parser.add_argument("--version", action="version", version=f"lazymoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    for group in (build_commands, eval_commands, publish_commands):  # the subcommands in the order --help lists them
        group.add(sub)
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


#: what Ctrl-C leaves, said after "interrupted" for the commands that write something whole or not at all
_INTERRUPTED = {
    "merge": ": no output folder was left behind",
    "push": ": nothing was committed to the Hub; run the same command again to resume the upload",
    "publish": ": each upload is one commit, so the Hub shows nothing half-done; run the same command again to finish",
    "gguf": ": no half-written GGUF file was kept",
}


def run() -> None:
    """The ``lazymoe`` command (and ``python -m lazymoe``): :func:`main`, then :func:`exit_now`."""
    lazy.own_process()  # the process is ours: the heavy imports' objects are frozen, not walked again
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process once the work is done, without the interpreter's teardown of every module and object:
    once torch and transformers are loaded, that teardown alone takes about a second. Exit handlers still
    run first (logging is flushed, temporary folders go) and the standard streams are flushed. If a thread
    that the interpreter would wait for is still running, exit the usual way, which waits for it."""
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done: a late Ctrl-C must not break a handler
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.words = cli_words(args.command)  # a handler that prints a message naming a setting words it so
    if getattr(args, "quiet", False):
        # before huggingface_hub or transformers is imported: their own bars (downloads, "Loading weights")
        # read this once, at import
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except LazyMoEError as err:
        # one line, whatever the message holds (a model name or path may carry a newline)
        message = worded(err, args.words)  # each setting it names as this command's flag
        print(error_line(redact(message, [getattr(args, "token", None), *env_tokens()])), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{_INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # what reads the output went away (`lazymoe plan R | head -1`): nothing to say, and nowhere to say it
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # a shell's status for a command ended by a closed pipe (128 + SIGPIPE)
    except OSError as err:
        # the system refused a path the user gave (a name too long, a loop of links): one line, as for a bad
        # setting; -v keeps the traceback for a bug report
        if args.verbose:
            traceback.print_exc()
        if err.errno in DISK_FULL:  # no step saw it coming: say so, and what to do, not "check the path"
            message = str(disk_full_error(err, Path(err.filename).parent if err.filename else None, cleaned=False))
        else:
            message = (f"{err.filename}: " if err.filename else "") + f"{err.strerror or err}; check the path"
        print(error_line(redact(message, [getattr(args, "token", None), *env_tokens()])), file=sys.stderr)
        return 2
    except Exception as err:  # a bug: show the traceback, but never a token that some message may carry
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        print(redact(text, [getattr(args, "token", None), *env_tokens()]), file=sys.stderr, end="")
        return 1

