"""What an interrupted streamed push leaves for the next run: the shards the Hub received, and the routers.

A streamed merge (``pipeline.merge.merge_and_push``) records each shard once the Hub has received it (its
sha256, size and first bytes: all a commit needs of a large file) and, once computed, the router rows, under
``$HF_HOME/lazymoe/pushes/ENDPOINT/REPO/FINGERPRINT.*``. The fingerprint (``MergePlan.fingerprint``) covers
everything the output's bytes depend on, so a later run of the same merge may trust the record; even so a
recorded shard counts only once the Hub confirms it holds those bytes (it stores large files by their
sha256), and the routers' shard is always rebuilt (from the recorded rows). The record goes once the commit
lands. Nothing here is in the output folder: an interrupted merge still leaves nothing that looks finished.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

logger = logging.getLogger(__name__)


def push_state_dir() -> Path:
    """Where push records are kept: beside the Hugging Face cache (``HF_HOME``), read at call time."""
    return Path(constants.HF_HOME) / "lazymoe" / "pushes"


@dataclass(frozen=True)
class UploadedShard:
    """A shard the Hub received: what a commit names it by."""

    sha256: str  # hex
    size: int
    sample: bytes  # its first 512 bytes (the Hub's upload-mode check reads them)


class PushState:
    """The record of one streamed push (one repo, one merge fingerprint). Safe to use from several threads."""

    def __init__(self, endpoint: str, repo_id: str, fingerprint: str, *, root: Path | None = None):
        site = hashlib.sha256(endpoint.encode()).hexdigest()[:12]  # another Hub holds other files
        folder = (root or push_state_dir()) / site / repo_id.replace("/", "--")
        self.path = folder / f"{fingerprint}.json"
        self.gates_path = folder / f"{fingerprint}.gates"
        self._lock = threading.Lock()
        self._data = self._load()

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            shards = {name: UploadedShard(str(e["sha256"]), int(e["size"]), base64.b64decode(e["sample"]))
                      for name, e in data.get("shards", {}).items()}
            gates = data.get("gates")
            if gates is not None and not (isinstance(gates.get("shape"), list)
                                          and isinstance(gates.get("sha256"), str)):
                gates = None
        except FileNotFoundError:
            return {"shards": {}, "gates": None}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # damaged: start afresh
            logger.warning("Ignoring the unreadable push record %s (%s): every shard is built again.", self.path, err)
            return {"shards": {}, "gates": None}
        return {"shards": shards, "gates": gates}

    @property
    def shards(self) -> dict[str, UploadedShard]:
        with self._lock:
            return dict(self._data["shards"])

    def record(self, name: str, shard: UploadedShard) -> None:
        """``name`` is on the Hub (its large-file storage; no commit names it yet)."""
        with self._lock:
            self._data["shards"][name] = shard
            self._save()

    def save_gates(self, data: bytes, shape: tuple[int, ...]) -> None:
        """The router rows (float32, little-endian, C order), so a resumed push needs no router pass."""
        with self._lock:
            self.gates_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.gates_path.with_name(f".{self.gates_path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, self.gates_path)
            self._data["gates"] = {"shape": list(shape), "sha256": hashlib.sha256(data).hexdigest()}
            self._save()

    def gates(self) -> tuple[bytes, tuple[int, ...]] | None:
        """The recorded router rows and their shape, or None (none recorded, or not the bytes recorded)."""
        with self._lock:
            meta = self._data["gates"]
        if meta is None:
            return None
        try:
            data = self.gates_path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return None
        return data, tuple(int(n) for n in meta["shape"])

    def clear(self) -> None:
        """The commit landed: nothing left to resume."""
        with self._lock:
            for path in (self.path, self.gates_path):
                path.unlink(missing_ok=True)
            self._data = {"shards": {}, "gates": None}

    def _save(self) -> None:  # holding the lock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"shards": {name: {"sha256": s.sha256, "size": s.size, "sample": base64.b64encode(s.sample).decode()}
                           for name, s in sorted(self._data["shards"].items())},
                "gates": self._data["gates"]}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
