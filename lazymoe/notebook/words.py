"""The notebook's words for a setting a message names (:class:`~lazymoe.errors.Setting`): the form field to
change and the form section it sits in, where Python says ``overwrite=True`` and the CLI ``--overwrite``.

The labels are the form's own (``form.py`` builds its widgets from them), so a message and the field it
points at always read the same.
"""

from __future__ import annotations

from ..errors import Setting, python_words
from ..options import NotebookSettings

FIELD_HELP = {name: info.description for name, info in NotebookSettings.model_fields.items()}

LOW_DISK_LABEL = "Low-disk mode: delete each fetched tensor once it is written"
ALLOW_SAME_LABEL = "Allow every expert to be the same model (only if you will train it)"
TOKEN_LABEL = "…or a token"
ADVANCED, HUB = "Advanced", "Hugging Face Hub"

#: setting name -> (the form's label for it, the form section it is in)
FORM_FIELDS = {
    "overwrite": (FIELD_HELP["overwrite"], ADVANCED),
    "low_disk": (LOW_DISK_LABEL, ADVANCED),
    "allow_all_same_experts": (ALLOW_SAME_LABEL, ADVANCED),
    "token": (TOKEN_LABEL, HUB),
    "private": (FIELD_HELP["private"], HUB),
}
#: setting name -> the notebook cell parameter that sets it, and its step
CELL_PARAMETERS = {"tasks": ("TASKS", "6d"), "limit": ("LIMIT", "6d")}
#: settings the notebook has no field for, with what a notebook user does instead
NOTEBOOK_PHRASES = {"outdir": "run the notebook from a folder on a larger disk",
                    "text": "write “Positive prompts” for the experts in the form and merge again"}
#: settings the notebook always sets itself, so no message from a notebook step names them; their messages
#: keep the Python words (a notebook user calling lazymoe from Python reads those)
SET_BY_THE_NOTEBOOK = frozenset({"device", "layout", "model_name", "download", "base_repo_id", "include_path",
                                 "max_tokens", "n_ctx", "generate_tokens", "threads", "n_threads", "repo_id",
                                 "gguf_repo"})


def form_words(setting: Setting) -> str:
    """``setting`` as a notebook user changes it: the field to tick or fill in, and where it is.

    A setting the form has no field for (the notebook sets it itself) keeps its Python words."""
    if setting.name in CELL_PARAMETERS:
        param, step = CELL_PARAMETERS[setting.name]
        return f"{param} in step {step}" if setting.noun else f"set {param} in step {step} to {setting.value!r}"
    if setting.name in NOTEBOOK_PHRASES:
        return NOTEBOOK_PHRASES[setting.name]
    field = FORM_FIELDS.get(setting.name)
    if field is None:  # SET_BY_THE_NOTEBOOK
        return python_words(setting)
    label, section = field
    if setting.noun:
        return f"the form's “{label}” box"
    if setting.value is ...:
        return f"type it into “{label}” in the form's {section} section"
    return f"{'tick' if setting.value else 'untick'} “{label}” in the form's {section} section"
