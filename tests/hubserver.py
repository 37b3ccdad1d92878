"""A Hub-compatible HTTP server for tests: the real ``huggingface_hub`` client talks to it on 127.0.0.1.

It answers the routes huggingface_hub 2.x calls to create a repo and upload a folder (regular files inline in
the NDJSON commit, large files through the git-LFS batch API with signed upload URLs, as S3 does), and the
routes it calls to download (model info, tree listing, ``resolve`` with HTTP ranges). Repos live
in memory. Every request is recorded, tokens carry roles, and failures can be injected to simulate a
network outage in the middle of an upload. Byte counters (``downloaded_bytes``: ``resolve`` bodies sent;
``uploaded_bytes``: LFS uploads and commit bodies received) and an optional bandwidth limit per direction
(``download_bps``/``upload_bps``, shared by every connection like one network link) let benchmarks measure
a transfer as a user on a slow link would see it.

Not implemented because nothing in lazymoe needs them: datasets/spaces, pull requests, Xet storage (tests set
``HF_HUB_DISABLE_XET`` so the client stays on plain HTTP + LFS), LFS multipart transfers, pagination,
paths-info and refs listings. A request to a route not implemented is recorded with kind ``"unknown"`` (the
``hub`` fixture fails the test if any was made).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

#: Patterns the Hub's default ``.gitattributes`` routes through LFS (a representative subset, plus GGUF).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.model",
    "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
    "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
#: The Hub sends any file above 10 MiB through LFS whatever its name.
DEFAULT_LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
#: bodies move in slices of this size, each paced by the bandwidth limit
_SLICE = 256 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()

RequestKind = Literal[
    "whoami", "create-repo", "validate-yaml", "model-info", "tree", "preupload", "commit", "lfs-batch",
    "lfs-upload", "lfs-verify", "resolve", "unknown",
]  # fmt: skip
#: the requests that move a model's bytes or make them visible; what a "mid-upload" failure hits
UPLOAD_KINDS = frozenset({"preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit"})


def git_blob_oid(data: bytes) -> str:
    """The id git gives a blob (``git hash-object``); the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Blob:
    """One file's content as the Hub stores it: inline in git, or as an LFS object behind a pointer."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str

    @classmethod
    def of(cls, data: bytes, *, lfs: bool, sha256: str | None = None) -> Blob:
        """``sha256``: the content's, when it is known already (an LFS object checked when it was uploaded);
        a commit names LFS files by it, and the Hub does not hash them again."""
        sha256 = sha256 or hashlib.sha256(data).hexdigest()
        stored = _lfs_pointer(sha256, len(data)) if lfs else data
        return cls(data=data, lfs=lfs, sha256=sha256, git_oid=git_blob_oid(stored))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        # what huggingface_hub names the cached blob after: the sha256 for LFS files, the git oid otherwise
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.git_oid}
        if self.lfs:
            pointer_size = len(_lfs_pointer(self.sha256, self.size))
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return entry


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    #: LFS objects received through the upload URL, committed or not: what makes a re-run resume
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        return self.commits.get(oid) if oid else None


@dataclass(frozen=True)
class TokenInfo:
    """What a token lets its holder do: read-only tokens read; write tokens write to their own namespaces."""

    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True
    role: str = ""  # what whoami reports; defaults to write/read. "fineGrained" tokens may still lack rights
    #: for a fine-grained token: namespace -> permissions, reported by whoami as the Hub does
    #: (``auth.accessToken.fineGrained.scoped``) and enforced on writes. None: whoami reports no scopes.
    scoped: dict[str, tuple[str, ...]] | None = None

    @property
    def reported_role(self) -> str:
        return self.role or ("write" if self.write else "read")

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.user, *self.orgs)

    def may_write(self, namespace: str) -> bool:
        if not self.write or namespace not in self.namespaces:
            return False
        return self.scoped is None or "repo.write" in self.scoped.get(namespace, ())


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body_bytes: int
    kind: RequestKind
    status: int | None = None  # None: the server dropped the connection without answering
    response_bytes: int = 0  # body bytes sent back
    started: float = 0.0  # time.monotonic() when the request arrived
    finished: float = 0.0  # ... when its answer was sent (bandwidth limit included)

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class _Throttle:
    """One direction of a link of ``rate`` bytes/s shared by every connection (None: unlimited).

    A body moves in slices, each given the link for its own time. A connection that comes back for its next
    slice a little late (its handler was still reading the last one, or its sleep overran) is given the time
    since its last slice ended, up to one slice, as a link with a socket buffer keeps sending meanwhile; a
    body's first slice starts when it comes. Paced from the moment each slice came instead, eight 15 MB uploads
    one after another moved at 87% of the rate, and 93% this way (the rest is each file's own requests, and
    hashing each body once it was whole, before answering). Hashed as its slices come (``_read_body``), an
    upload in the streamed bench keeps the link at 99% of the rate while it is on it (19.8 of 20 MB/s).
    """

    def __init__(self, rate: float | None):
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def take(self, nbytes: int, after: float | None = None) -> float | None:
        """Wait for ``nbytes``' turn on the link; ``after``: when this body's last slice ended (what the last
        call returned). Returns when this slice ends."""
        if not self.rate or nbytes <= 0:
            return after
        with self._lock:
            now = time.monotonic()
            start = now if after is None else min(now, max(after, now - _SLICE / self.rate))
            self._free_at = max(start, self._free_at) + nbytes / self.rate
            end = self._free_at
        if end > now:
            time.sleep(end - now)
        return end


@dataclass
class _FailureRule:
    kinds: frozenset[str]
    nth: int
    times: int | None
    mode: Literal["drop", "500"]
    seen: int = 0

    def hit(self, kind: str) -> bool:
        if kind not in self.kinds:
            return False
        self.seen += 1
        return self.seen >= self.nth and (self.times is None or self.seen < self.nth + self.times)


class HttpError(Exception):
    """An error answer in the Hub's shape: JSON ``{"error": ...}`` plus ``X-Error-Code``/``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _Context:
    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    identity: TokenInfo | None
    body_sha256: str = ""  # the body's digests, taken as its slices came (_HubHandler._read_body)
    body_md5: str = ""


class HubServer:
    """In-memory Hub. Use as a context manager, or ``start()``/``stop()``; ``url`` is its endpoint."""

    def __init__(self, *, lfs_threshold_bytes: int = DEFAULT_LFS_THRESHOLD_BYTES, download_bps: float | None = None,
                 upload_bps: float | None = None):
        self.lfs_threshold_bytes = lfs_threshold_bytes
        self._down, self._up = _Throttle(download_bps), _Throttle(upload_bps)
        #: body bytes of ``resolve`` answers sent / of LFS uploads and commits received (what a link carries)
        self.downloaded_bytes = 0
        self.uploaded_bytes = 0
        self.tokens: dict[str, TokenInfo] = {}
        self.repos: dict[str, Repo] = {}
        self._requests: list[RecordedRequest] = []
        self._failures: list[_FailureRule] = []
        self._lock = threading.RLock()
        self._signing_key = secrets.token_bytes(16)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0
        #: exceptions raised while answering (answered 500); the `hub` fixture fails a test that caused any
        self.server_errors: list[str] = []

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        # a short poll interval: shutdown() waits up to one interval, and every test stops a server
        serve = lambda: self._httpd.serve_forever(poll_interval=0.02)  # noqa: E731
        self._thread = threading.Thread(target=serve, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "HubServer is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------- test controls
    def add_token(
        self, token: str, user: str, *, orgs: tuple[str, ...] = (), write: bool = True, role: str = "",
        scoped: dict[str, tuple[str, ...]] | None = None,
    ) -> str:
        """Accept ``token`` for ``user``; ``write=False`` makes every write answer 403; ``scoped`` makes it a
        fine-grained token with those permissions per namespace."""
        self.tokens[token] = TokenInfo(user=user, orgs=tuple(orgs), write=write, role=role, scoped=scoped)
        return token

    def fail(
        self,
        kinds: str | frozenset[str] = "lfs-upload",
        *,
        nth: int = 1,
        times: int | None = 1,
        mode: Literal["drop", "500"] = "drop",
    ) -> None:
        """Fail the ``nth`` request of ``kinds`` (a kind or a set, e.g. ``UPLOAD_KINDS``) and the next ``times - 1``.

        ``times=None`` keeps failing until ``clear_failures()``: a network outage, which outlasts the client's
        own retries. ``mode="drop"`` reads the request, then closes the connection without answering.
        """
        kind_set = frozenset({kinds}) if isinstance(kinds, str) else frozenset(kinds)
        with self._lock:
            self._failures.append(_FailureRule(kind_set, nth, times, mode))

    def set_bandwidth(self, *, download_bps: float | None = None, upload_bps: float | None = None) -> None:
        """Limit each direction to that many bytes per second (None: unlimited)."""
        self._down, self._up = _Throttle(download_bps), _Throttle(upload_bps)

    def reset_counters(self) -> None:
        with self._lock:
            self.downloaded_bytes = self.uploaded_bytes = 0
            self._requests.clear()

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_of(self, kind: RequestKind, *, status: int | Literal["any"] | None = "any") -> list[RecordedRequest]:
        return [r for r in self.requests if r.kind == kind and (status == "any" or r.status == status)]

    def weight_reads(self, *, whole: bool = False) -> list[RecordedRequest]:
        """The ranged reads of safetensors tensor data, in the order they came: not the reads of a file's
        length and header, which are the ranges that start before its data (however a client cuts them).
        ``whole``: with the downloads of whole safetensors files."""
        out = []
        for r in self.requests_of("resolve"):
            if r.method != "GET" or not r.path.endswith(".safetensors"):
                continue
            if not r.range:
                if whole:
                    out.append(r)
                continue
            owner, name, _, revision, *path = (unquote(s) for s in r.path.split("/")[1:])
            repo = self.repos.get(f"{owner}/{name}")
            commit = repo.resolve(revision) if repo else None
            blob = commit.files.get("/".join(path)) if commit else None
            start = r.range.removeprefix("bytes=").split("-")[0]
            if blob is None or not start:
                out.append(r)  # a file this server does not hold, or a suffix range: not a header read
                continue
            data_start = 8 + struct.unpack("<Q", blob.data[:8])[0] if len(blob.data) >= 8 else 8
            if int(start) >= data_start:
                out.append(r)
        return out

    # ----------------------------------------------------------------- publishing & inspection
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create ``repo_id`` the way the Hub does: one initial commit holding the default ``.gitattributes``."""
        with self._lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id=repo_id, private=private, created_at=_now())
            self.repos[repo_id] = repo
            self._new_commit(repo, "main", {".gitattributes": Blob.of(GITATTRIBUTES, lfs=False)}, "initial commit")
            return repo

    def publish_folder(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revision: str = "main",
        private: bool = False,
        message: str = "Upload folder",
    ) -> str:
        """Commit every file of ``folder`` onto branch ``revision`` of ``repo_id`` (created if needed).

        Bypasses HTTP and tokens: it sets up what a test downloads. A new branch starts from ``main``.
        Returns the commit sha, usable as ``org/name@<sha>``.
        """
        folder = Path(folder)
        with self._lock:
            repo = self.create_repo(repo_id, private=private)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            files = dict(repo.commits[repo.branches[revision]].files)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                data = path.read_bytes()
                rel = path.relative_to(folder).as_posix()
                files[rel] = Blob.of(data, lfs=self.upload_mode(rel, len(data)) == "lfs")
            return self._new_commit(repo, revision, files, message).oid

    def create_branch(self, repo_id: str, branch: str, *, revision: str = "main") -> str:
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(revision)
            assert commit is not None, f"unknown revision {revision!r} of {repo_id}"
            repo.branches[branch] = commit.oid
            return commit.oid

    def create_tag(self, repo_id: str, tag: str, *, revision: str = "main") -> str:
        with self._lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(revision)
            assert commit is not None, f"unknown revision {revision!r} of {repo_id}"
            repo.tags[tag] = commit.oid
            return commit.oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, Blob]:
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            assert commit is not None, f"unknown revision {revision!r} of {repo_id}"
            return dict(commit.files)

    def upload_mode(self, path: str, size: int) -> Literal["lfs", "regular"]:
        name = path.rsplit("/", 1)[-1]
        if size > self.lfs_threshold_bytes or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS):
            return "lfs"
        return "regular"

    # ----------------------------------------------------------------- internals used by the handler
    def _record(self, request: RecordedRequest) -> Literal["drop", "500"] | None:
        """Record ``request``; return how it must fail when an injected failure hits it."""
        with self._lock:
            self._requests.append(request)
            hits = [rule.mode for rule in self._failures if rule.hit(request.kind)]  # every rule counts
            return hits[0] if hits else None

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, Blob], title: str) -> Commit:
        self._commit_counter += 1
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{title}\0{self._commit_counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_oid}\0".encode())
        commit = Commit(oid=digest.hexdigest(), parent=parent, title=title, date=_now(), files=files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _sign(self, repo_id: str, oid: str, size: int) -> str:
        return hmac.new(self._signing_key, f"{repo_id}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    # ----------------------------------------------------------------- access rules
    def _readable_repo(self, ctx: _Context, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (ctx.identity is None or repo.namespace not in ctx.identity.namespaces)):
            # like the Hub: a private repo you cannot see does not exist; anonymous callers get 401
            status = 401 if ctx.identity is None else 404
            raise HttpError(status, "Repository not found", "RepoNotFound")
        return repo

    def _writable_namespace(self, ctx: _Context, namespace: str) -> TokenInfo:
        if ctx.identity is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        if not ctx.identity.write:
            raise HttpError(403, "You have read access but not the required permissions for this operation")
        if not ctx.identity.may_write(namespace):
            raise HttpError(403, f"You don't have the rights to write under the namespace '{namespace}'")
        return ctx.identity

    def _writable_repo(self, ctx: _Context, repo_id: str) -> Repo:
        repo = self._readable_repo(ctx, repo_id)
        self._writable_namespace(ctx, repo.namespace)
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ----------------------------------------------------------------- routes
    def handle(self, kind: RequestKind, ctx: _Context, params: dict[str, str]) -> Response:
        route = {
            "whoami": self._whoami,
            "create-repo": self._create_repo_route,
            "validate-yaml": self._validate_yaml,
            "model-info": self._model_info,
            "tree": self._tree,
            "preupload": self._preupload,
            "commit": self._commit,
            "lfs-batch": self._lfs_batch,
            "lfs-upload": self._lfs_upload,
            "lfs-verify": self._lfs_verify,
            "resolve": self._resolve,
        }.get(kind)
        if route is None:
            raise HttpError(404, f"No route for {ctx.method} /{'/'.join(ctx.segments)}")
        with self._lock:
            return route(ctx, **params)

    def _whoami(self, ctx: _Context) -> Response:
        if ctx.identity is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        ident = ctx.identity
        access: dict[str, Any] = {"displayName": "tests", "role": ident.reported_role}
        if ident.scoped is not None:
            access["fineGrained"] = {
                "canReadGatedRepos": False,
                "global": ["discussion.write"],
                "scoped": [
                    {"entity": {"type": "user" if name == ident.user else "org", "name": name}, "permissions": list(p)}
                    for name, p in ident.scoped.items()
                ],
            }
        return Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(ident.user.encode()).hexdigest()[:24],
                "name": ident.user,
                "fullname": ident.user.title(),
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in ident.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": access,
                },
            }
        )

    def _create_repo_route(self, ctx: _Context) -> Response:
        payload = json.loads(ctx.body or b"{}")
        if payload.get("type", "model") != "model":
            raise HttpError(400, "Only model repos are supported by this test server")
        namespace = payload.get("organization") or (ctx.identity.user if ctx.identity else None)
        # the Hub checks the right to write in the namespace before looking whether the repo exists
        self._writable_namespace(ctx, namespace or "")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return Response.json({"error": "You already created this model repo", "url": url}, status=409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private)
        return Response.json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _validate_yaml(self, ctx: _Context) -> Response:
        content = json.loads(ctx.body or b"{}").get("content", "")
        try:
            _front_matter(content)
        except ValueError as err:
            return Response.json({"errors": [{"message": str(err)}], "warnings": []}, status=400)
        return Response.json({"errors": [], "warnings": []})

    def _model_info(self, ctx: _Context, repo_id: str, revision: str = "main") -> Response:
        repo = self._readable_repo(ctx, repo_id)
        commit = self._commit_at(repo, revision)
        with_blobs = _flag(ctx.query, "blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.lfs:
                    entry = blob.tree_entry(path)["lfs"]
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": entry["pointerSize"]}
            siblings.append(sibling)
        card = _card_data(commit)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []),
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "cardData": card or None,
            "siblings": siblings,
        }
        safetensors = _safetensors_summary(commit)
        if safetensors:
            info["safetensors"] = safetensors
        return Response.json(info)

    def _tree(self, ctx: _Context, repo_id: str, revision: str, path: str = "") -> Response:
        repo = self._readable_repo(ctx, repo_id)
        commit = self._commit_at(repo, revision)
        recursive = _flag(ctx.query, "recursive")
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HttpError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, blob in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way, as the Hub lists them
                folder = prefix + "/".join(parts[:depth])
                if depth == 1 or recursive:
                    entries.setdefault(folder, _folder_entry(folder))
            if len(parts) == 1 or recursive:
                entries[file_path] = blob.tree_entry(file_path)
        return Response.json(list(entries.values()))

    def _preupload(self, ctx: _Context, repo_id: str, revision: str) -> Response:
        repo = self._writable_repo(ctx, repo_id)
        commit = self._commit_at(repo, revision)
        answers = []
        for item in json.loads(ctx.body)["files"]:
            path, size = item["path"], int(item["size"])
            existing = commit.files.get(path)
            # the client compares this oid with its own (sha256 for LFS, git oid otherwise) to skip unchanged files
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            mode = self.upload_mode(path, size)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        return Response.json({"files": answers, "commitOid": commit.oid})

    def _commit(self, ctx: _Context, repo_id: str, revision: str) -> Response:
        repo = self._writable_repo(ctx, repo_id)
        if _flag(ctx.query, "create_pr"):
            raise HttpError(400, "Pull requests are not supported by this test server")
        head = self._commit_at(repo, revision)
        if revision not in repo.branches:
            raise HttpError(400, f"Can only commit to a branch, not to {revision!r}")
        files = dict(head.files)
        title = "commit"
        for line in ctx.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                title = value["summary"]
                if value.get("parentCommit") not in (None, head.oid):
                    raise HttpError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = Blob.of(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = repo.lfs_objects.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HttpError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob.of(data, lfs=True, sha256=value["oid"])  # checked by _lfs_upload
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise HttpError(400, f"Unknown commit operation {key!r}")
        commit = self._new_commit(repo, revision, files, title)
        # the client builds its CommitInfo from this url, so it must be on this server's own host
        url = f"{self.url}/{repo_id}/commit/{commit.oid}"
        return Response.json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _lfs_batch(self, ctx: _Context, repo_id: str) -> Response:
        payload = json.loads(ctx.body)
        if payload.get("operation") != "upload":
            raise HttpError(400, "This test server only implements LFS uploads")
        repo = self._writable_repo(ctx, repo_id)
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            stored = repo.lfs_objects.get(oid)
            if stored is None or len(stored) != size:  # present objects get no actions: the client skips them
                signature = self._sign(repo_id, oid, size)
                upload = f"{self.url}/_lfs-upload/{quote(repo_id, safe='/')}/{oid}?size={size}&sig={signature}"
                verify = f"{self.url}/{repo_id}.git/info/lfs/objects/verify"
                answer["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
            objects.append(answer)
        return Response.json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_upload(self, ctx: _Context, repo_id: str, oid: str) -> Response:
        # like an S3 pre-signed URL: no Authorization header, the signature in the query is the credential
        size = int(ctx.query.get("size", ["-1"])[0])
        if not hmac.compare_digest(ctx.query.get("sig", [""])[0], self._sign(repo_id, oid, size)):
            raise HttpError(403, "SignatureDoesNotMatch")
        if len(ctx.body) != size or ctx.body_sha256 != oid:
            raise HttpError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self.repos[repo_id].lfs_objects[oid] = ctx.body
        return Response(200, b"", {"ETag": f'"{ctx.body_md5}"'})

    def _lfs_verify(self, ctx: _Context, repo_id: str) -> Response:
        repo = self._writable_repo(ctx, repo_id)
        payload = json.loads(ctx.body)
        stored = repo.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise HttpError(404, f"LFS object {payload['oid']} not found")
        return Response.json({"success": True})

    def _resolve(self, ctx: _Context, repo_id: str, revision: str, path: str) -> Response:
        repo = self._readable_repo(ctx, repo_id)
        commit = self._commit_at(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HttpError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": commit.oid,
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        byte_range = _parse_range(ctx.headers.get("range"), blob.size)
        if byte_range is None:
            return Response(200, blob.data, headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return Response(206, blob.data[start : end + 1], headers)


def _folder_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "path": path, "oid": git_blob_oid(path.encode()), "size": 0}


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); 416 when it misses the file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].partition("-")
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise HttpError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _front_matter(readme: str) -> dict[str, Any]:
    """The YAML block at the top of a model card; ValueError when it is not a mapping of valid YAML."""
    lines = readme.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---")
    except StopIteration:
        raise ValueError("README.md front matter opens with '---' but never closes") from None
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in README.md front matter: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md front matter must be a YAML mapping")
    return data


def _card_data(commit: Commit) -> dict[str, Any]:
    readme = commit.files.get("README.md")
    if readme is None:
        return {}
    try:
        return _front_matter(readme.data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}


def _safetensors_summary(commit: Commit) -> dict[str, Any] | None:
    """The ``safetensors`` block of model info: parameter counts per dtype, read from the shard headers."""
    per_dtype: dict[str, int] = {}
    for path, blob in commit.files.items():
        if not path.endswith(".safetensors") or blob.size < 8:
            continue
        (header_len,) = struct.unpack("<Q", blob.data[:8])
        try:
            header = json.loads(blob.data[8 : 8 + header_len])
        except ValueError:
            continue
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            per_dtype[meta["dtype"]] = per_dtype.get(meta["dtype"], 0) + count
    if not per_dtype:
        return None
    return {"parameters": per_dtype, "total": sum(per_dtype.values())}


def _route(method: str, seg: list[str]) -> tuple[RequestKind, dict[str, str]]:
    """Map a request to a route kind and its parameters (segments are already URL-decoded)."""
    if seg == ["api", "whoami-v2"] and method == "GET":
        return "whoami", {}
    if seg == ["api", "repos", "create"] and method == "POST":
        return "create-repo", {}
    if seg == ["api", "validate-yaml"] and method == "POST":
        return "validate-yaml", {}
    if seg[:2] == ["api", "models"] and len(seg) >= 4:
        repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
        if not rest and method == "GET":
            return "model-info", {"repo_id": repo_id}
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            return "model-info", {"repo_id": repo_id, "revision": rest[1]}
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            return "tree", {"repo_id": repo_id, "revision": rest[1], "path": "/".join(rest[2:])}
        if len(rest) == 2 and method == "POST" and rest[0] in ("preupload", "commit"):
            return rest[0], {"repo_id": repo_id, "revision": rest[1]}  # type: ignore[return-value]
    if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and method == "POST":
        repo_id = f"{seg[0]}/{seg[1][: -len('.git')]}"
        if seg[5] == "batch":
            return "lfs-batch", {"repo_id": repo_id}
        if seg[5] == "verify":
            return "lfs-verify", {"repo_id": repo_id}
    if len(seg) == 4 and seg[0] == "_lfs-upload" and method == "PUT":
        return "lfs-upload", {"repo_id": f"{seg[1]}/{seg[2]}", "oid": seg[3]}
    if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
        return "resolve", {"repo_id": f"{seg[0]}/{seg[1]}", "revision": seg[3], "path": "/".join(seg[4:])}
    return "unknown", {}


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # bound per server by HubServer.start
    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every answer carries a Content-Length

    def setup(self) -> None:
        super().setup()
        # headers and body leave in two writes; without NODELAY, Nagle + delayed ACK add 40 ms to each answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the recorded requests are the log; stderr noise would bury test output

    def _serve(self, method: str) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = parse_qs(url.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        body = self._read_body()
        kind, params = _route(method, segments)
        record = RecordedRequest(method, url.path, query, headers, len(body), kind, started=started)
        if kind in ("lfs-upload", "commit"):
            with self.hub._lock:
                self.hub.uploaded_bytes += len(body)
        failure = self.hub._record(record)
        if failure == "drop":
            self.close_connection = True  # hang up without a byte: the client sees a dropped connection
            return
        if failure == "500":
            response = Response.json({"error": "Internal Error (injected by the test)"}, status=500)
        else:
            try:
                ctx = _Context(method, segments, query, headers, body, self._identity(headers),
                               *(h.hexdigest() for h in self._digests))
                response = self.hub.handle(kind, ctx, params)
            except HttpError as err:
                extra = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    extra["X-Error-Code"] = err.code
                response = Response.json({"error": err.message}, status=err.status, headers=extra)
            except Exception as err:  # noqa: BLE001 - a bug in this server (or a request it cannot parse)
                self.hub.server_errors.append(f"{method} {url.path}: {type(err).__name__}: {err}")
                response = Response.json({"error": f"test server error: {err}"}, status=500)
        record.status = response.status
        if method != "HEAD":
            record.response_bytes = len(response.body)
            if kind == "resolve":
                with self.hub._lock:
                    self.hub.downloaded_bytes += len(response.body)
        self._send(response, head_only=method == "HEAD", throttle=self.hub._down if kind == "resolve" else None)
        record.finished = time.monotonic()

    def _identity(self, headers: dict[str, str]) -> TokenInfo | None:
        auth = headers.get("authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        identity = self.hub.tokens.get(token)
        if identity is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return identity

    def _read_body(self) -> bytes:
        """The request's body, its slices paced by the upload limit; its sha256 and md5 (``_digests``) are
        taken as each slice comes, as a store hashes a stream while it arrives: hashed once whole, a 15 MB
        body held its answer (and so the link) some 30 ms."""
        ended = None  # when the last slice's turn on the link ended (_Throttle.take)
        self._digests = (hashlib.sha256(), hashlib.md5())
        chunks: list[bytes] = []

        def keep(data: bytes) -> None:
            chunks.append(data)
            for digest in self._digests:
                digest.update(data)

        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                ended = self.hub._up.take(size, ended)
                keep(self.rfile.read(size))
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:  # in slices, so that a bandwidth limit paces the upload as a slow link would
            step = min(left, _SLICE)
            ended = self.hub._up.take(step, ended)
            data = self.rfile.read(step)
            if not data:
                break
            keep(data)
            left -= len(data)
        return b"".join(chunks)

    def _send(self, response: Response, *, head_only: bool, throttle: _Throttle | None = None) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if head_only:
            return
        body, ended = memoryview(response.body), None
        for start in range(0, len(body), _SLICE):
            if throttle is not None:
                ended = throttle.take(min(_SLICE, len(body) - start), ended)
            self.wfile.write(body[start : start + _SLICE])


# ----------------------------------------------------------------- accounts the `hub` fixture knows
ALICE, ORG, BOB = "alice", "lazyorg", "bob"
#: shaped like real tokens and unique, so a test can search logs and files for them
ALICE_WRITE_TOKEN = "hf_TestAliceWrite7Qm2Lx9Vb4Np8Rk1Zt"
ALICE_READ_TOKEN = "hf_TestAliceRead3Hd6Wz0Ty5Fc2Gs7Pq"
BOB_WRITE_TOKEN = "hf_TestBobWrite8Jn4Kp1Xe6Ua9Lv3Wm"
#: a fine-grained token whose permissions do not include writing: whoami cannot tell, the writes get 403
ALICE_FINE_GRAINED_TOKEN = "hf_TestAliceFine5Rt8Yu1Io4Pa7Sd0Fg"
#: a fine-grained token whose whoami lists its scopes: it may write to lazyorg, only read alice's repos
ALICE_ORG_ONLY_TOKEN = "hf_TestAliceOrgOnly2Wq5Er8Ty1Ui4Op"


def add_test_accounts(server: HubServer) -> None:
    """alice (member of lazyorg) with a write, a read-only and a fine-grained read token; bob with a write token."""
    server.add_token(ALICE_WRITE_TOKEN, ALICE, orgs=(ORG,), write=True)
    server.add_token(ALICE_READ_TOKEN, ALICE, orgs=(ORG,), write=False)
    server.add_token(ALICE_FINE_GRAINED_TOKEN, ALICE, orgs=(ORG,), write=False, role="fineGrained")
    server.add_token(BOB_WRITE_TOKEN, BOB, write=True)
    server.add_token(ALICE_ORG_ONLY_TOKEN, ALICE, orgs=(ORG,), role="fineGrained",
                     scoped={ALICE: ("repo.content.read",), ORG: ("repo.content.read", "repo.write")})
