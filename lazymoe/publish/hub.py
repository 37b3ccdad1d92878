"""Push a finished model folder to the Hugging Face Hub (or whatever Hub ``HF_ENDPOINT`` names).

``create_repo(exist_ok=True)`` then one ``create_commit`` of the folder's files: the client uploads large files
through the Hub's large-file path and skips what the Hub already holds, so re-running an interrupted push
finishes it. The same commit deletes the weight files of an earlier upload that the new one does not name (another
shard layout), and nothing else. A push stopped before its commit leaves a repo it created empty, and says so: it
is not deleted, since the Hub keeps the large files already sent in that repo only, and a re-run resumes there.
The token is never printed, logged or written anywhere; every failure a user can fix becomes a
:class:`~lazymoe.errors.HubError` saying what to do.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from ..colab import has_user_secrets, read_secret
from ..errors import HubError, Setting, Text
from ..gguf.files import find_gguf_files, gguf_dir_of, stale_gguf_files
from ..gguf.quants import quant_of
from ..io.folder import (CONFIG_FILENAME, LAZYMOE_RECORDS, WEIGHT_FILE, WEIGHT_INDEX, card_edited, is_lazymoe_output,
                         require_weights)
from ..lazy import hf_errors, hf_hub, hf_lfs, hf_utils
from ..io.safetensors import read_header
from ..options import repo_name_problem
from .card import build_card, detected_extras
from .gguf_card import build_gguf_card
from .resume import PushState, UploadedShard
from ..io.token import TOKEN_ENV_NAMES, check_token, env_tokens, redact

logger = logging.getLogger(__name__)

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class PushResult:
    """Where a push went: what the notebook and the CLI report, and what the next step (a GGUF repo) names."""

    repo_id: str  # namespace/name, the namespace filled in from the token's user when it was not given
    url: str  # the repo's page
    private: bool
    files: int  # files in the uploaded folder
    bytes: int
    commit_url: str | None = None
    commit: str | None = None  # the commit's hash


#: the settings the Hub messages name (each front end words them: token=, --token, the form's token box)
_TOKEN = Setting("token", ...)
_TOKEN_ARGUMENT = Text(Setting("token", ..., noun=True).placeholder, (Setting("token", ..., noun=True),))
_BASE_REPO = Setting("base_repo_id", ...)
_PUBLIC = Setting("private", False)


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)  # never in a repr, a traceback or a log line
    source: str | Text  # where it came from ("your HF_TOKEN environment variable"), so messages name the one to fix


# ----------------------------------------------------------------------------- token


def resolve_token(token: str | None = None, colab_secret: str = "HF_TOKEN") -> str | None:
    """The token to push with: ``token``, else the Colab secret ``colab_secret`` (only inside Colab),
    else the ``HF_TOKEN`` environment variable, else the saved login (``hf auth login``). None if none."""
    found, _ = _find_token(token, colab_secret)
    return found.value if found else None


def _find_token(token: str | None, colab_secret: str) -> tuple[_Token | None, list[str]]:
    """The token and its source, plus notes on sources that exist but could not be used (for the error).

    A malformed token (a newline pasted with it...) is refused here, before any client sees it."""
    found, notes = _first_token(token, colab_secret)
    if found is not None:
        check_token(found.value, found.source)
    return found, notes


def _first_token(token: str | None, colab_secret: str) -> tuple[_Token | None, list[str]]:
    notes: list[str] = []
    if token is not None and token.strip():
        return _Token(token.strip(), _TOKEN_ARGUMENT), notes
    if colab_secret and has_user_secrets():
        value, note = read_secret(colab_secret)
        if value:
            return _Token(value, f"your Colab secret {colab_secret!r}"), notes
        if note:
            notes.append(note)
    for name in TOKEN_ENV_NAMES:
        if os.environ.get(name, "").strip():
            return _Token(os.environ[name].strip(), f"your {name} environment variable"), notes
    saved = hf_hub.get_token()  # the saved login (refreshed if it is an expiring OAuth token)
    return (_Token(saved.strip(), "your saved login (`hf auth login`)") if saved else None), notes


def _token_help(endpoint: str) -> Text:
    return Text(
        f"Create a token with write access at {endpoint}/settings/tokens, then either store it as a Colab secret "
        "named 'HF_TOKEN' (key icon in the left bar; switch on notebook access), set the HF_TOKEN environment "
        f"variable, run `hf auth login`, or {_TOKEN.placeholder}.", (_TOKEN,)
    )


# ----------------------------------------------------------------------------- the folder


def upload_files(folder: Path) -> list[Path]:
    """The files of ``folder`` a push uploads: every file but hidden ones (a name, or a folder on its path,
    starting with a dot: .env, .ipynb_checkpoints/, lazymoe's own records), which are logged as left out."""
    files, hidden = [], []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                if path.name not in LAZYMOE_RECORDS:  # lazymoe's own notes on the folder go unsaid
                    hidden.append(path)
            else:
                files.append(path)
    if hidden:
        logger.warning("not uploading hidden files: %s", ", ".join(p.relative_to(folder).as_posix() for p in hidden))
    return files


def check_model_folder(model_dir: str | Path) -> Path:
    """Refuse anything but a finished model folder: config.json plus every weight file, none truncated
    (or, for a GGUF repo, a folder of ``*.gguf`` files).

    Reads only the index and the file headers. Returns the folder's path.
    """
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise HubError(f"Nothing to push: {folder} is not a folder. Give the folder a merge wrote.")
    require_weights(folder)  # a merged folder whose shards went to the Hub (or were deleted) says so
    unfinished = f"{folder} is not a finished model folder"
    config = folder / "config.json"
    ggufs = sorted(folder.glob("*.gguf"))
    if not config.is_file() and ggufs:
        for path in ggufs:
            with path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise HubError(f"{unfinished}: {path.name} is not a GGUF file. Re-run the conversion.")
        return folder
    if not config.is_file():
        raise HubError(
            f"{unfinished}: config.json is missing (and there are no .gguf files). "
            "Push the output folder of a merge that completed."
        )
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise HubError(f"{unfinished}: config.json is not valid ({err}). Re-run the merge.") from None
    index = next((folder / n for n in _INDEX_FILES if (folder / n).is_file()), None)
    if index is not None:
        try:
            weight_files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                       for n in weight_files):  # a shard is a file next to the index, never elsewhere
                raise ValueError("it names a weight file outside the folder")
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise HubError(f"{unfinished}: {index.name} is not a valid index ({err}). Re-run the merge.") from None
        missing = [name for name in weight_files if not (folder / name).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise HubError(
                f"{unfinished}: {index.name} lists weight files that are missing: {shown}. "
                "Re-run the merge (or finish copying the folder), then push."
            )
    else:
        weight_files = [name for name in _SINGLE_WEIGHT_FILES if (folder / name).is_file()][:1]
        if not weight_files:
            raise HubError(f"{unfinished}: it holds no weights (no model.safetensors and no weight index).")
    for name in weight_files:
        if name.endswith(".safetensors"):
            _check_safetensors_complete(folder / name, unfinished)
    if not (folder / "README.md").is_file():
        logger.warning("%s has no README.md: the repo will have no model card (`lazymoe card` writes one).", folder)
    return folder


def _check_safetensors_complete(path: Path, unfinished: str) -> None:
    # a safetensors file is exactly 8 + header + data bytes, so a short file is a write that never finished
    size = path.stat().st_size
    try:
        header, data_start = read_header(path)
        if data_start > size:
            raise ValueError("header longer than the file")
        ends = [meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"]
        expected = data_start + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise HubError(f"{unfinished}: {path.name} is not a readable safetensors file. Re-run the merge.") from None
    if size != expected:
        raise HubError(
            f"{unfinished}: {path.name} is truncated ({size} bytes where its header describes {expected}). "
            "Re-run the merge, then push."
        )


# ----------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushTarget:
    """Where a push will go, checked: the token may write there and the name is free or ours to update."""

    repo_id: str
    user: str
    endpoint: str
    exists: bool  # False: the push creates it; True: it holds an earlier lazymoe upload (or nothing yet)
    token_source: str | Text
    _api: Any = field(repr=False, compare=False)
    _token: _Token = field(repr=False, compare=False)
    empty: bool = True  # it holds no file (but the Hub's .gitattributes): free, or made by a push never committed

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def describe(self) -> Text:
        what = "exists and will be updated (an earlier lazymoe upload)" if self.exists else "is free: it will be created"
        return Text.join([f"{self.repo_id} {what}; token from ", self.token_source,
                          f" (user {self.user!r}) may write there"])


def check_push_target(
    repo: str, *, private: bool = False, token: str | None = None, colab_secret: str = "HF_TOKEN"
) -> PushTarget:
    """Check, without creating or uploading anything, that a push to ``repo`` can succeed: a token is found,
    the Hub accepts it, it may write to the repo's namespace (role, or a fine-grained token's scopes as
    ``whoami`` reports them), the name is valid, and the repo is either free or holds an earlier lazymoe
    upload (public when ``private`` is not asked). Raises :class:`HubError` saying what to change."""
    problem = repo_name_problem(repo)
    if problem:
        raise HubError(f"Cannot push to {repo.strip()!r}: {problem}.")
    # read at call time: a notebook may set HF_ENDPOINT after huggingface_hub was imported
    endpoint = (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or _default_endpoint()
    found, notes = _find_token(token, colab_secret)
    if found is None:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise HubError(Text.join([f"No Hugging Face token found{why}. Pushing needs one. ", _token_help(endpoint)]))
    api = hf_hub.HfApi(endpoint=endpoint, token=found.value, library_name="lazymoe")
    with _errors_as_hub_errors(found, endpoint, repo, stage="connect"):
        who = api.whoami()
    repo_id = _check_permissions(api, found, who, repo, endpoint)
    exists, files = _check_free_or_ours(api, found, repo_id, endpoint, private)
    return PushTarget(repo_id=repo_id, user=who["name"], endpoint=endpoint, exists=exists,
                      token_source=found.source, _api=api, _token=found, empty=not files)


def _check_free_or_ours(api: hf_hub.HfApi, token: _Token, repo_id: str, endpoint: str,
                        private: bool) -> tuple[bool, set[str]]:
    """Whether ``repo_id`` exists (and may be updated) and the files it holds (but .gitattributes); HubError if it
    holds someone's work."""
    with _errors_as_hub_errors(token, endpoint, repo_id, stage="connect"):
        try:
            info = api.model_info(repo_id)
        except hf_errors.RepositoryNotFoundError:
            return False, set()
    files = {s.rfilename for s in (info.siblings or [])} - {".gitattributes"}
    ours = "lazymoe" in (info.tags or []) or CONFIG_FILENAME in files
    if files and not ours:
        shown = ", ".join(sorted(files)[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        raise HubError(
            f"The repo {repo_id!r} already exists and holds files lazymoe did not upload ({shown}); pushing would "
            f"mix this model into it. Choose another model name, or delete that repo ({endpoint}/{repo_id}/settings)."
        )
    if private and info.private is False:
        raise HubError(Text(
            f"{repo_id!r} already exists and is public, but you asked for a private upload; nothing was "
            f"uploaded. Make it private ({endpoint}/{repo_id}/settings) and push again, or "
            f"{_PUBLIC.placeholder} to push it public.", (_PUBLIC,)
        ))
    return True, files


def push_to_hub(
    model_dir: str | Path,
    repo: str,
    *,
    private: bool = False,
    token: str | None = None,
    colab_secret: str = "HF_TOKEN",
    commit_message: str | None = None,
    progress: bool = True,
    base_repo_id: str | None = None,
) -> PushResult:
    """Upload a finished model folder to ``repo`` (``name`` in your own namespace, or ``namespace/name``).

    Creates the repo if needed (private if ``private``; an existing public repo is refused rather than
    silently exposed), then uploads every file. Re-running after an interruption resumes: the Hub keeps
    what it received and only the rest is sent. The local folder is only read. Returns where it went.
    """
    _check_gguf_of(Path(model_dir).expanduser(), base_repo_id)
    folder = check_model_folder(model_dir)
    check_no_stale_gguf(folder)
    target = check_push_target(repo, private=private, token=token, colab_secret=colab_secret)
    api, found, endpoint, repo_id = target._api, target._token, target.endpoint, target.repo_id
    card = _card_for_repo(folder, repo_id, base_repo_id)  # before creating anything: it may refuse

    with _errors_as_hub_errors(found, endpoint, repo_id, stage="connect"):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True))
    files = upload_files(folder)
    sizes = [p.stat().st_size for p in files]
    logger.info("Uploading %d files (%.1f MB) from %s to %s", len(sizes), sum(sizes) / 1e6, folder, url)
    operations = _file_operations(folder, files, card)  # one commit of them, as upload_folder makes
    try:
        with _progress_bars(progress), _errors_as_hub_errors(found, endpoint, repo_id, stage="upload",
                                                             empty_repo=target.empty):
            deletions, parent = _replaced_weights(api, repo_id, operations)
            commit = api.create_commit(repo_id=repo_id, operations=[*operations, *deletions], parent_commit=parent,
                                       commit_message=commit_message or f"Upload {folder.name} with lazymoe")
    except KeyboardInterrupt:
        if target.empty:
            logger.warning("The push stopped before its commit. %s", empty_repo_note(repo_id, endpoint, rerun="push"))
        raise
    logger.info("Pushed %s to %s", folder, url)
    return PushResult(repo_id=repo_id, url=url, private=private, files=len(sizes), bytes=sum(sizes),
                      commit_url=getattr(commit, "commit_url", None), commit=getattr(commit, "oid", None))


def _file_operations(folder: Path, files: list[Path], card: str | None,
                     sent: frozenset[str] = frozenset()) -> list[hf_hub.CommitOperationAdd]:
    """The commit's additions for ``files`` of ``folder``, but those ``sent`` already; a ``card`` naming the repo
    replaces README.md in the upload only (the local one is left as it is)."""
    ops = [hf_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(p)) for p in files
           if (name := p.relative_to(folder).as_posix()) not in sent and (card is None or name != "README.md")]
    if card is not None:
        ops.append(hf_hub.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    return ops


def _replaced_weights(api: hf_hub.HfApi, repo_id: str,
                      adds: list[hf_hub.CommitOperationAdd]) -> tuple[list[hf_hub.CommitOperationDelete], str | None]:
    """What the commit of ``adds`` deletes: the weight files of an earlier upload to ``repo_id`` that it does not
    name (another shard layout: other shard names, one model.safetensors where there were shards and their index,
    or the reverse), so the repo holds one model, not the new one beside the old. Only lazymoe's weight names at
    the top of the repo (``WEIGHT_FILE``, ``WEIGHT_INDEX``) go, and only when ``adds`` holds weights of those names
    (a GGUF folder replaces no model); every other file stays. Read just before the commit, which is made on top of
    the commit read (its ``parent_commit``): one that lands meanwhile fails it rather than outlive it. Deleting in
    the very commit that adds the new files keeps the repo whole at every commit, and a re-run after a failure
    reads the repo again, so it converges to the same files."""
    names = {op.path_in_repo for op in adds}
    if not any(WEIGHT_FILE.fullmatch(name) for name in names):
        return [], None
    info = api.model_info(repo_id)
    stale = sorted(s.rfilename for s in info.siblings or ()
                   if s.rfilename not in names and (WEIGHT_FILE.fullmatch(s.rfilename) or s.rfilename == WEIGHT_INDEX))
    if stale:
        logger.info("Deleting %d weight file(s) of the earlier upload in the same commit: %s", len(stale),
                    ", ".join(stale))
    return [hf_hub.CommitOperationDelete(path_in_repo=name) for name in stale], info.sha


# ----------------------------------------------------------------------------- streamed push


class StreamingPush:
    """Upload a merge's shards while it writes the next ones, then make ONE commit with everything.

    Each finished shard goes to the Hub's large-file storage at once (``HfApi.preupload_lfs_files``: the Hub
    stores the bytes, no commit names them yet), from ``threads`` background threads. ``add_shard`` hashes the
    shard (sha256, about 3 s for a 2 GB shard on one core here) and then waits while ``in_flight`` shards are
    handed over and not yet uploaded, so at most ``in_flight`` + the one being written are on disk, and a
    freed slot starts the next upload at once instead of after its hash. With ``keep=False`` each shard
    is deleted once uploaded. ``finish`` commits the shards with the folder's other files and the card, so the
    repo shows the whole model or none of it. A shard the Hub already holds (same sha256, from an interrupted
    run) is not sent again: the Hub's LFS batch answer asks for no upload. With a ``PushState`` (``start``),
    each uploaded shard is recorded, and ``resume`` finds the recorded shards the Hub holds, which then need
    not even be built again.
    """

    def __init__(self, target: PushTarget, *, private: bool = False, keep: bool = True, in_flight: int = 2,
                 threads: int = 2, progress: bool = True):
        self.target = target
        self.keep = keep
        self.private = private
        self.progress = progress
        self._queue: queue.Queue[hf_hub.CommitOperationAdd | None] = queue.Queue()
        self._slots = threading.Semaphore(in_flight)
        self._lock = threading.Lock()
        self._done: dict[str, hf_hub.CommitOperationAdd] = {}
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._count = threads
        self.state: PushState | None = None
        self._ready: Callable[[], object] | None = None  # what start(after=...) waits for before touching the Hub
        self._started = False
        self._repo_made = False  # create_repo returned: the repo exists from here on
        self._committed = False
        self._told = False  # an error raised from here said that the repo is left empty

    def start(self, state: PushState | None = None, *, after: Callable[[], object] | None = None) -> None:
        """Create the repo (if needed) and start the upload threads. ``state`` records each shard once uploaded
        (for ``resume`` after an interruption) and is cleared by ``finish``. With ``after`` (a check that
        raises, or returns once passed), nothing happens on the Hub yet: the first shard handed over, ``resume``
        or ``finish`` calls ``after()`` first, so the merge writes its first shard while a check still runs and
        a merge that fails the check never creates the repo."""
        self.state = state
        self._ready = after
        if after is None:
            self._start_now()

    def _start_now(self) -> None:
        with self._lock:
            if self._started:
                return
            if self._ready is not None:
                self._ready()
            self._started = True
        with self._errors("connect"):
            self.target._api.create_repo(self.target.repo_id, private=self.private, exist_ok=True)
        self._repo_made = True
        self._threads = [threading.Thread(target=self._run, name=f"lazymoe-upload-{i}", daemon=True)
                         for i in range(self._count)]
        for thread in self._threads:
            thread.start()

    def resume(self, names: list[str]) -> frozenset[str]:
        """Of the shards ``names``, those an interrupted run recorded (``state``) and the Hub still holds: the
        commit will name them as they are, so they need neither building nor uploading. The Hub is asked for
        each recorded sha256 and size; a shard it lacks is left to be built again."""
        self._start_now()
        recorded = self.state.shards if self.state is not None else {}
        found = []
        for name in names:
            if name not in recorded:
                continue
            shard = recorded[name]
            op = hf_hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
            op.upload_info = hf_lfs.UploadInfo(sha256=bytes.fromhex(shard.sha256), size=shard.size, sample=shard.sample)
            op.path_or_fileobj = _NotHere()  # read only if the Hub asks for the bytes, i.e. lacks them
            try:
                with _progress_bars(False):
                    self.target._api.preupload_lfs_files(self.target.repo_id, additions=[op])
            except Exception as err:  # noqa: BLE001 - the Hub lacks it (built again), or a real failure
                if any(isinstance(e, _NotOnHub) for e in _causes(err)):
                    logger.info("%s was recorded as uploaded but the Hub lacks it: it is built again", name)
                    continue
                with self._errors("connect"):
                    raise
            if getattr(op, "_upload_mode", None) != "lfs":  # only large files are committed by their hash
                continue
            with self._lock:
                self._done[name] = op
            found.append(name)
        if found:
            logger.info("Resuming: %d shard(s) already on the Hub are neither fetched nor built again", len(found))
        return frozenset(found)

    def add_shard(self, path: Path) -> None:
        """Hand over a finished shard (waits while ``in_flight`` are not uploaded yet); raises the upload's error."""
        logger.debug("shard %s written", path.name)
        self._start_now()
        # hashed now, while the uploads in flight still fill the link: once a slot frees, the Hub is asked at
        # once. Hashed by the upload thread, the two uploads (which share the link and so finish together) both
        # hashed while the link idled: ~3 s per pair of 2 GB shards at 0.6 GB/s of sha256
        op = hf_hub.CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        while not self._slots.acquire(timeout=0.2):
            self._raise_if_failed()
        self._raise_if_failed()
        self._queue.put(op)

    def finish(self, folder: Path, card: str, *, commit_message: str) -> PushResult:
        """Wait for the uploads, then commit every shard, the other files of ``folder`` and ``card``."""
        self._start_now()
        self._stop()
        self._raise_if_failed()
        operations = [self._done[name] for name in sorted(self._done)]  # the shards, uploaded already
        operations += _file_operations(folder, upload_files(folder), card, sent=frozenset(self._done))
        repo_id = self.target.repo_id
        with _progress_bars(self.progress), self._errors("commit"):
            deletions, parent = _replaced_weights(self.target._api, repo_id, operations)
            commit = self.target._api.create_commit(repo_id=repo_id, operations=[*operations, *deletions],
                                                    parent_commit=parent, commit_message=commit_message)
        self._committed = True
        total = sum(op.upload_info.size for op in operations)
        logger.info("Pushed %d files (%.1f MB) to %s in one commit", len(operations), total / 1e6, self.target.url)
        if self.state is not None:
            self.state.clear()
        return PushResult(repo_id=repo_id, url=self.target.url, private=self.private, files=len(operations),
                          bytes=total, commit_url=getattr(commit, "commit_url", None),
                          commit=getattr(commit, "oid", None))

    def abort(self) -> None:
        """Stop uploading (a failed or interrupted merge): nothing is committed. A repo this push created and left
        empty is said to be so (a warning), unless the error that stopped the merge said it already."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._stop()
        if self.left_empty and not self._told:
            logger.warning("The merge stopped before its upload was committed. %s",
                           empty_repo_note(self.target.repo_id, self.target.endpoint))

    @property
    def left_empty(self) -> bool:
        """Whether the repo exists by now but holds nothing of ours: this push (or an earlier run of it that
        never committed) created it, and its one commit has not landed."""
        return self._repo_made and self.target.empty and not self._committed

    def _stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def _run(self) -> None:
        api, repo_id = self.target._api, self.target.repo_id
        while True:
            op = self._queue.get()
            if op is None:
                return
            try:
                if self._error is None:
                    self._upload(api, repo_id, op)
            except BaseException as err:  # noqa: BLE001 - reported by add_shard / finish in the merge's thread
                with self._lock:
                    self._error = self._error or err
            finally:
                self._slots.release()

    def _upload(self, api: Any, repo_id: str, op: hf_hub.CommitOperationAdd) -> None:
        path = Path(op.path_or_fileobj)
        with _progress_bars(self.progress):
            api.preupload_lfs_files(repo_id, additions=[op])
        with self._lock:
            self._done[path.name] = op
        if self.state is not None and getattr(op, "_upload_mode", None) == "lfs":
            info = op.upload_info
            self.state.record(path.name, UploadedShard(info.sha256.hex(), info.size, info.sample))
        logger.debug("uploaded %s", path.name)
        if not self.keep:
            path.unlink(missing_ok=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            with self._errors("stream"):
                raise self._error

    @contextmanager
    def _errors(self, stage: str) -> Iterator[None]:
        empty = self.left_empty
        try:
            with _errors_as_hub_errors(self.target._token, self.target.endpoint, self.target.repo_id, stage=stage,
                                       empty_repo=empty):
                yield
        except HubError as error:
            self._told = self._told or _says_empty(str(error))
            raise


class _NotOnHub(Exception):
    """A recorded shard the Hub asked to receive: it does not hold it after all."""


class _NotHere(io.BufferedIOBase):
    """The content of a shard that is not on this disk: reading it means the Hub lacks it."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int | None = -1) -> bytes:
        raise _NotOnHub()

    def readinto(self, buffer) -> int:
        raise _NotOnHub()


def _check_gguf_of(folder: Path, base_repo_id: str | None) -> None:
    """``base_repo_id`` names the merged model that a folder of GGUF files quantises: refuse it for any other
    folder before anything is uploaded, rather than ignore it and push the folder as whatever it is."""
    if base_repo_id is None or not folder.is_dir():
        return
    given = Setting("base_repo_id", ..., noun=True)
    if (folder / "config.json").is_file():
        raise HubError(Text(
            f"{folder} is a model folder, not a folder of GGUF files, so {given.placeholder} ({base_repo_id}) has "
            f"nothing to describe: make its GGUF files with `lazymoe gguf {folder}` (into {gguf_dir_of(folder)}) and "
            f"push that folder, or push this one as a model without {given.placeholder}.", (given,)))
    if not any(folder.glob("*.gguf")):
        raise HubError(f"{folder} holds no .gguf files, so there is nothing to push as the GGUF files of "
                       f"{base_repo_id}: make them with `lazymoe gguf MODEL_DIR --outdir {folder}` and push again.")


def check_no_stale_gguf(folder: Path, remade: Iterable[str] = ()) -> None:
    """Refuse, before anything is created, a GGUF folder holding files its record says were made from an earlier
    merge of its model (merged again since, and a quantisation not asked for again): they would go up, and be
    listed, as the new model's. ``remade``: names a conversion about to run will make again (not stale then)."""
    remade = set(remade)
    stale = [p for p in stale_gguf_files(folder) if p.name not in remade]
    if stale:
        names = ", ".join(p.name for p in stale)
        them = "it" if len(stale) == 1 else "them"
        raise HubError(f"{folder} holds GGUF files made from an earlier merge of its model (merged again since): "
                       f"{names}. Delete {them}, or make {them} again from the model as it is now (ask for "
                       f"{', '.join(quant_of(p.name) for p in stale)} in the GGUF step, or with "
                       "`lazymoe gguf --quant`), then push again.")


def _card_for_repo(folder: Path, repo_id: str, base_repo_id: str | None = None) -> str | None:
    """The card to upload: for a merged lazymoe folder, its card naming ``repo_id``; for a folder of
    GGUF files, the ``NAME-GGUF`` card (quantisations of ``base_repo_id``, by default ``repo_id``
    without its ``-GGUF`` suffix). None for anything else (its own README.md is uploaded as is)."""
    if not (folder / "config.json").is_file() and any(folder.glob("*.gguf")):
        if base_repo_id is None:
            if not repo_id.upper().endswith("-GGUF"):
                raise HubError(Text(
                    f"{folder} holds GGUF files; push them to a repo named like the merged model plus -GGUF "
                    f"(e.g. {repo_id}-GGUF), or {_BASE_REPO.placeholder} to name the merged model's repo.",
                    (_BASE_REPO,)))
            base_repo_id = repo_id[: -len("-GGUF")]
        if card_edited(folder):  # a card edited by hand is uploaded as it is
            return None
        return build_gguf_card(find_gguf_files(folder), base_repo_id=base_repo_id, repo_id=repo_id)
    if not is_lazymoe_output(folder) or card_edited(folder):  # a card edited by hand is uploaded as it is
        return None
    extras = detected_extras(folder)  # routing picture; NAME-GGUF files, linked to the NAME-GGUF repo
    gguf_repo = f"{repo_id}-GGUF" if "gguf_files" in extras else None
    return build_card(folder, repo_id=repo_id, gguf_repo=gguf_repo, **extras)


def _check_permissions(api: hf_hub.HfApi, token: _Token, who: dict[str, Any], repo: str, endpoint: str) -> str:
    """The full repo id for ``repo``, after refusing what the token visibly cannot do.

    Checked up front so that the user gets a precise message before anything is created; the Hub's
    own 403 (e.g. a fine-grained token without write scope) is still translated later.
    """
    user, orgs = who["name"], [org["name"] for org in who.get("orgs", [])]
    repo_id = repo.strip().strip("/") if "/" in repo else f"{user}/{repo.strip()}"
    try:
        hf_utils.validate_repo_id(repo_id)
    except hf_utils.HFValidationError as err:
        raise HubError(f"{repo!r} is not a valid repo name: {err}") from None
    namespace, name = repo_id.split("/")
    holder = Text.join([token.source, f" (user {user!r})"])
    if ((who.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise HubError(Text.join([
            "The token from ", holder, " is read-only; pushing needs write access. Create a 'Write' token (or a "
            f"fine-grained one with write access to {namespace!r}) at {endpoint}/settings/tokens and use it instead."]))
    if namespace in (user, *orgs):
        scopes = ((who.get("auth") or {}).get("accessToken") or {}).get("fineGrained")
        if isinstance(scopes, dict) and not _fine_grained_may_write(scopes, repo_id):
            raise HubError(Text.join([
                "The fine-grained token from ", holder, f" may not write to {namespace!r} (it has no 'repo.write' "
                f"permission there). Edit the token at {endpoint}/settings/tokens to give it write access to "
                f"repos under {namespace!r}, or use a 'Write' token."]))
        return repo_id
    with _errors_as_hub_errors(token, endpoint, repo_id, stage="connect"):
        taken = api.repo_exists(repo_id)
    if taken:
        raise HubError(
            f"The repo {repo_id!r} belongs to {namespace!r}; the token from {holder} cannot write to it. "
            f"Push to '{user}/{name}' instead (or to one of your organizations)."
        )
    yours = ", ".join(repr(o) for o in orgs) or "none"
    raise HubError(
        f"You cannot create {repo_id!r}: {namespace!r} is neither your user ({user!r}) nor one of your "
        f"organizations ({yours}). Use '{user}/{name}', or just '{name}'."
    )


def _fine_grained_may_write(scopes: dict[str, Any], repo_id: str) -> bool:
    """Whether a fine-grained token's scopes (``whoami()["auth"]["accessToken"]["fineGrained"]``) let it
    write ``repo_id``: ``repo.write`` on the namespace (user or org), or on that very repo."""
    namespace = repo_id.split("/")[0]
    for scope in scopes.get("scoped") or ():
        entity = scope.get("entity") or {}
        if "repo.write" not in (scope.get("permissions") or ()):
            continue
        if entity.get("name") == repo_id or (entity.get("type") in ("user", "org") and entity.get("name") == namespace):
            return True
    return "repo.write" in (scopes.get("global") or ())


def _default_endpoint() -> str:
    return constants.ENDPOINT


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    if enabled or hf_utils.are_progress_bars_disabled():
        yield
        return
    hf_utils.disable_progress_bars()
    try:
        yield
    finally:
        hf_utils.enable_progress_bars()


# ----------------------------------------------------------------------------- errors


@contextmanager
def _errors_as_hub_errors(token: _Token, endpoint: str, repo_id: str, *, stage: str,
                          empty_repo: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into HubErrors a user can act on; the token never appears in them.
    ``empty_repo``: the repo exists but holds nothing of ours yet (created for this upload), which they say."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:  # noqa: BLE001 - classified below; anything unknown keeps its type name
        explained = _explain(error, token, endpoint, repo_id, stage, empty_repo=empty_repo)
        if empty_repo and not _says_empty(explained):
            rerun = "push" if stage == "upload" else "merge and upload"  # push_to_hub's stage, or a streamed push's
            explained = Text.join([explained, " ", empty_repo_note(repo_id, endpoint, rerun=rerun)])
        raise HubError(explained) from error


_EMPTY = "exists but is empty"


def _says_empty(message: str) -> bool:
    return _EMPTY in message


def empty_repo_note(repo_id: str, endpoint: str, *, rerun: str = "merge and upload") -> str:
    """What a push that stopped before its commit leaves on the Hub when it created the repo: the repo, empty.
    It is kept rather than deleted: the Hub keeps the large files a push sent only in that repo, so a re-run
    resumes there and sends none of them again."""
    return (f"The repo {repo_id!r} {_EMPTY} (it was created for this upload, and nothing is committed before the "
            f"whole model is): run the same {rerun} again to resume it (what the Hub already received is "
            f"not sent again), or delete it at {endpoint}/{repo_id}/settings.")


def _explain(error: Exception, token: _Token, endpoint: str, repo_id: str, stage: str, *,
             empty_repo: bool = False) -> str | Text:
    status = _http_status(error)
    cause = _describe(error, [token.value, *env_tokens()])
    if status == 401:
        return Text.join(["The Hub rejected the token from ", token.source, " (401 Unauthorized): it is invalid, "
                          "expired or revoked. ", _token_help(endpoint)])
    if status == 403:
        return Text.join([
            f"The Hub refused write access to {repo_id!r} (403 Forbidden) for the token from ", token.source,
            f". It needs write permission on {repo_id.split('/')[0]!r}: create a 'Write' token, or give your "
            f"fine-grained token write access there, at {endpoint}/settings/tokens."])
    if _is_network_error(error) or (status is not None and (status >= 500 or status in (408, 429))):
        if stage in ("stream", "commit"):
            shown = (f"the repo {_EMPTY} (it was created for this upload)" if empty_repo else
                     "the repo shows no half model")
            return (
                f"The upload to {repo_id!r} was interrupted ({cause}); nothing was committed, so {shown}. Run the "
                "same merge and upload again to resume: shards the Hub already received are not sent again."
            )
        if stage == "upload":
            held = f", in the repo, which {_EMPTY} until the push completes" if empty_repo else ""
            return (
                f"The upload to {repo_id!r} was interrupted ({cause}). Nothing is lost: your folder is untouched "
                f"and the Hub keeps the files it already received{held}. Run the same push again to resume; only "
                "the missing files are sent."
            )
        return (
            f"Could not reach the Hub at {endpoint} ({cause}). Check the network (and HF_ENDPOINT if you set "
            "it), then push again."
        )
    if status == 412:  # the commit is made on top of the commit its deletions were read at (_replaced_weights)
        return (f"The repo {repo_id!r} changed while pushing (another commit landed first); nothing of this push "
                "was committed. Push again.")
    if isinstance(error, ValueError) and "README.md" in str(error):
        return (
            f"The Hub rejected the model card metadata: {cause}. Fix the YAML block at the top of README.md "
            "(or re-render it with `lazymoe card`), then push again."
        )
    return f"Pushing to {repo_id!r} failed: {type(error).__name__}: {cause}"


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _describe(error: BaseException, secrets: list[str]) -> str:
    """One line: the error's message, plus its root cause when that says more (a dropped connection...).
    Every form of ``secrets`` is scrubbed before the text is reflowed (reflowing would hide a raw form)."""
    chain = list(_causes(error))
    parts = [" ".join(redact(str(e), secrets).split()).rstrip(".") or type(e).__name__ for e in (chain[0], chain[-1])]
    text = parts[0] if len(chain) == 1 or parts[1] in parts[0] else f"{parts[0]}: {parts[1]}"
    return text if len(text) <= 300 else text[:297] + "..."


def _http_status(error: BaseException) -> int | None:
    for cause in _causes(error):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _is_network_error(error: BaseException) -> bool:
    transport = _transport_error_types()
    return any(isinstance(cause, transport) for cause in _causes(error))


def _transport_error_types() -> tuple[type[BaseException], ...]:
    # huggingface_hub 2.x speaks httpx2, 1.x httpx, 0.x requests: recognise whichever is loaded
    candidates = {
        "httpx2": ("TransportError",),
        "httpx": ("TransportError",),
        "requests": ("ConnectionError", "Timeout"),
    }
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in candidates.items():
        module = sys.modules.get(module_name)
        types.extend(getattr(module, n) for n in names if module is not None and hasattr(module, n))
    return tuple(types)
