#!/usr/bin/env python3
"""Side-by-side merge benchmark: ``lazymoe merge`` vs ``mergekit-moe`` vs a plain copy of the bytes.

    python bench/merge_bench.py --repeat 3           # 4 Mistral-shaped experts, 4 layers: ~6.5 GB output
    python bench/merge_bench.py --layers 2 --runs copy,lazymoe,mergekit --verify spot   # quicker

What it does, in one run:
1. builds synthetic dense Llama experts of the chosen shape (random bytes, real layout, a real tiny
   tokenizer) under ``bench/.work/synth`` and reuses them on later runs;
2. writes one mergekit-moe YAML that both tools read unchanged;
3. installs PyPI ``mergekit`` into its own virtualenv ``bench/.work/mkvenv`` (torch pinned to the local
   build first, so pip never pulls a CUDA torch);
4. runs, each in a fresh process with the page cache dropped beforehand: a plain copy of exactly the bytes
   the MoE needs (the physical limit), ``lazymoe merge`` (classic and fused layouts), ``mergekit-moe`` at
   the same shard size and at its default, and lazymoe at a small and a large shard size;
5. checks every output tensor against the source bytes (so both tools are shown to build the same model)
   and prints a markdown report, also written to ``bench/results/merge_bench.md``.

Measurement (see bench/README.md for the reasoning): wall time to exit plus the time to fsync the output
(data still in the page cache when a tool exits is not yet on disk); peak RSS as the kernel's high-water
mark of the largest process (``wait4`` ru_maxrss, what ``/usr/bin/time -v`` prints) and anonymous RSS of
the whole process tree sampled at 10 Hz; I/O from ``/proc/<pid>/io`` of a wrapper process, which includes
every descendant it reaped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing _synth at run time pulls in torch (see below)
    import _synth

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # for _synth, imported in main() only: it pulls in torch, and the
# measurement wrapper and the copy baseline, which run this same file, must stay light
sys.path.insert(0, str(REPO))  # the lazymoe checked out here, not an installed copy

from lazymoe.io.safetensors import TensorInfo, scan_file  # noqa: E402  (headers only: no torch)

DEFAULT_WORK = HERE / ".work"
DEFAULT_RESULTS = HERE / "results" / "merge_bench.md"
SAMPLE_INTERVAL_S = 0.1
COPY_CHUNK = 64 << 20


# ============================================================================ small helpers


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; same units as ``lazymoe --max-shard-size`` (decimal GB, binary GiB)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    if s[len(num):] not in units or not num:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB or 500MB")
    return int(float(num) * units[s[len(num):]])


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def rel(path: Path | str) -> str:
    """Paths in the report relative to the repo, so it reads the same on every machine."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def read_proc_io(pid: str | int = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = int(value)
    return out


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    # lazymoe builds into a hidden sibling and renames it; an interrupted run may leave one behind
    for leftover in path.parent.glob(f".{path.name}.lazymoe-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ============================================================================ safetensors headers


#: where one tensor's bytes live (file, absolute offset, nbytes, dtype, shape): enough to copy or compare them
Entry = TensorInfo


def read_index(folder: Path) -> dict[str, Entry]:
    """Every tensor of a safetensors checkpoint folder (sharded or not), from the headers alone."""
    entries: dict[str, Entry] = {}
    for f in sorted(folder.glob("*.safetensors")):
        entries.update(scan_file(f))
    return entries


def oversized_shards(folder: Path, limit: int) -> list[str]:
    """Shards over ``limit`` bytes that hold more than one tensor (one tensor larger than the limit must
    get a shard of its own, as in transformers' own sharding, so that alone is no violation)."""
    per_file: dict[Path, int] = {}
    for e in read_index(folder).values():
        per_file[e.file] = per_file.get(e.file, 0) + 1
    return [f.name for f, n in per_file.items() if n > 1 and f.stat().st_size > limit]


# ============================================================================ what the MoE needs


@dataclass
class Workload:
    shape: _synth.Shape
    experts: list[Path]
    config: Path

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def input_files(self) -> list[Path]:
        return sorted({e.file for folder in self.experts for e in read_index(folder).values()})

    def needed(self) -> list[tuple[str, Entry]]:
        """(logical key, source) for every non-router output tensor: base non-MLP tensors, expert MLPs.

        The keys are layout-free, so outputs in the classic and the fused layout can both be checked
        against this one list.
        """
        base = read_index(self.experts[0])
        out = [(name, e) for name, e in base.items() if ".mlp." not in name]
        for idx, folder in enumerate(self.experts):
            src = read_index(folder)
            for layer in range(self.shape.layers):
                for part in ("gate", "up", "down"):
                    out.append((f"L{layer}.E{idx}.{part}", src[f"model.layers.{layer}.mlp.{part}_proj.weight"]))
        return out

    def needed_bytes(self) -> int:
        return sum(e.nbytes for _, e in self.needed())

    def router_bytes(self) -> int:
        return self.shape.layers * self.num_experts * self.shape.hidden * self.shape.itemsize

    def input_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.input_files())


def expected_output_bytes(shape: _synth.Shape, num_experts: int) -> tuple[int, int]:
    """(bytes of the MoE's tensors, bytes of all inputs) from the shape alone, for the disk check."""
    mlp = sum(shape.nbytes(d) for n, d in shape.tensors() if ".mlp." in n)
    dense = sum(shape.nbytes(d) for _, d in shape.tensors())
    router = shape.layers * num_experts * shape.hidden * shape.itemsize
    return dense - mlp + num_experts * mlp + router, num_experts * dense


# ============================================================================ output layouts -> logical keys

_CLASSIC_PART = {"w1": "gate", "w3": "up", "w2": "down"}
_CLASSIC_NAME = {v: k for k, v in _CLASSIC_PART.items()}


def logical_view(folder: Path, num_experts: int) -> tuple[dict[str, list[tuple[Path, int, int]]], dict[str, Entry], list[str]]:
    """Map an MoE output to (logical key -> byte ranges, router entries, unrecognised tensor names).

    classic: ``block_sparse_moe.experts.E.w1/w2/w3`` are one tensor per expert and part;
    fused (transformers 5, mergekit 0.1.5): ``mlp.experts.gate_up_proj`` (E, 2I, H) holds expert e's
    gate rows then its up rows at e*2I*H, ``mlp.experts.down_proj`` (E, H, I) expert e's down_proj.
    Both are contiguous row-major, so every expert part is one byte range either way.
    """
    ranges: dict[str, list[tuple[Path, int, int]]] = {}
    routers: dict[str, Entry] = {}
    unknown: list[str] = []
    for name, e in read_index(folder).items():
        parts = name.split(".")
        if name.endswith("block_sparse_moe.gate.weight") or name.endswith("mlp.gate.weight"):
            routers[f"L{parts[2]}.router"] = e
        elif ".block_sparse_moe.experts." in name:  # model.layers.L.block_sparse_moe.experts.E.wN.weight
            ranges[f"L{parts[2]}.E{parts[5]}.{_CLASSIC_PART[parts[6]]}"] = [(e.file, e.offset, e.nbytes)]
        elif name.endswith("mlp.experts.gate_up_proj"):
            per_expert = e.nbytes // num_experts
            for x in range(num_experts):
                start = e.offset + x * per_expert
                ranges[f"L{parts[2]}.E{x}.gate"] = [(e.file, start, per_expert // 2)]
                ranges[f"L{parts[2]}.E{x}.up"] = [(e.file, start + per_expert // 2, per_expert // 2)]
        elif name.endswith("mlp.experts.down_proj"):
            per_expert = e.nbytes // num_experts
            for x in range(num_experts):
                ranges[f"L{parts[2]}.E{x}.down"] = [(e.file, e.offset + x * per_expert, per_expert)]
        elif ".mlp." in name or ".block_sparse_moe." in name:
            unknown.append(name)
        else:
            ranges[name] = [(e.file, e.offset, e.nbytes)]
    return ranges, routers, unknown


def _same_bytes(a: list[tuple[Path, int, int]], b: tuple[Path, int, int], full: bool) -> bool:
    """Compare one byte range against another; ``full=False`` compares the first and last MiB only."""
    (fa, oa, na), (fb, ob, nb) = a[0], b
    if len(a) != 1 or na != nb:
        return False
    spans = [(0, na)] if full else sorted({(0, min(na, 1 << 20)), (max(0, na - (1 << 20)), na)})
    with open(fa, "rb", buffering=0) as ha, open(fb, "rb", buffering=0) as hb:
        for lo, hi in spans:
            pos = lo
            while pos < hi:
                n = min(COPY_CHUNK, hi - pos)
                if os.pread(ha.fileno(), n, oa + pos) != os.pread(hb.fileno(), n, ob + pos):
                    return False
                pos += n
    return True


def verify_against_sources(folder: Path, work: Workload, full: bool) -> tuple[bool, str]:
    """Every non-router output tensor must carry exactly the source bytes; routers must be E×H."""
    ranges, routers, unknown = logical_view(folder, work.num_experts)
    needed = dict(work.needed())
    problems = []
    missing = sorted(set(needed) - set(ranges))
    extra = sorted(set(ranges) - set(needed)) + unknown
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
    if extra:
        problems.append(f"unexpected {len(extra)} tensors (e.g. {extra[:3]})")
    wrong = [k for k, src in needed.items() if k in ranges and not _same_bytes(ranges[k], (src.file, src.offset, src.nbytes), full)]
    if wrong:
        problems.append(f"{len(wrong)} tensors differ from their source (e.g. {wrong[:3]})")
    want = (work.num_experts, work.shape.hidden)
    bad_routers = [k for k, e in routers.items() if e.shape != want]
    if len(routers) != work.shape.layers or bad_routers:
        problems.append(f"routers: {len(routers)} found, {len(bad_routers)} not of shape {want}")
    how = "every byte" if full else "headers + first/last MiB of each tensor"
    if problems:
        return False, "; ".join(problems)
    return True, f"{len(needed)} tensors match the sources ({how}); {len(routers)} router(s) of shape {want}"


class _LibraryReader:
    """Reads tensors of one checkpoint folder through the safetensors library, in either MoE layout."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open = safe_open
        self.index = read_index(folder)
        self.handles: dict[Path, object] = {}

    def _handle(self, name: str):
        f = self.index[name].file
        if f not in self.handles:
            self.handles[f] = self._open(str(f), framework="pt")
        return self.handles[f]

    def tensor(self, name: str):
        return self._handle(name).get_tensor(name)

    def expert(self, layer: int, expert: int, part: str):
        """Expert ``expert``'s gate/up/down matrix of ``layer``, from the classic or the fused layout."""
        classic = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_CLASSIC_NAME[part]}.weight"
        if classic in self.index:
            return self.tensor(classic)
        fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        t = self._handle(fused).get_slice(fused)[expert]
        if part == "down":
            return t
        half = t.shape[0] // 2  # gate_up_proj[e] is gate_proj rows, then up_proj rows
        return t[:half] if part == "gate" else t[half:]


def spot_check_pair(a: Path, b: Path, work: Workload) -> tuple[bool, str]:
    """Independent of the byte-range code above: read a few tensors through the safetensors library.

    Takes the embedding, one attention matrix, lm_head and the first/last expert's MLP of the first/last
    layer from both outputs and from the source, and compares them bit for bit (as integers, so NaN cannot
    fool the check).
    """
    import torch

    def same(*ts) -> bool:
        ints = [t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32) for t in ts]
        return all(torch.equal(ints[0], t) for t in ints[1:])

    ra, rb = _LibraryReader(a), _LibraryReader(b)
    sources = [_LibraryReader(folder) for folder in work.experts]
    checks = 0
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        if not same(ra.tensor(name), rb.tensor(name), sources[0].tensor(name)):
            return False, f"{name} differs"
        checks += 1
    for layer in sorted({0, work.shape.layers - 1}):
        for expert in sorted({0, work.num_experts - 1}):
            for part in ("gate", "up", "down"):
                src = sources[expert].tensor(f"model.layers.{layer}.mlp.{part}_proj.weight")
                if not same(ra.expert(layer, expert, part), rb.expert(layer, expert, part), src):
                    return False, f"layer {layer} expert {expert} {part}_proj differs"
                checks += 1
    return True, f"{checks} tensors equal bit for bit in both outputs and the source (read with safetensors)"


def compare_configs(a: Path, b: Path) -> list[str]:
    """config.json keys that decide how the model runs; differences are reported, not fatal."""
    keys = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_local_experts",
            "num_experts_per_tok", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
            "tie_word_embeddings", "max_position_embeddings", "sliding_window", "torch_dtype", "dtype")
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    return [f"`{k}`: {ca.get(k)!r} vs {cb.get(k)!r}" for k in keys if ca.get(k) != cb.get(k)]


# ============================================================================ measurement


@dataclass
class Result:
    name: str
    label: str
    cmd: list[str]
    out: Path
    rc: int | None = None
    wall_s: float | None = None
    sync_s: float | None = None
    cpu_s: float | None = None
    maxrss: int | None = None  # bytes, largest single process (kernel high-water mark)
    tree_rss: int | None = None  # bytes, sampled peak of the sum over the process tree
    tree_anon: int | None = None  # bytes, same for anonymous memory only
    io: dict[str, int] = field(default_factory=dict)
    shards: list[int] = field(default_factory=list)
    log_path: Path | None = None
    prewarm: list[str] | None = None  # the tool's imports alone, run after the cache drop (see PageCache)
    startup: dict | None = None  # what that import-only run used
    verify: str = ""
    error: str = ""
    totals: list[float] = field(default_factory=list)  # total seconds of every repeat (summarise fills it)
    rss_spread: float = 0.0  # (max - min) / max of peak RSS over the repeats

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def total_s(self) -> float | None:
        return None if self.wall_s is None else self.wall_s + (self.sync_s or 0.0)


def summarise(repeats: list[Result]) -> Result:
    """One row per tool: the repeat with the median total time, carrying every repeat's total time.

    Taking one real run (rather than a median per column) keeps each row's numbers consistent; memory and
    byte counts barely vary between repeats, and the spread of peak RSS is kept to say so.
    """
    failed = [r for r in repeats if not r.ok]
    if failed:
        return failed[0]
    ranked = sorted(repeats, key=lambda r: r.total_s)
    rep = ranked[(len(ranked) - 1) // 2]
    rep.verify = repeats[0].verify  # only the first round is verified
    rep.startup = repeats[0].startup
    rep.totals = [r.total_s for r in repeats]
    rss = [r.maxrss for r in repeats]
    rep.rss_spread = (max(rss) - min(rss)) / max(rss)
    return rep


class TreeSampler(threading.Thread):
    """Peak summed RSS / RssAnon of every descendant of ``root`` (the wrapper itself is excluded).

    ru_maxrss only sees one process at a time; summing the tree catches tools that fork workers.
    RssAnon is reported separately because file pages mapped from the inputs (mergekit reads through
    mmap) count in RSS but are clean cache the kernel can drop, while anonymous memory is what OOMs.
    """

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.peak_rss = 0
        self.peak_anon = 0
        self._halt = threading.Event()

    def _descendants(self) -> list[int]:
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                    todo.extend(int(k) for k in kids)
            except OSError:
                continue  # the process ended while we looked
            if pid != self.root:
                out.append(pid)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            rss = anon = 0
            for pid in self._descendants():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1]) * 1024
                        elif line.startswith("RssAnon:"):
                            anon += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self._halt.wait(SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class PageCache:
    """Puts every run on the same footing: cold (caches dropped) or warm (inputs read just before)."""

    def __init__(self, mode: str, files: list[Path]):
        self.mode = mode
        self.files = files
        self.how = ""
        if mode == "cold":
            os.sync()
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                self.drop = self._drop_all
                self.how = "cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before every run"
            except OSError as err:
                # not root, or a container with /proc/sys read-only: evicting the input files' pages
                # with fadvise needs no privilege and gives the same cold start for what is read
                self.drop = self._drop_inputs
                self.how = (f"cold: drop_caches not permitted ({err.strerror}); input files evicted with "
                            "posix_fadvise(DONTNEED) after sync before every run")
        else:
            self.how = "warm: every input file read once just before every run (same warm cache for every tool)"

    def _drop_all(self) -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def _drop_inputs(self) -> None:
        os.sync()
        for f in self.files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def _warm(self) -> None:
        buf = bytearray(COPY_CHUNK)
        for f in self.files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass

    def prepare(self) -> None:
        if self.mode == "cold":
            self.drop()
        else:
            self._warm()


def fsync_tree(folder: Path) -> float:
    """Time to make a finished output durable: a tool may exit with gigabytes still dirty in RAM."""
    t0 = time.perf_counter()
    # per file and folder rather than a global sync(), which would also wait for other users' writes
    for p in [*sorted(folder.rglob("*")), folder]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _wrapped(cmd: list[str], name: str, env: dict[str, str], logs: Path, timeout_s: int) -> tuple[dict | None, TreeSampler, Path]:
    """Run ``cmd`` under the ``_measure`` wrapper while sampling its tree; return (wrapper stats, sampler, log)."""
    log_path = logs / f"{name}.log"
    stats_path = logs / f"{name}.json"
    stats_path.unlink(missing_ok=True)
    wrapper = [sys.executable, str(Path(__file__).resolve()), "_measure", str(stats_path), str(log_path),
               str(timeout_s), "--", *cmd]
    proc = subprocess.Popen(wrapper, env=env, cwd=REPO)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    proc.wait()
    sampler.stop()
    ok = proc.returncode == 0 and stats_path.is_file()
    return (json.loads(stats_path.read_text()) if ok else None), sampler, log_path


def measure(result: Result, env: dict[str, str], cache: PageCache, logs: Path, timeout_s: int) -> Result:
    rmtree(result.out)
    result.out.parent.mkdir(parents=True, exist_ok=True)
    cache.prepare()
    if result.prewarm:
        # After a cache drop the tool's own libraries (torch alone is hundreds of MB) would be read cold
        # too, and a tool with more dependencies would be billed for them. Importing them once first means
        # only the model files are cold; what that import-only run used is reported as "startup".
        stats, sampler, _ = _wrapped(result.prewarm, f"{result.name}.startup", env, logs, timeout_s)
        if stats and stats["rc"] == 0:
            result.startup = {**stats, "tree_anon": sampler.peak_anon}
    log(f"run {result.name}: {shlex.join(result.cmd)}")
    stats, sampler, result.log_path = _wrapped(result.cmd, result.name, env, logs, timeout_s)
    if stats is None:
        result.error = "the measurement wrapper failed (see the output above)"
        return result
    result.rc = stats["rc"]
    result.wall_s = stats["wall_s"]
    result.cpu_s = stats["cpu_s"]
    result.maxrss = stats["maxrss_kb"] * 1024
    result.io = stats["io"]
    result.tree_rss = sampler.peak_rss
    result.tree_anon = sampler.peak_anon
    if result.ok:
        result.sync_s = fsync_tree(result.out)
        result.shards = [f.stat().st_size for f in sorted(result.out.glob("*.safetensors"))]
        log(f"  {result.wall_s:.1f} s (+{result.sync_s:.1f} s fsync), peak RSS {fmt_bytes(result.maxrss)}, "
            f"read {fmt_bytes(result.io.get('read_bytes'))}, wrote {fmt_bytes(result.io.get('write_bytes'))}")
    else:
        tail = result.log_path.read_text(errors="replace").strip().splitlines()[-15:]
        why = (f"killed by SIGKILL (the --timeout of {timeout_s} s, or the kernel's OOM killer)"
               if result.rc == -signal.SIGKILL else f"exit status {result.rc}")
        result.error = f"{why}; last lines of {rel(result.log_path)}:\n" + "\n".join(tail)
        log(f"  FAILED: {result.error}")
    return result


def _measure_child(argv: list[str]) -> int:
    """``merge_bench.py _measure STATS LOG TIMEOUT -- CMD...``: run CMD, record what it and its children used.

    Runs as its own process so that /proc/self/io, read before and after, covers exactly this wrapper
    (a few kB) plus every descendant: the kernel adds a child's I/O counters to its parent when it is
    reaped. wait4 gives the child's rusage (CPU time, max RSS) the same way /usr/bin/time does.
    """
    stats_path, log_path, timeout_s, sep, *cmd = argv
    assert sep == "--", argv
    io0 = read_proc_io()
    t0 = time.perf_counter()
    with open(log_path, "wb") as lf:
        # its own session, so a timeout can kill the tool with every process it started
        child = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)

        def kill_tool(*_):
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(float(timeout_s), kill_tool)
        timer.start()
        # Ctrl-C reaches only our process group, and a killed benchmark must not leave a merge running
        signal.signal(signal.SIGTERM, lambda *_: (kill_tool(), sys.exit(143)))
        try:
            _, status, ru = os.wait4(child.pid, 0)
        except KeyboardInterrupt:
            kill_tool()
            raise
        finally:
            timer.cancel()
    wall = time.perf_counter() - t0
    io1 = read_proc_io()
    child.returncode = os.waitstatus_to_exitcode(status)  # keeps Popen from polling a reaped pid
    stats = {
        "rc": child.returncode,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "maxrss_kb": ru.ru_maxrss,
        "io": {k: io1[k] - io0[k] for k in io0},
    }
    Path(stats_path).write_text(json.dumps(stats))
    return 0


def _copy_child(argv: list[str]) -> int:
    """``merge_bench.py _copy PLAN OUT``: copy exactly the needed byte ranges into one file.

    Adjacent ranges are merged, and the copy goes through copy_file_range (what coreutils' ``cp`` uses),
    falling back to read/write: the least work any tool can do to get these bytes onto the output disk.
    """
    plan = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).parent.mkdir(parents=True, exist_ok=True)
    with open(argv[1], "wb", buffering=0) as dst:
        for path, offset, length in plan:
            with open(path, "rb", buffering=0) as src:
                done = 0
                try:
                    while done < length:
                        n = os.copy_file_range(src.fileno(), dst.fileno(), length - done, offset + done)
                        if n == 0:
                            raise OSError(f"{path} ended early")
                        done += n
                except OSError:
                    if done:
                        raise
                    src.seek(offset)
                    while done < length:
                        chunk = src.read(min(COPY_CHUNK, length - done))
                        if not chunk:
                            raise OSError(f"{path} ended early") from None
                        dst.write(chunk)
                        done += len(chunk)
    return 0


def copy_plan(work: Workload, path: Path) -> Path:
    ranges = sorted((str(e.file), e.offset, e.nbytes) for _, e in work.needed())
    merged: list[list] = []
    for f, off, n in ranges:
        if merged and merged[-1][0] == f and merged[-1][1] + merged[-1][2] == off:
            merged[-1][2] += n
        else:
            merged.append([f, off, n])
    path.write_text(json.dumps(merged))
    return path


# ============================================================================ the tools


def ensure_mergekit(work_dir: Path, spec: str) -> tuple[Path, dict[str, str], list[str]]:
    """A virtualenv with mergekit and the local torch build; returns (mergekit-moe, versions, notes)."""
    import torch

    venv = work_dir / "mkvenv"
    py = venv / "bin" / "python"
    exe = venv / "bin" / "mergekit-moe"
    notes: list[str] = []
    probe = [str(py), "-c", "import importlib.metadata as m, json; print(json.dumps("
             "{p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"]

    def versions() -> dict[str, str] | None:
        if not exe.is_file():
            return None
        done = subprocess.run(probe, capture_output=True, text=True)
        return json.loads(done.stdout) if done.returncode == 0 else None

    have = versions()
    if have and (spec == "mergekit" or spec == f"mergekit=={have['mergekit']}"):
        return exe, have, notes
    if not py.is_file():
        log(f"creating {rel(venv)}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first and pinned to the build this machine already has, local label included (2.13.0+cpu):
    # an unpinned resolve, or a bare 2.13.0 on PyPI, is the default CUDA build (GBs). The constraints file
    # below then stops mergekit from swapping it.
    torch_pin = f"torch=={torch.__version__}"
    log(f"installing {torch_pin} into {rel(venv)}")
    if subprocess.run(pip + [torch_pin]).returncode != 0:
        hint = ("; a +cpu build comes from --extra-index-url https://download.pytorch.org/whl/cpu (PIP_EXTRA_INDEX_URL)"
                if "+cpu" in torch_pin else "")
        raise SystemExit(f"pip could not install {torch_pin} into {venv}{hint}")
    constraints = work_dir / "mkvenv-constraints.txt"
    constraints.write_text(torch_pin + "\n")
    log(f"installing {spec} into {rel(venv)}")
    if subprocess.run(pip + ["-c", str(constraints), spec]).returncode != 0:
        if spec != "mergekit":
            raise SystemExit(f"pip could not install {spec} next to {torch_pin}")
        # the newest release pins a torch we do not have: walk back to the newest that accepts ours
        listing = subprocess.run([str(py), "-m", "pip", "index", "versions", "mergekit"], capture_output=True, text=True)
        line = next((l for l in listing.stdout.splitlines() if l.startswith("Available versions:")), "")
        candidates = [v.strip() for v in line.partition(":")[2].split(",") if v.strip()][1:6]
        for version in candidates:
            if subprocess.run(pip + ["-c", str(constraints), f"mergekit=={version}"]).returncode == 0:
                notes.append(f"the newest mergekit does not install with {torch_pin}; using mergekit {version}, "
                             "the newest that does")
                break
        else:
            raise SystemExit(f"no recent mergekit ({', '.join(candidates)}) installs next to {torch_pin}")
    have = versions()
    if not have:
        raise SystemExit(f"mergekit installed but {exe} does not run; see pip's output above")
    return exe, have, notes


def lazymoe_command(config: Path, out: Path, shard: str, layout: str) -> list[str]:
    """``lazymoe merge`` through the CLI when it exists, else the same call through the Python API."""
    if importlib.util.find_spec("lazymoe.cli") is not None:
        return [sys.executable, "-m", "lazymoe", "-q", "merge", str(config), str(out),
                "--max-shard-size", shard, "--layout", layout]
    code = ("import lazymoe, sys; lazymoe.merge(sys.argv[1], sys.argv[2], max_shard_bytes=sys.argv[3], "
            "layout=sys.argv[4], progress=False, overwrite=True)")
    return [sys.executable, "-c", code, str(config), str(out), shard, layout]


def lazymoe_version() -> str:
    def git(*a: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    import lazymoe

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "lazymoe") else ""
    return f"{lazymoe.__version__} (git {git('rev-parse', '--short', 'HEAD')}{dirty})"


# ============================================================================ report


def machine_summary(work_dir: Path) -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next(int(l.split()[1]) * 1024 for l in Path("/proc/meminfo").read_text().splitlines()
               if l.startswith("MemTotal:"))
    fs = subprocess.run(["df", "-T", str(work_dir)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return (f"{cpu}, {os.cpu_count()} cores, {fmt_bytes(mem)} RAM, Linux {platform.release()}, "
            f"work dir on {fs[1]} ({fs[0]})")


def fmt_total(r: Result) -> str:
    """Total seconds; with repeats, the median and the range over the rounds."""
    if len(r.totals) > 1:
        return f"{r.total_s:.1f} ({min(r.totals):.1f}–{max(r.totals):.1f})"
    return f"{r.total_s:.1f}"


def build_report(args, argv: list[str], work: Workload, results: dict[str, Result], meta: dict, notes: list[str]) -> str:
    mk = results.get("mergekit")
    cp = results.get("copy")
    mk_ok = mk if mk and mk.ok else None
    cp_ok = cp if cp and cp.ok else None

    def io(r: Result, key: str):
        return r.io.get(key) if r.ok else None

    main_rows, ratio_rows = [], []
    for r in results.values():
        if r.name.startswith("sweep"):
            continue
        if not r.ok:
            main_rows.append([f"**{r.label}**", f"FAILED ({r.rc if r.rc is not None else r.error})"] + ["–"] * 10)
            continue
        shards = f"{len(r.shards)} ({fmt_bytes(max(r.shards))})" if r.shards else "–"
        main_rows.append([
            f"**{r.label}**", f"{r.wall_s:.1f}", f"{r.sync_s:.1f}", fmt_total(r), f"{r.cpu_s:.1f}",
            fmt_bytes(r.maxrss), f"{fmt_bytes(r.tree_rss)} / {fmt_bytes(r.tree_anon)}",
            fmt_bytes(io(r, "read_bytes")), fmt_bytes(io(r, "write_bytes")),
            fmt_bytes(io(r, "rchar")), fmt_bytes(io(r, "wchar")), shards,
        ])
        ratio_rows.append([
            f"**{r.label}**",
            fmt_ratio(r.total_s, mk_ok and mk_ok.total_s), fmt_ratio(r.total_s, cp_ok and cp_ok.total_s),
            fmt_ratio(r.maxrss, mk_ok and mk_ok.maxrss), fmt_ratio(r.maxrss, cp_ok and cp_ok.maxrss),
            fmt_ratio(io(r, "read_bytes"), mk_ok and io(mk_ok, "read_bytes")),
            fmt_ratio(io(r, "read_bytes"), cp_ok and io(cp_ok, "read_bytes")),
            fmt_ratio(io(r, "write_bytes"), mk_ok and io(mk_ok, "write_bytes")),
            fmt_ratio(io(r, "write_bytes"), cp_ok and io(cp_ok, "write_bytes")),
        ])

    sweep = [r for r in results.values() if r.name.startswith("sweep") or r.name == "lazymoe"]
    sweep.sort(key=lambda r: parse_size(r.cmd[r.cmd.index("--max-shard-size") + 1]) if "--max-shard-size" in r.cmd
               else 0)
    sweep_rows = [[r.label, f"{len(r.shards)} (largest {fmt_bytes(max(r.shards))})" if r.ok and r.shards else "–",
                   fmt_bytes(r.maxrss) if r.ok else "FAILED", fmt_bytes(r.tree_anon) if r.ok else "–",
                   fmt_total(r) if r.ok else "–"] for r in sweep]
    mk_sweep = [r for r in (results.get("mergekit"), results.get("mergekit-default")) if r]
    sweep_rows += [[r.label, f"{len(r.shards)} (largest {fmt_bytes(max(r.shards))})" if r.ok and r.shards else "–",
                    fmt_bytes(r.maxrss) if r.ok else "FAILED", fmt_bytes(r.tree_anon) if r.ok else "–",
                    fmt_total(r) if r.ok else "–"] for r in mk_sweep]

    s = work.shape
    out_bytes = work.needed_bytes() + work.router_bytes()
    ok_runs = [r for r in results.values() if r.ok]
    if args.repeat > 1 and ok_runs:
        spread = max(r.rss_spread for r in ok_runs)
        repeat_note = (f"Each run was repeated in {args.repeat} interleaved rounds: **total s** is the median with the "
                       "range in brackets; the other columns come from the median round (peak RSS varied by at most "
                       f"{spread:.1%} between rounds).")
    else:
        repeat_note = "One round: times on a shared machine vary by tens of percent between runs; use --repeat 3 for medians."

    lines = [
        "# Merge benchmark: lazymoe vs mergekit-moe vs a plain copy",
        "",
        f"Generated {dt.datetime.now():%Y-%m-%d %H:%M} by:",
        "",
        "```",
        shlex.join(["python", rel(__file__), *argv]),
        "```",
        "",
        f"- **Machine**: {meta['machine']}; load average {meta['load_before']} before, {meta['load_after']} after "
        "(the cores are shared with other work, so times carry some noise).",
        f"- **Versions**: Python {platform.python_version()}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"lazymoe {meta['lazymoe']}; mergekit {meta['mk'].get('mergekit', '?')} in its own venv "
        f"(torch {meta['mk'].get('torch', '?')}, transformers {meta['mk'].get('transformers', '?')}).",
        f"- **Inputs**: {work.num_experts} synthetic dense Llama models (hidden {s.hidden}, MLP {s.intermediate}, "
        f"{s.layers} layers, {s.heads} heads / {s.kv_heads} KV heads, vocab {s.vocab}, {s.dtype}), random weights, "
        f"tokenizer: {meta['tokenizer']}; {fmt_bytes(work.input_bytes())} on disk. The base is expert 0 "
        "(as in the Beyonder recipe).",
        f"- **MoE**: Mixtral, {work.num_experts} experts, top-{args.experts_per_token}, gate_mode `{args.gate_mode}`; "
        f"{fmt_bytes(out_bytes)} of tensors, of which {fmt_bytes(work.needed_bytes())} are bytes that must be read "
        f"from the inputs (base embeddings/attention/norms + every expert's MLP) and {fmt_bytes(work.router_bytes())} "
        "are routers.",
        f"- **Config**: `{rel(work.config)}` (one mergekit-moe YAML, read unchanged by both tools).",
        f"- **Page cache**: {meta['cache']}.",
        "",
        "## Results",
        "",
        md_table(["run", "wall s (to exit)", "+ fsync s", "total s", "CPU s", "peak RSS", "tree RSS / anon (sampled)",
                  "read_bytes", "write_bytes", "rchar", "wchar", "shards (largest)"], main_rows),
        "",
        repeat_note,
        "",
        "Ratios (total time = to exit + fsync; peak RSS = largest process; bytes = read_bytes / write_bytes):",
        "",
        md_table(["run", "time ×mergekit", "time ×copy", "RSS ×mergekit", "RSS ×copy", "read ×mergekit",
                  "read ×copy", "written ×mergekit", "written ×copy"], ratio_rows),
        "",
        "`mergekit` is the like-for-like reference (same shard size in bytes); `mergekit (default)` is what a user "
        "gets without flags (`--out-shard-size 5B`, counted in bytes).",
        "",
        "## Shard size vs peak memory",
        "",
        md_table(["run", "shards", "peak RSS", "peak anon RSS (tree)", "total s"], sweep_rows),
        "",
        "## Verification",
        "",
    ]
    lines += [f"- **{r.label}**: {r.verify}" for r in results.values() if r.verify]
    lines += [f"- {n}" for n in meta.get("checks", [])]
    startup = {}
    for r in results.values():  # one row per tool: its import-only run right after a cache drop
        key = "copy" if r.name == "copy" else "mergekit" if r.name.startswith("mergekit") else "lazymoe"
        if r.startup and key not in startup:
            startup[key] = [key, f"{r.startup['wall_s']:.1f}", fmt_bytes(r.startup["maxrss_kb"] * 1024),
                            fmt_bytes(r.startup["io"]["read_bytes"]), fmt_bytes(r.startup["io"]["rchar"])]
    if startup:
        lines += ["", "## Startup alone (imports only, cold cache; loaded before each measured run)", "",
                  md_table(["tool", "import s (cold)", "RSS", "read_bytes", "rchar"], list(startup.values())),
                  "", "The measured runs start with these libraries already in the page cache, so their "
                  "read_bytes are the model files; their RSS and rchar still include this startup."]
    lines += [
        "",
        "## How it is measured",
        "",
        "- Each run is a fresh process tree started by a small wrapper; nothing is shared between runs, and the "
        "output folder is deleted before each run.",
        "- **wall s** ends when the tool exits; **+ fsync s** is the time to fsync its output afterwards (a tool can "
        "exit with gigabytes still dirty in the page cache); **total** is their sum and the basis of the time ratios.",
        "- **CPU s**: user + system time of the tool and its children (wait4 rusage).",
        "- **peak RSS**: kernel high-water mark of the largest process (ru_maxrss, as `/usr/bin/time -v` reports). "
        "It counts file pages mapped from the inputs, which mmap readers (mergekit, via safetensors) touch. "
        "**tree RSS / anon (sampled)**: peak of the summed VmRSS and of the summed RssAnon over the whole process "
        "tree, sampled every 0.1 s (may miss spikes shorter than that); anonymous memory is what cannot be "
        "dropped under memory pressure.",
        "- **read_bytes / write_bytes** (from `/proc/<pid>/io` of the wrapper, which includes every reaped "
        "descendant): bytes the block layer read from disk for the tree (page faults on mmap included; with a "
        "cold cache this is the true disk read) and bytes it dirtied in the page cache for writing. **rchar / "
        "wchar**: bytes through read/write/copy_file_range-style system calls whether or not the cache served "
        "them; they miss reads done through mmap, which is why mergekit's rchar is far below what it reads.",
        "- **copy**: `copy_file_range` (what `cp` uses) of exactly the byte ranges the MoE needs, merged where "
        "adjacent, into one file on the same disk: the physical limit for reading the inputs and writing the output.",
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    failed = [r for r in results.values() if r.error]
    for r in failed:
        lines += ["", f"### {r.label} failed", "", "```", r.error, "```"]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("synthetic experts (defaults: Mistral-7B widths, 4 layers, 4 experts: ~6.5 GB MoE)")
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--intermediate", type=int, default=14336)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--experts", type=int, default=4)
    g.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    g = p.add_argument_group("merge")
    g.add_argument("--experts-per-token", type=int, default=2)
    g.add_argument("--gate-mode", default="random",
                   help="random (default) or uniform_random keep the router cheap so the bench measures tensor "
                        "streaming; hidden/hidden_avg/cheap_embed also work (both tools then run the base)")
    g.add_argument("--max-shard-size", default="2GB", help="shard size for lazymoe and mergekit (default 2GB)")
    g.add_argument("--shard-sweep", default="250MB,20GB",
                   help="extra lazymoe shard sizes to show peak RSS does not grow with them ('' = none)")
    g = p.add_argument_group("runs")
    g.add_argument("--runs", default="copy,mergekit,lazymoe,lazymoe-fused,mergekit-default,sweep",
                   help="comma list of: copy, mergekit, lazymoe, lazymoe-fused, mergekit-default, sweep")
    g.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: drop the page cache before each run (default); warm: read the inputs first")
    g.add_argument("--verify", choices=("full", "spot", "none"), default="full",
                   help="full: compare every output byte with the sources; spot: first/last MiB of each tensor")
    g.add_argument("--mergekit-spec", default="mergekit", help="pip requirement for mergekit (default: newest)")
    g.add_argument("--repeat", type=int, default=1,
                   help="rounds of all runs, interleaved so that background load hits every tool alike; the "
                        "report shows the median total time and the range (default 1)")
    g.add_argument("--timeout", type=int, default=3600, help="seconds before a run is killed")
    g.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cache and scratch folder (gitignored)")
    g.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown report ('-' for none)")
    g.add_argument("--keep-outputs", action="store_true", help="keep the lazymoe and mergekit outputs")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(args.runs) - {"copy", "mergekit", "lazymoe", "lazymoe-fused", "mergekit-default", "sweep"}
    if unknown:
        p.error(f"unknown run(s): {', '.join(sorted(unknown))}")
    parse_size(args.max_shard_size)
    args.sweep = [x.strip() for x in args.shard_sweep.split(",") if x.strip()]
    for x in args.sweep:
        parse_size(x)
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["_measure"]:
        return _measure_child(argv[1:])
    if argv[:1] == ["_copy"]:
        return _copy_child(argv[1:])
    args = parse_args(argv)
    import _synth

    _synth.compile_lazymoe()

    if not Path("/proc/self/io").is_file():
        raise SystemExit("this benchmark reads /proc/<pid>/io and needs Linux")
    work_dir: Path = args.work.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    shape = _synth.Shape(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab, args.dtype)
    moe_bytes, inputs_bytes = expected_output_bytes(shape, args.experts)
    synth_root = work_dir / "synth"
    cached = all((synth_root / shape.key / f"expert{e}" / _synth.MARKER).is_file() for e in range(args.experts))
    # at most two outputs exist at once (a tool's and mergekit's, for the cross check; three when kept),
    # plus the inputs
    need = (3 if args.keep_outputs else 2) * moe_bytes + (0 if cached else inputs_bytes) + (2 << 30)
    free = shutil.disk_usage(work_dir).free
    if free < need:
        raise SystemExit(f"needs about {fmt_bytes(need)} free in {work_dir} (MoE {fmt_bytes(moe_bytes)}, inputs "
                         f"{fmt_bytes(inputs_bytes)}{', cached' if cached else ''}); only {fmt_bytes(free)} free")
    log(f"MoE of {fmt_bytes(moe_bytes)} from {args.experts} experts of {shape.key}")

    experts = _synth.build_experts(synth_root, shape, args.experts, log=log)
    config = _synth.write_moe_config(work_dir / "configs" / f"{shape.key}-e{args.experts}-{args.gate_mode}.yml",
                                     experts, gate_mode=args.gate_mode, dtype=args.dtype,
                                     experts_per_token=args.experts_per_token)
    work = Workload(shape, experts, config)

    notes: list[str] = []
    mk_exe, mk_versions, mk_notes = None, {}, []
    if {"mergekit", "mergekit-default"} & set(args.runs):
        mk_exe, mk_versions, mk_notes = ensure_mergekit(work_dir, args.mergekit_spec)
        notes += mk_notes

    import torch
    import transformers

    meta = {
        "machine": machine_summary(work_dir),
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "lazymoe": lazymoe_version(), "mk": mk_versions,
        "tokenizer": _synth.tokenizer_origin(synth_root, shape), "checks": [],
    }
    cache = PageCache(args.cache, work.input_files())
    meta["cache"] = cache.how
    # offline: every model is local, and a hub lookup that has to time out would be billed as merge time
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    outs = work_dir / "out"
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shard_bytes = parse_size(args.max_shard_size)
    full = args.verify == "full"
    # import-only runs that load each tool's libraries into the page cache after the drop (see measure)
    lazymoe_warm = [sys.executable, "-c", "import lazymoe.pipeline.merge; "
                    "from transformers import AutoTokenizer, PreTrainedTokenizerFast, MixtralConfig"]
    mk_warm = [str(mk_exe.parent / "python") if mk_exe else "false", "-c",
               "import mergekit.scripts.moe, mergekit.moe.mixtral, mergekit.io; "
               "from transformers import AutoTokenizer, PreTrainedTokenizerFast, MixtralConfig, MistralConfig"]
    copy_warm = [sys.executable, "-c", "import json, os, struct, subprocess, threading"]

    # (name, label, command, output folder, import-only warm-up, byte limit lazymoe promises, verify every byte)
    specs: list[tuple[str, str, list[str], Path, list[str], int | None, bool]] = []
    if "copy" in args.runs:
        plan = copy_plan(work, work_dir / "copy-plan.json")
        specs.append(("copy", "plain copy (physical limit)",
                      [sys.executable, str(Path(__file__).resolve()), "_copy", str(plan), str(outs / "copy" / "needed.bin")],
                      outs / "copy", copy_warm, None, False))
    if "mergekit" in args.runs:
        specs.append(("mergekit", f"mergekit-moe --out-shard-size {shard_bytes}",
                      [str(mk_exe), str(config), str(outs / "mergekit"), "--out-shard-size", str(shard_bytes),
                       "--random-seed", "0", "--quiet"], outs / "mergekit", mk_warm, None, full))
    if "lazymoe" in args.runs:
        specs.append(("lazymoe", f"lazymoe merge --max-shard-size {args.max_shard_size}",
                      lazymoe_command(config, outs / "lazymoe", args.max_shard_size, "classic"), outs / "lazymoe",
                      lazymoe_warm, shard_bytes, full))
    if "lazymoe-fused" in args.runs:
        specs.append(("lazymoe-fused", f"lazymoe merge --layout fused --max-shard-size {args.max_shard_size}",
                      lazymoe_command(config, outs / "lazymoe-fused", args.max_shard_size, "fused"),
                      outs / "lazymoe-fused", lazymoe_warm, shard_bytes, full))
    if "mergekit-default" in args.runs:
        specs.append(("mergekit-default", "mergekit-moe (default shards)",
                      [str(mk_exe), str(config), str(outs / "mergekit-default"), "--random-seed", "0", "--quiet"],
                      outs / "mergekit-default", mk_warm, None, False))
    if "sweep" in args.runs:
        for size in args.sweep:
            specs.append((f"sweep-{size}", f"lazymoe merge --max-shard-size {size}",
                          lazymoe_command(config, outs / f"lazymoe-{size}", size, "classic"), outs / f"lazymoe-{size}",
                          lazymoe_warm, parse_size(size), False))
    # mergekit's output stays on disk through round 1 until the lazymoe runs have been compared with it
    compared = [n for n in ("lazymoe", "lazymoe-fused") if n in args.runs]
    last_compared = compared[-1] if compared and "mergekit" in args.runs else None
    kept = {"mergekit", "lazymoe"} if args.keep_outputs else set()

    def verify(r: Result, limit: int | None, deep: bool) -> None:
        if args.verify == "none" or not r.ok or r.name == "copy":
            return
        log(f"verifying {r.name} against the sources")
        ok, msg = verify_against_sources(r.out, work, deep)
        big = oversized_shards(r.out, limit) if limit else []
        if big:  # lazymoe promises shards bounded in bytes
            ok, msg = False, msg + f"; shards above the limit with more than one tensor: {big}"
        r.verify = ("OK: " if ok else "MISMATCH: ") + msg
        log(f"  {r.verify}")

    def cross_check(r: Result, mk: Result | None) -> None:
        if not (r.ok and mk and mk.ok and mk.out.is_dir()) or args.verify == "none":
            return
        if r.name == "lazymoe":
            ok, msg = spot_check_pair(r.out, mk.out, work)
            meta["checks"].append(f"lazymoe (classic) vs mergekit (fused), read through safetensors: "
                                  f"{'OK' if ok else 'MISMATCH'}: {msg}")
            diffs = compare_configs(r.out, mk.out)
            meta["checks"].append("config.json, lazymoe vs mergekit: " + (
                "; ".join(diffs) if diffs else "same values for every key that shapes the model"))
        elif r.name == "lazymoe-fused":
            a, b = read_index(r.out), read_index(mk.out)
            same = set(a) == set(b) and all((a[n].shape, a[n].dtype) == (b[n].shape, b[n].dtype) for n in a)
            meta["checks"].append("lazymoe --layout fused vs mergekit: " + (
                "identical tensor names, shapes and dtypes" if same else
                f"tensor names or shapes differ, e.g. {sorted(set(a) ^ set(b))[:4]}"))
        else:
            return
        log("  " + meta["checks"][-1])

    runs: dict[str, list[Result]] = {spec[0]: [] for spec in specs}
    for rnd in range(args.repeat):
        if args.repeat > 1:
            log(f"round {rnd + 1} of {args.repeat}")
        for name, label, cmd, out, prewarm, limit, deep in specs:
            r = measure(Result(name, label, cmd, out, prewarm=prewarm), env, cache, logs, args.timeout)
            runs[name].append(r)
            if rnd == 0:  # outputs are deterministic: checking the first round's is enough
                verify(r, limit, deep)
                cross_check(r, (runs.get("mergekit") or [None])[0])
            last_round = rnd == args.repeat - 1
            if not (name in kept and last_round) and not (rnd == 0 and name == "mergekit" and last_compared):
                rmtree(out)
            if rnd == 0 and name == last_compared and not ("mergekit" in kept and last_round):
                rmtree(outs / "mergekit")
    results = {name: summarise(rs) for name, rs in runs.items()}

    meta["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    report = build_report(args, argv, work, results, meta, notes)
    print("\n" + report)
    if str(args.results) != "-":
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(args.results.suffix + ".tmp")
        tmp.write_text(report)
        os.replace(tmp, args.results)
        log(f"report written to {rel(args.results)}")
    (work_dir / "last_results.json").write_text(json.dumps(
        {k: {**{f: getattr(v, f) for f in ("name", "label", "rc", "wall_s", "sync_s", "cpu_s", "maxrss", "tree_rss",
                                           "tree_anon", "io", "shards", "verify", "error", "totals", "startup")},
             "cmd": v.cmd} for k, v in results.items()}, indent=2, default=str))
    return 0 if all(r.ok and not r.verify.startswith("MISMATCH") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
