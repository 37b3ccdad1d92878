"""Every error lazymoe raises on purpose.

Each message says what is wrong, which thing (expert, field, tensor) and what to do next.
Front ends (CLI, notebook) print ``str(error)`` for these and a traceback for anything else.
"""

from __future__ import annotations


class LazyMoEError(Exception):
    """Base class: an error whose message is meant for the user, not a bug."""


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
