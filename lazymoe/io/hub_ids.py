"""What the Hugging Face Hub accepts as a repo id (standard library only: the form and the CLI check names
without loading huggingface_hub)."""

from __future__ import annotations

#: the Hub's limit on each part of ``namespace/name``, in characters (huggingface_hub.utils.validate_repo_id)
MAX_HUB_NAME_CHARS = 96
