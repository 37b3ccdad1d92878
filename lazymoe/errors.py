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


class OutputBusyError(OutputExistsError):
    """Another lazymoe merge is writing the same output folder right now."""


class OutputNotWritableError(LazyMoEError, PermissionError):
    """The output folder cannot be created or written (read-only disk, no permission)."""


class ModelFormatError(LazyMoEError, ValueError):
    """A model's files exist but are malformed (config.json, the index, a safetensors header)."""
