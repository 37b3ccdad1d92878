"""Hub tokens as secrets: refuse a malformed one before it is used (without echoing it), and scrub every
form a token can take in a message (raw, escaped by ``repr`` of str or bytes, JSON, URL-quoted, or cut
by whitespace) from text we show.

A token pasted with a newline otherwise reaches the HTTP client, whose "Illegal header value
b'Bearer hf_...\\nx'" shows it escaped, where a plain search for the raw string does not find it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from urllib.parse import quote

from ..errors import HubError, Text

#: what Hub tokens are made of (hf_ + letters and digits; printable ASCII without spaces for any endpoint)
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_MASK = "hf_***"
#: environment variables huggingface_hub reads a token from, in its order
TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def check_token(value: str, source: str | Text) -> str:
    """``value`` if it can be a token; else HubError naming ``source`` and the fault, never the value."""
    quoted = len(value) > 1 and value[0] == value[-1] and value[0] in "'\"`"
    if _PRINTABLE.match(value) and not quoted:
        return value
    if quoted:
        what = "is in quote marks (copied with them?)"
    elif any(c in "\r\n" for c in value):
        what = "contains a line break (pasted along with it?)"
    elif any(c.isspace() for c in value):
        what = "contains a space or tab"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        what = "contains a control character"
    else:
        what = "contains a character that is not plain ASCII"
    raise HubError(Text.join([
        "The token from ", source, f" {what}, so it is not a Hugging Face token (those are letters and "
        "digits after hf_). Copy it again from https://huggingface.co/settings/tokens and paste only the token."]))


def env_tokens() -> list[str]:
    """Tokens set in the environment, as typed (for scrubbing: a malformed one must be scrubbed too)."""
    return [os.environ[n] for n in TOKEN_ENV_NAMES if os.environ.get(n)]


def _forms(secret: str) -> set[str]:
    forms = {secret, secret.strip(), repr(secret)[1:-1], json.dumps(secret)[1:-1], quote(secret, safe=""),
             secret.encode("unicode_escape").decode("ascii"), repr(secret.encode("utf-8", "replace"))[2:-1],
             " ".join(secret.split())}
    # pieces between whitespace or control characters: a client that cuts the value there shows one of them
    forms.update(p for p in re.split(r"[\x00-\x20\x7f]+", secret) if len(p) >= 8)
    return {f for f in forms if len(f) >= 4}


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every form of every secret replaced by ``hf_***``."""
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= _forms(secret)
    for form in sorted(forms, key=len, reverse=True):  # longest first: a piece never leaves half a form behind
        text = text.replace(form, _MASK)
    return text
