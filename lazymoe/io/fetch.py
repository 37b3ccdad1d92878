"""Only the bytes a merge reads, fetched from the Hub by HTTP ranges while the merge runs.

:class:`RangedWeights` takes, in the order they will be read, the tensors a merge needs from each model. For
a Hub model it groups tensors that lie next to each other in one weight file and are read together (one
output shard, whichever reader comes first; tensors only the router pass reads, its group) into a *chunk*,
so a shard is complete once its own bytes are in, and fetches chunks in reading order with a
pool of threads, big chunks as several ranges at once (``io.ranges``), at most ``window`` bytes ahead of
the writer. Two readers may share one stream of fetches: the writer (``done(step)`` as it passes each output
tensor) and the router pass, running in a thread of its own (``router_done()`` when it ends); a chunk is kept
until both have passed it. Each chunk lands in a file of the range cache
(``$HF_HOME/lazymoe/ranges/REPO/COMMIT/``), written under a temporary name and renamed when complete, so a
later merge reuses it instead of fetching again. With ``release`` every chunk is deleted once its last
reader has passed: disk stays near ``window``.

Weight files already complete in the Hugging Face cache, and local folders, are read where they are:
nothing is downloaded or stored twice.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import constants
from tqdm.auto import tqdm

from ..errors import HubError, LazyMoEError, WriteError
from ..lazy import hf_hub
from .outdir import DISK_FULL, disk_full_error
from .ranges import read_range
from .safetensors import TensorInfo
from .token import env_tokens, redact
from .sources import ModelInfo, WeightStore

logger = logging.getLogger(__name__)

#: adjacent tensors are fetched as one chunk up to this size; one range request moves at most PART bytes.
#: Parts are fetched in reading order by WORKERS threads sharing one link: small parts keep the bytes needed
#: next arriving first (a part gets 1/WORKERS of the link), large enough that a request's latency is small
#: beside its transfer. A chunk under WORKERS x PART bytes is cut into WORKERS equal parts (none under
#: MIN_PART), so that it is alone in flight and chunks arrive one after another, each at the whole link's
#: speed. Cut at PART, a 15 MB chunk was four requests sharing the link with four of the next chunk's: the
#: first shard came in half as fast as it could, and later shards in pairs, which left the upload (as fast
#: as the download) waiting for the second of each pair.
CHUNK_MAX = 64 << 20
PART = 4 << 20
MIN_PART = 1 << 20
#: requests in flight
WORKERS = 8
#: the step of the router pass's reads when they happen before any output tensor is written
ROUTER_STEP = -1


def part_size(nbytes: int, workers: int) -> int:
    """The bytes of one range request for a chunk of ``nbytes``: PART, or less so that the chunk makes at
    least ``workers`` requests (none under MIN_PART), all of which run at once."""
    return max(MIN_PART, min(PART, -(-nbytes // max(workers, 1))))


def range_cache_dir() -> Path:
    """Where fetched ranges are kept: beside the Hugging Face cache (``HF_HOME``), read at call time."""
    return Path(constants.HF_HOME) / "lazymoe" / "ranges"


def range_cache_error(err: OSError, cache: Path) -> LazyMoEError:
    """What to say when the range cache ``cache`` cannot be written."""
    if err.errno in DISK_FULL:
        return disk_full_error(err, cache, cleaned=False)
    return WriteError(f"Cannot keep the fetched ranges in {cache} ({err.strerror}): make that folder writable (it is "
                      "under HF_HOME; set HF_HOME to a folder you can write to), then run the merge again.")


def check_range_cache(cache: Path | None = None) -> None:
    """That the range cache can be made and written to: checked before anything is fetched or made on the Hub."""
    cache = cache or range_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as err:
        raise range_cache_error(err, cache) from None


@dataclass(frozen=True)
class Read:
    """One tensor a merge reads: from model ``ref``, at ``step`` (an output tensor's index, or
    ``ROUTER_STEP``), in ``group`` (tensors of one group may share a chunk); ``router``: the router pass reads
    it (its chunk is kept until ``router_done``), else the writer."""

    ref: str
    name: str
    step: int
    group: int
    router: bool = False


@dataclass
class _Chunk:
    ref: str
    repo_id: str
    commit: str
    filename: str
    start: int
    end: int
    path: Path
    names: list[str] = field(default_factory=list)
    first: int = 0
    last: int = 0  # once the writer passes this step, the chunk leaves the window
    router: bool = False  # the router pass reads it: kept (on disk) until router_done
    submitted: bool = False
    cached: bool = False  # found complete in the range cache: nothing to fetch
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    parts_left: int = 0
    passed: bool = False  # out of the window: the writer is past it
    released: bool = False  # no reader left (deleted with ``release``)

    @property
    def size(self) -> int:
        return self.end - self.start


def same_files(models: dict[str, ModelInfo], whole: frozenset[str] = frozenset()) -> dict[str, str]:
    """Each ranged Hub model's ref -> the first ref naming the same repo at the same commit (``org/m`` and
    ``org/m@<its commit>``: one set of files), so that their tensors share chunks instead of two chunks
    fetching into one file."""
    first: dict[tuple[str, str | None], str] = {}
    return {ref: first.setdefault((info.ref.repo_id, info.commit), ref) for ref, info in models.items()
            if info.ref.repo_id is not None and ref not in whole}


def plan_chunks(models: dict[str, ModelInfo], reads: Iterable[Read], cache: Path,
                whole: frozenset[str] = frozenset()) -> tuple[list[_Chunk], dict]:
    """Group the reads of Hub models into chunks; returns the chunks in fetch order and, for every
    (ref, name) they hold, its chunk. Tensors of local models, of models in ``whole`` and of files complete
    in the Hugging Face cache are left out."""
    first: dict[tuple[str, str], Read] = {}
    last: dict[tuple[str, str], int] = {}
    router: set[tuple[str, str]] = set()
    shard: dict[tuple[str, str], int] = {}  # the writer's group (its output shard) of a tensor it reads
    for read in reads:
        key = (read.ref, read.name)
        first.setdefault(key, read)
        last[key] = max(last.get(key, read.step), read.step)
        if read.router:
            router.add(key)
        else:
            shard.setdefault(key, read.group)

    def group(key: tuple[str, str]) -> int:
        # a tensor the writer reads shares a chunk only with tensors of its own shard, even when the router
        # pass reads it first: a shard is complete, and uploaded, once its own bytes are in, not when a
        # chunk reaching into the next shard is
        return shard.get(key, first[key].group)

    by_file: dict[tuple[str, Path], list[TensorInfo]] = {}
    for (ref, name) in first:
        info = models[ref]
        if info.ref.repo_id is None or ref in whole:
            continue
        t = info.tensors[name]
        by_file.setdefault((ref, t.file), []).append(t)
    chunks: list[_Chunk] = []
    for (ref, file), tensors in by_file.items():
        info = models[ref]
        if isinstance(hf_hub.try_to_load_from_cache(info.ref.repo_id, file.name, revision=info.commit), str):
            continue  # complete in the Hugging Face cache: read there
        where = cache / info.ref.repo_id.replace("/", "--") / info.commit
        current: _Chunk | None = None
        for t in sorted(tensors, key=lambda t: t.offset):
            read = first[(ref, t.name)]
            if (current is None or current.end != t.offset or current.size + t.nbytes > CHUNK_MAX
                    or group((ref, current.names[0])) != group((ref, t.name))):
                current = _Chunk(ref, info.ref.repo_id, info.commit, file.name, t.offset, t.offset, where,
                                 first=read.step, last=last[(ref, t.name)])
                chunks.append(current)
            current.names.append(t.name)
            current.end = t.offset + t.nbytes
            current.first = min(current.first, read.step)
            current.last = max(current.last, last[(ref, t.name)])
            current.router = current.router or (ref, t.name) in router
    for c in chunks:
        c.path = c.path / f"{c.filename}.{c.start}-{c.end}"
    chunks.sort(key=lambda c: (c.first, c.ref, c.filename, c.start))
    holder = {(c.ref, name): c for c in chunks for name in c.names}
    return chunks, holder


class RangedWeights:
    """Tensors of the merge's models as local files (the ``WeightStore`` interface): Hub models' tensors are
    fetched by ranges ahead of the reader; see the module docstring.

    ``reads`` lists every tensor the merge will read, in order; a tensor not listed is fetched when asked.
    ``done(step)`` tells that every read of ``step`` (an output tensor's index) is over, ``router_done()``
    that the router pass is. Both may come from different threads (``resolve`` too). Models in ``whole``
    are downloaded as whole files instead (``WeightStore``), for a router pass that loads them as models.
    """

    def __init__(self, models: dict[str, ModelInfo], reads: list[Read], *, whole: frozenset[str] = frozenset(),
                 release: bool = False, window: int = 1 << 30, workers: int = WORKERS, cache: Path | None = None,
                 progress: bool = True):
        self.models = dict(models)
        self.release_enabled = release
        self.window = window
        self.cache = cache or range_cache_dir()
        self._reads = list(reads)
        self._whole = WeightStore({r: m for r, m in self.models.items() if r in whole}, release=release)
        self._whole_last = {r: max((x.step for x in self._reads if x.ref == r), default=ROUTER_STEP) for r in whole}
        self._alias = same_files(self.models, frozenset(whole))  # the ref that holds each ref's chunks
        self._chunks, self._holder = plan_chunks(
            self.models, [replace(r, ref=self._alias.get(r.ref, r.ref)) for r in self._reads], self.cache,
            frozenset(whole))
        self._router_names: dict[str, list[str]] = {}
        for read in self._reads:
            if read.router:
                self._router_names.setdefault(read.ref, []).append(read.name)
        self._lock = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazymoe-fetch")
        self._workers = workers
        self._ahead = 0  # bytes fetched (or being fetched) whose last reader has not passed
        self._closed = False
        self._step = ROUTER_STEP - 1  # the last step done
        self._router_finished = not any(r.router for r in self._reads)
        #: bytes received from the Hub, and the range requests that carried them
        self.fetched_bytes = 0
        self.requests = 0
        self._bar = tqdm(total=sum(c.size for c in self._chunks), unit="B", unit_scale=True, unit_divisor=1024,
                         desc="Fetching weights", disable=not progress or not self._chunks)
        for c in self._chunks:
            if c.path.is_file() and c.path.stat().st_size == c.size:
                c.cached = c.submitted = True
                c.done.set()
                self._bar.update(c.size)
        self._feeder = threading.Thread(target=self._feed, name="lazymoe-fetch-feeder", daemon=True)
        self._feeder.start()

    # ------------------------------------------------------------------ what a merge asks
    @property
    def needed_bytes(self) -> int:
        """Bytes of the Hub models' tensors that this merge reads and are not on disk yet."""
        return sum(c.size for c in self._chunks if not c.cached)

    def local(self, ref: str, *, wait: bool = True, resolve=None) -> ModelInfo:
        """``ref``'s info with the tensors the router pass reads on local disk. ``wait=False``: each is
        located when first looked up (through ``resolve``, default ``self.resolve``), so a pass that reads a
        layer at a time waits for that layer only."""
        info = self.models[ref]
        if ref in self._whole_last:
            return self._whole.local(ref)
        if info.ref.repo_id is None:
            return info
        names = self._router_names.get(ref, [])
        if not wait:
            return replace(info, tensors=_Located(names, lambda name: (resolve or self.resolve)(ref, name)))
        return replace(info, tensors={name: self.resolve(ref, name) for name in names})

    def resolve(self, ref: str, name: str) -> TensorInfo:
        """Where tensor ``name`` of ``ref`` is on local disk; waits for its chunk (fetching it now if it was
        not planned)."""
        info = self.models[ref]
        if ref in self._whole_last:
            return self._whole.resolve(ref, name)
        tensor = info.tensors[name]
        if info.ref.repo_id is None:
            return tensor
        ref = self._alias.get(ref, ref)
        chunk = self._holder.get((ref, name))
        if chunk is None:
            cached = hf_hub.try_to_load_from_cache(info.ref.repo_id, tensor.file.name, revision=info.commit)
            if isinstance(cached, str):
                return replace(tensor, file=Path(cached))
            chunk = self._unplanned(ref, tensor)
        self._want(chunk)
        chunk.done.wait()
        if chunk.error is not None:
            raise self._error(chunk)
        return replace(tensor, file=chunk.path, offset=tensor.offset - chunk.start)

    def release(self, ref: str) -> int:
        """``WeightStore`` interface: chunks are released by step (``done``), not by model."""
        return 0

    def done(self, step: int) -> None:
        """The writer's reads of ``step`` are over: release the chunks (and whole models) no later step and
        no running router pass reads."""
        for ref, last in self._whole_last.items():
            if last == step:
                self._whole.release(ref)
        with self._lock:
            self._step = step
            self._sweep()

    def router_done(self) -> None:
        """The router pass is over: release what only it kept."""
        with self._lock:
            self._router_finished = True
            self._step = max(self._step, ROUTER_STEP)
            self._sweep()

    def close(self) -> None:
        """Stop fetching; delete partial chunks (and, with ``release``, every chunk)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._feeder.join()
        self._bar.close()
        for c in self._chunks:
            _unlink(c.path.with_name(c.path.name + ".incomplete"))
            if self.release_enabled and not c.cached:
                _unlink(c.path)

    def __enter__(self) -> "RangedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ fetching
    def _unplanned(self, ref: str, tensor: TensorInfo) -> _Chunk:
        info = self.models[ref]
        where = self.cache / info.ref.repo_id.replace("/", "--") / info.commit
        with self._lock:  # two readers may ask for the same tensor at once: one chunk
            chunk = self._holder.get((ref, tensor.name))
            if chunk is not None:
                return chunk
            chunk = _Chunk(ref, info.ref.repo_id, info.commit, tensor.file.name, tensor.offset,
                           tensor.offset + tensor.nbytes, where / f"{tensor.file.name}.{tensor.offset}-"
                           f"{tensor.offset + tensor.nbytes}", names=[tensor.name], first=self._step, last=1 << 62)
            self._chunks.append(chunk)
            self._holder[(ref, tensor.name)] = chunk
            if chunk.path.is_file() and chunk.path.stat().st_size == chunk.size:
                chunk.cached = chunk.submitted = True
                chunk.done.set()
        return chunk

    def _want(self, chunk: _Chunk) -> None:
        with self._lock:
            if not chunk.submitted:
                if self._closed:  # a reader still running after close (the router pass): it stops here
                    raise HubError("the download was stopped")
                self._submit(chunk)

    def _feed(self) -> None:
        """Submit chunks in reading order, keeping at most ``window`` bytes ahead of the writer. A router pass
        that runs before the writer has its chunks first and alone: nothing is written (so nothing uploaded)
        before it ends, so they get the whole bandwidth."""
        router = [c for c in self._chunks if c.first == ROUTER_STEP]
        try:
            for chunk in router:
                self._want(chunk)
        except HubError:
            return  # closed
        for chunk in router:
            while not chunk.done.wait(0.1):
                if self._closed:
                    return
        for chunk in list(self._chunks):
            with self._lock:
                while (not self._closed and not chunk.submitted and self._ahead > 0
                       and self._ahead + chunk.size > self.window):
                    self._lock.wait()
                if self._closed:
                    return
                if not chunk.submitted:
                    self._submit(chunk)

    def _submit(self, chunk: _Chunk) -> None:  # holding the lock
        chunk.submitted = True
        self._ahead += chunk.size
        partial = chunk.path.with_name(chunk.path.name + ".incomplete")
        try:
            chunk.path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                f.truncate(chunk.size)
        except OSError as err:  # a full disk, a cache folder that cannot be made: its readers get the error
            chunk.error = err
            chunk.done.set()
            self._lock.notify_all()
            return
        part = part_size(chunk.size, self._workers)
        starts = list(range(chunk.start, chunk.end, part)) or [chunk.start]
        chunk.parts_left = len(starts)
        if chunk.size == 0:
            self._finish(chunk, partial)
            return
        for start in starts:
            future: Future = self._pool.submit(self._fetch_part, chunk, partial, start, min(start + part, chunk.end))
            future.add_done_callback(lambda f, c=chunk, p=partial: self._part_done(f, c, p))

    def _fetch_part(self, chunk: _Chunk, partial: Path, start: int, end: int) -> None:
        data, _ = read_range(chunk.repo_id, chunk.commit, chunk.filename, start, end)
        fd = os.open(partial, os.O_WRONLY)
        try:
            view, at = memoryview(data), start - chunk.start
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
        finally:
            os.close(fd)
        with self._lock:
            self.fetched_bytes += len(data)
            self.requests += 1
        self._bar.update(len(data))

    def _part_done(self, future: Future, chunk: _Chunk, partial: Path) -> None:
        error = None if future.cancelled() else future.exception()
        with self._lock:
            if future.cancelled():
                error = error or HubError("the download was stopped")
            if error is not None and chunk.error is None:
                chunk.error = error
            chunk.parts_left -= 1
            if chunk.parts_left > 0:
                return
            if chunk.error is None:
                try:
                    self._finish(chunk, partial)
                except OSError as err:  # the range cache changed under us: the reader is told, not left waiting
                    chunk.error = err
            if chunk.error is not None:
                _unlink(partial)
            chunk.done.set()
            self._lock.notify_all()

    def _finish(self, chunk: _Chunk, partial: Path) -> None:  # holding the lock
        os.replace(partial, chunk.path)
        chunk.done.set()
        self._sweep_one(chunk)

    def _sweep(self) -> None:  # holding the lock
        for c in self._chunks:
            self._sweep_one(c)
        self._lock.notify_all()

    def _sweep_one(self, chunk: _Chunk) -> None:  # holding the lock
        """Out of the window once the writer is past it; released (deleted with ``release``) once the router
        pass is over too, if it reads it."""
        if not chunk.submitted or not chunk.done.is_set() or chunk.released:
            return
        if not chunk.passed and chunk.last <= self._step:
            chunk.passed = True
            if not chunk.cached:
                self._ahead -= chunk.size
        if chunk.passed and (self._router_finished or not chunk.router):
            chunk.released = True
            if self.release_enabled and not chunk.cached:
                _unlink(chunk.path)

    def _error(self, chunk: _Chunk) -> LazyMoEError:
        err = chunk.error
        if isinstance(err, OSError) and err.errno is not None:  # this machine's disk, not the network
            return range_cache_error(err, self.cache)
        cause = " ".join(redact(str(err), env_tokens()).split())[:300] or type(err).__name__
        kept = "" if self.release_enabled else " The ranges already fetched are kept and will not be fetched again."
        return HubError(
            f"Downloading {chunk.filename} of {chunk.repo_id} failed ({type(err).__name__}: {cause}). Check the "
            f"network, then run the merge again.{kept}"
        )


class _Located(Mapping):
    """A model's tensors by name, each located (fetched if need be) when first looked up."""

    def __init__(self, names: list[str], locate):
        self._names, self._locate, self._found = list(dict.fromkeys(names)), locate, {}

    def __getitem__(self, name: str) -> TensorInfo:
        if name not in self._found:
            if name not in self._names:
                raise KeyError(name)
            self._found[name] = self._locate(name)
        return self._found[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):  # gone, or its folder never could be made
        pass
