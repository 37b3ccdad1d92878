"""What an interrupted streamed push leaves for the next run: the shards the Hub received, and the routers.

A streamed merge (``pipeline.merge.merge_and_push``) records each shard once the Hub has received it (its
sha256, size and first bytes: all a commit needs of a large file) and, once computed, the router rows, under
``$HF_HOME/lazymoe/pushes/ENDPOINT/REPO/FINGERPRINT.*``. The fingerprint (``MergePlan.fingerprint``) covers
everything the output's bytes depend on, so a later run of the same merge may trust the record; even so a
recorded shard counts only once the Hub confirms it holds those bytes (it stores large files by their
sha256), and the routers' shard is always rebuilt (from the recorded rows). The record goes once the commit
lands; the records of merges never finished go once untouched for ``RECORD_MAX_AGE_S`` (any later streamed
push sweeps them). Nothing here is in the output folder: an interrupted merge still leaves nothing that
looks finished.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

logger = logging.getLogger(__name__)


#: a record of a merge never finished that nobody wrote to for this long is deleted: a week is longer than any
#: merge, and the Hub may have dropped large files that no commit names by then anyway
RECORD_MAX_AGE_S = 7 * 24 * 3600


def push_state_dir() -> Path:
    """Where push records are kept: beside the Hugging Face cache (``HF_HOME``), read at call time."""
    return Path(constants.HF_HOME) / "lazymoe" / "pushes"


def sweep_stale_records(root: Path, *, keep: frozenset[Path] = frozenset(), now: float | None = None) -> int:
    """Delete the records (``*.json``, ``*.gates`` and their temporary files) under ``root`` last written more than ``RECORD_MAX_AGE_S``
    ago, except ``keep``, and the folders that leaves empty; returns how many files went. A file that vanishes
    or cannot be deleted meanwhile (another push sweeping, a read-only cache) is left to the next sweep."""
    now = time.time() if now is None else now
    removed = 0
    for path in sorted(root.glob("*/*/*")):
        is_record = path.suffix in (".json", ".gates") or ".tmp-" in path.name  # or one a crash left half-written
        if path in keep or not is_record or not path.is_file():
            continue
        try:
            if now - path.stat().st_mtime > RECORD_MAX_AGE_S:
                path.unlink()
                removed += 1
        except OSError:
            continue
    folders = [p for p in root.glob("*/*") if p.is_dir()] + [p for p in root.glob("*") if p.is_dir()]
    for folder in folders:  # repos first, then endpoints
        try:
            folder.rmdir()  # only when empty
        except OSError:
            continue
    if removed:
        logger.info("Deleted %d push record(s) of merges untouched for over %d days", removed,
                    RECORD_MAX_AGE_S // 86400)
    return removed


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
        sweep_stale_records(root or push_state_dir(), keep=frozenset({self.path, self.gates_path}))
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
