"""Every error lazymoe raises on purpose.

Each message says what is wrong, which thing (expert, field, tensor) and what to do next.
Front ends (CLI, notebook) print these in their own words (:meth:`Text.worded`) and a traceback for anything else.

A message that tells the user to change a setting names it with a :class:`Setting`, not with one front end's
spelling of it: Python users read ``pass overwrite=True``, CLI users ``add --overwrite`` and notebook users
the form field to tick. ``str(error)`` is the Python wording.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """A setting a message names, by its Python keyword argument (``overwrite``) and the value to give it
    (``...``: a value the user supplies, such as a token). ``noun``: the message names where a value came
    from ("the token from your token= argument") rather than asking to set it ("pass token=..."). ``python``:
    the Python wording when it is not a keyword argument (a config key, say)."""

    name: str
    value: object = True
    noun: bool = False
    python: str | None = None

    @property
    def placeholder(self) -> str:
        """How a message template marks where the setting goes: one mark per name, value and role."""
        value = "" if self.value is True or self.value is ... else f"={self.value!r}"
        return "{" + self.name + value + (" noun" if self.noun else "") + "}"


def python_words(setting: Setting) -> str:
    """The setting as a Python caller writes it: ``pass overwrite=True``, ``your token= argument``."""
    if setting.python is not None:
        return setting.python
    if setting.noun:
        return f"your {setting.name}= argument"
    return f"pass {setting.name}=" + ("..." if setting.value is ... else repr(setting.value))


#: a front end's words for a setting (python_words, the CLI's flags, the notebook form's fields)
Words = Callable[[Setting], str]


def _fill(template: str, settings: tuple[Setting, ...], words: Words) -> str:
    for setting in settings:
        template = template.replace(setting.placeholder, words(setting))
    return template


class Text(str):
    """A user-facing message that may name settings: ``template`` holds ``{name}`` for each of ``settings``.

    It is a ``str`` (the Python wording), so code that reads messages as text keeps working; front ends call
    :meth:`worded` with their own words."""

    template: str
    settings: tuple[Setting, ...]

    def __new__(cls, template: str, settings: Iterable[Setting] = ()) -> Text:
        settings = tuple(settings)
        self = super().__new__(cls, _fill(template, settings, python_words))
        self.template, self.settings = template, settings
        return self

    def worded(self, words: Words = python_words) -> str:
        """The message with each setting in ``words``: the Python wording by default."""
        return _fill(self.template, self.settings, words)

    @classmethod
    def join(cls, parts: Iterable[str], sep: str = "") -> Text:
        """One message from pieces, each a plain string or a :class:`Text` whose settings it keeps."""
        parts = [p if isinstance(p, Text) else cls(p) for p in parts]
        settings = tuple(dict.fromkeys(s for p in parts for s in p.settings))
        return cls(sep.join(p.template for p in parts), settings)


def text_of(message: str | Text | BaseException) -> Text:
    """The message of a string, a :class:`Text`, or an error (a :class:`LazyMoEError` keeps its settings)."""
    if isinstance(message, LazyMoEError):
        return message.text
    return message if isinstance(message, Text) else Text(str(message))


def worded(message: str | Text | BaseException, words: Words) -> str:
    """``message`` in a front end's ``words`` (plain strings and other errors as they are)."""
    return text_of(message).worded(words)


#: how a command line (``lazymoe``, the tools) starts the one line it prints for an error; lower case, as
#: argparse's own ``lazymoe: error: ...``
ERROR_PREFIX = "error: "


def error_line(message: str) -> str:
    """``message`` as the one line a command prints for an error: the prefix, every run of whitespace (a newline
    in a model name or path) made one space."""
    return ERROR_PREFIX + " ".join(message.split())


class LazyMoEError(Exception):
    """Base class: an error whose message is meant for the user, not a bug. ``message`` may be a :class:`Text`
    naming settings; ``str(error)`` words them for Python, front ends with :func:`worded`."""

    def __init__(self, message: str = "") -> None:
        self.text = message if isinstance(message, Text) else Text(message)
        super().__init__(str(self.text))


class ConfigError(LazyMoEError, ValueError):
    """The MoE config (YAML, form or Python) is invalid."""


class ModelMismatchError(LazyMoEError, ValueError):
    """The models can be read but cannot be combined as configured."""


class ModelNotFoundError(LazyMoEError, FileNotFoundError):
    """A model reference points nowhere (no local folder, no Hub repo, no weights)."""


class OutputExistsError(LazyMoEError, FileExistsError):
    """The output folder already holds something we must not overwrite."""


class InsufficientResourcesError(LazyMoEError, OSError):
    """Not enough disk (or memory) for what the plan needs."""


class HubError(LazyMoEError):
    """Talking to the Hugging Face Hub failed in a way the user can act on."""


class GGUFError(LazyMoEError):
    """Converting, quantising or running GGUF failed."""


class CardError(LazyMoEError, ValueError):
    """A model card cannot be rendered from what was given (the message names the fix)."""


class DemoError(LazyMoEError):
    """Building a demo checkpoint failed (a bug or an environment problem, reported with its cause)."""


class StepFailed(LazyMoEError):
    """A notebook step stopped; the reason is already on screen as a red message."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"Stopped at “{self.step}”: see the red message above, change what it says, and run this cell again."]


class ModelFileError(LazyMoEError, OSError):
    """A weight file does not hold what its header says (truncated, or changed on disk since it was read)."""


class WriteError(LazyMoEError, OSError):
    """Writing the output failed (disk full, no permission, a folder that vanished); nothing half-written is kept."""


class NotReadyError(LazyMoEError):
    """Plan found something a ticked later step (upload, GGUF) needs and does not have; lists every problem."""


class MissingDependency(LazyMoEError, ImportError):
    """An optional package a feature needs is not installed; the message is the install command."""
class OutputBusyError(OutputExistsError):
    """Another lazymoe merge is writing the same output folder right now."""


class OutputNotWritableError(LazyMoEError, PermissionError):
    """The output folder cannot be created or written (read-only disk, no permission)."""


class ModelFormatError(LazyMoEError, ValueError):
    """A model's files exist but are malformed (config.json, the index, a safetensors header)."""


class EvalFileError(LazyMoEError, ValueError):
    """An ``eval.json`` or ``benchmarks.json`` that this version of lazymoe cannot read."""


class WeightsOnHubError(ModelNotFoundError):
    """A merged folder whose weights went to the Hub only (``merge --push --no-keep``); ``url``: the repo's page."""

    def __init__(self, message: str | Text = "", *, url: str = "") -> None:
        super().__init__(message)
        self.url = url
