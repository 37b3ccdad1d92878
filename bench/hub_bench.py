#!/usr/bin/env python3
"""Hub to Hub benchmark: download + merge + push, today's sequential path against the streamed one, and
mergekit-moe + ``upload_folder``, through a throttled local Hub (tests/hubserver.py) at two bandwidths.

    python bench/hub_bench.py                          # 4 synthetic experts, 2 layers; 5 and 20 MB/s
    python bench/hub_bench.py --bandwidths 8,32 --runs sequential,streamed

What it does, in one run:
1. builds four synthetic dense Llama experts (bench/_synth.py: random bytes, real layout, a real tiny
   tokenizer) and publishes them on a local Hub-compatible server that the real huggingface_hub client
   talks to; the server counts every byte it sends and receives and paces both directions at a bandwidth;
2. for each bandwidth, runs each pipeline in fresh processes with an empty Hugging Face cache:
   - ``sequential``: the path before streaming: download the four repos whole (``snapshot_download``),
     ``lazymoe merge`` from those folders, then ``lazymoe push`` (one commit of the folder);
   - ``streamed``: ``lazymoe merge --push REPO --no-keep`` from the Hub ids: only the tensors the MoE reads
     are fetched (ranges), each shard is uploaded while the next is written, one commit at the end;
   - ``mergekit``: download whole, ``mergekit-moe``, then ``HfApi.upload_folder``;
   - ``upload`` (not run by default): ``HfApi.upload_folder`` of the same output, made beforehand from the
     experts' local folders: the upload alone, the time the streamed run is to be held against as a user
     would time it (its start-up, per-file requests and the link's real pace included);
   - ``resume`` (not run by default): the streamed merge with the network going down during the eighth
     shard's upload, then the same command again, measured: it fetches only what the shards the Hub lacks
     are made of, runs no router pass (its rows were recorded) and sends only those shards;
3. measures wall time, bytes fetched and uploaded (the server's counters), peak disk used (the run's
   folder sampled every 50 ms, allocated blocks) and peak RSS (each process's VmHWM, sampled), and the
   transfer time: from the first request for weight bytes to the end of the commit, as the server saw them
   (the wall time less the processes' start-up, planning and exit);
   checks the sequential and streamed uploads are byte-identical (README aside);
4. prints the table, and the same arithmetic from the plan for the Beyonder recipe (4 x Mistral-7B).

mergekit runs from its own virtualenv (``--mergekit PATH`` to its ``mergekit-moe``; default
/work/cache/mkvenv-hub/bin/mergekit-moe, a venv made with --system-site-packages and ``pip install
--no-deps mergekit immutables peft``, so it shares this machine's torch and transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))  # hubserver
sys.path.insert(0, str(REPO))

from hubserver import ALICE_WRITE_TOKEN, HubServer, add_test_accounts  # noqa: E402

MB = 1_000_000
RESUME_FAILS_AT = 8  # the resume run's first attempt loses the network during this LFS upload
SAMPLE_S = 0.05
DEFAULT_MERGEKIT = Path("/work/cache/mkvenv-hub/bin/mergekit-moe")

# ------------------------------------------------------------------------------------------ child programs
# each is run as `python -c CODE ARGS...` in a fresh process, with HF_ENDPOINT/HF_HOME/HF_TOKEN pointing at
# the local Hub and this run's own cache

DOWNLOAD = r"""
import json, sys, yaml
from huggingface_hub import snapshot_download
cfg = yaml.safe_load(open(sys.argv[1]))
refs = [cfg["base_model"]] + [e["source_model"] for e in cfg["experts"]]
local = {r: snapshot_download(r) for r in dict.fromkeys(refs)}   # every file, as today's fetch_weights does
cfg["base_model"] = local[cfg["base_model"]]
for e in cfg["experts"]:
    e["source_model"] = local[e["source_model"]]
open(sys.argv[2], "w").write(yaml.safe_dump(cfg))
"""

UPLOAD_FOLDER = r"""
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[2], exist_ok=True)
api.upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1])
"""


# ------------------------------------------------------------------------------------------ measuring


def allocated_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskSampler:
    """Peak allocated bytes under ``root``, sampled every SAMPLE_S by a process of its own: a thread of this
    one would take the Hub server's interpreter lock 20 times a second (its walks of the run's folder), and
    the server's pace is what is measured."""

    def __init__(self, root: Path):
        self.root, self.peak = root, 0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> DiskSampler:
        self._proc = subprocess.Popen([sys.executable, __file__, "_sample_disk", str(self.root)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        out, _ = self._proc.communicate("")  # end of input: the sampler prints its peak and exits
        self.peak = max(int(out.strip() or 0), allocated_bytes(self.root))


def _sample_disk(root: str) -> int:
    """``hub_bench.py _sample_disk ROOT``: sample until standard input ends, then print the peak."""
    peak, ended = 0, threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), ended.set()), daemon=True).start()
    while not ended.is_set():
        peak = max(peak, allocated_bytes(Path(root)))
        ended.wait(SAMPLE_S)
    print(max(peak, allocated_bytes(Path(root))))
    return 0


def _hwm(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(cmd: list[str], env: dict[str, str], *, may_fail: bool = False) -> tuple[str, int]:
    """Run ``cmd``; returns its stdout and its peak RSS in bytes. Exits the bench on failure (unless ``may_fail``).

    Peak RSS is the kernel's high-water mark of the process after its exec (VmHWM), sampled until it exits:
    ``wait4``'s ru_maxrss would also count the forked copy of this bench, which holds the Hub server."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_box: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out_box.__setitem__(k, s.read()))
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.02)
    for r in readers:
        r.join()
    if proc.returncode != 0 and not may_fail:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{out_box.get('err', '')[-3000:]}")
    return out_box.get("out", ""), peak


def run_pipeline(name: str, steps: list[list[str]], run_dir: Path, env: dict[str, str]) -> dict:
    rss, stdout = 0, ""
    start = time.monotonic()
    with DiskSampler(run_dir) as disk:
        for cmd in steps:
            out, peak = run_child(cmd, env)
            rss, stdout = max(rss, peak), stdout + out
    return {"name": name, "wall": time.monotonic() - start, "disk": disk.peak, "rss": rss, "stdout": stdout,
            "started": start}


# ------------------------------------------------------------------------------------------ the runs


def child_env(server: HubServer, hf_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(key, None)
    env.update(HF_ENDPOINT=server.url, HF_HOME=str(hf_home), HF_TOKEN=ALICE_WRITE_TOKEN, HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_UPDATE_CHECK="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def steps_for(kind: str, run_dir: Path, config: Path, repo: str, shard: str, mergekit: Path) -> list[list[str]]:
    py = sys.executable
    local_cfg, out = run_dir / "local.yaml", run_dir / "out"
    lazymoe = [py, "-m", "lazymoe", "-q"]  # the commands a user types
    if kind == "sequential":
        return [[py, "-c", DOWNLOAD, str(config), str(local_cfg)],
                [*lazymoe, "merge", str(local_cfg), str(out), "--max-shard-size", shard],
                [*lazymoe, "push", str(out), repo]]
    if kind in ("streamed", "resume"):
        return [[*lazymoe, "merge", str(config), str(out), "--push", repo, "--no-keep", "--max-shard-size", shard]]
    if kind == "upload":  # the output alone, made beforehand (prepare_upload), as a user would upload it
        return [[py, "-c", UPLOAD_FOLDER, str(config.parent / UPLOAD_SOURCE), repo]]
    if kind == "mergekit":
        return [[py, "-c", DOWNLOAD, str(config), str(local_cfg)],
                [str(mergekit), str(local_cfg), str(out), "--quiet"],
                [py, "-c", UPLOAD_FOLDER, str(out), repo]]
    raise SystemExit(f"unknown run {kind!r}")


def transfer_seconds(server: HubServer) -> float:
    """From the first request for weight bytes (not a header read) to the end of the last commit."""
    weights = server.weight_reads(whole=True)
    commits = server.requests_of("commit", status=200)
    return max(c.finished for c in commits) - min(r.started for r in weights) if weights and commits else 0.0


def write_timeline(path: Path, server: HubServer, result: dict) -> None:
    """The run's requests as the server saw them, times in seconds from the run's start (``--timeline``)."""
    t0 = result["started"]
    rows = [{"kind": r.kind, "method": r.method, "path": r.path, "range": r.range, "sent": r.response_bytes,
             "received": r.body_bytes, "status": r.status, "start": round(r.started - t0, 4),
             "end": round(r.finished - t0, 4)} for r in server.requests]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"wall": result["wall"], "requests": rows}, indent=1) + "\n")


def remote_digest(server: HubServer, repo_id: str) -> dict[str, str]:
    return {p: hashlib.sha256(b.data).hexdigest() for p, b in server.files(repo_id).items()
            if p not in (".gitattributes", "README.md", "lazymoe_config.yml")}  # the recipe names folders or ids


def needed_bytes(server: HubServer, config: Path, work: Path, shard: str) -> dict:
    """The plan's figures for this recipe on this Hub (a child process, so the client reads the env)."""
    code = ("import json, sys; from lazymoe.pipeline.merge import make_plan; "
            "p = make_plan(sys.argv[1], max_shard_bytes=sys.argv[2], progress=False); "
            "reads = [sorted({(q.model, q.source.name, q.nbytes_in) for t in s.tensors for q in t.pieces if q.source}) "
            "for s in p.shards]; "
            "print(json.dumps({'needed': p.download_bytes, 'output': p.output_bytes, "
            "'shards': [s.nbytes for s in p.shards], 'reads': reads}))")
    out, _ = run_child([sys.executable, "-c", code, str(config), shard], child_env(server, work / "hf-plan"))
    figures = json.loads(out.strip().splitlines()[-1])
    reads = [{(model, name): nbytes for model, name, nbytes in shard_reads} for shard_reads in figures.pop("reads")]
    figures["floor"] = transfer_floor_bytes(figures["needed"], figures["output"], list(zip(reads, figures["shards"])))
    figures["shards"] = len(figures["shards"])
    return figures


def transfer_floor_bytes(needed: int, output: int, shards: list[tuple[dict, int]]) -> int | None:
    """Bytes' worth of time (at one bandwidth B each way) that any fetch-merge-push pipeline needs at least,
    whatever its order, when a shard can only be uploaded once all of it is known: the LFS upload starts with
    the file's sha256. ``shards``: for each, the source tensors it reads ({(model, tensor): bytes}) and its
    bytes. What a shard holds beyond what it reads (the routers, computed; a widening cast) counts as computed:
    C, all shards together. None when a source tensor feeds two shards (a noise-upcycled expert, an lm_head
    untied from the embeddings): a byte fetched once then counts twice, and the bound below does not hold.

    With each fetched byte in one shard, take the shard m reading the most, F_m, complete at time t. Before t
    the download carried F_m and everything the shards completed earlier read, so at most t*B - F_m + C of the
    output can have been uploaded by t; the rest goes after t: T >= t + (O - t*B + F_m - C)/B = (O + F_m - C)/B.
    And the last shard to complete waits for every fetched byte: T >= (N + smallest shard)/B."""
    seen: set = set()
    for reads, _ in shards:
        if seen & reads.keys():
            return None
        seen |= reads.keys()
    fetched = [(sum(reads.values()), size) for reads, size in shards]
    computed = sum(max(0, size - f) for f, size in fetched)
    return max(output + max(f for f, _ in fetched) - computed, needed + min(s for _, s in fetched))


#: the runs ``--repeat`` repeats: the one whose ratio the goal bounds closely (the others are 2x or 0.8x it)
REPEATED = ("streamed", "upload")
#: the bench's recipe over the four experts (from the Hub, and from local folders for the upload run)
RECIPE = {"gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2}
#: where the ``upload`` run's folder is made, beside the recipe: the merged model, shards and all
UPLOAD_SOURCE = "upload-source"


def prepare_upload(experts: list[Path], work: Path, shard: str) -> None:
    """The ``upload`` run's folder: the same merge from the experts' local folders (its shards are the
    streamed run's, byte for byte), made once and not measured."""
    import _synth

    local = _synth.write_moe_config(work / "local.yaml", experts, **RECIPE)
    shutil.rmtree(work / UPLOAD_SOURCE, ignore_errors=True)
    run_child([sys.executable, "-m", "lazymoe", "-q", "merge", str(local), str(work / UPLOAD_SOURCE),
               "--max-shard-size", shard], dict(os.environ))


def measure_run(server: HubServer, kind: str, bw: float, runs_root: Path, config: Path, args, attempt: int,
                digests: dict) -> dict:
    """One run of pipeline ``kind`` at ``bw`` MB/s, in a fresh folder and Hugging Face cache, against an empty
    repo; its figures, as the server counted them."""
    run_dir = runs_root / f"{kind}-{bw:g}-{attempt}"
    run_dir.mkdir()
    repo = f"alice/bench-{kind}-{bw:g}"
    steps = steps_for(kind, run_dir, config, repo, args.shard, args.mergekit)
    held = None
    if kind == "resume":  # the interrupted first run, not measured
        server.reset_counters()  # its uploads alone are counted next
        server.fail("lfs-upload", nth=RESUME_FAILS_AT, times=None)
        print(f"interrupting a streamed run at {bw:g} MB/s ...", flush=True)
        run_child(steps[0], child_env(server, run_dir / "hf"), may_fail=True)
        server.clear_failures()
        held = len({r.path for r in server.requests_of("lfs-upload", status=200)})
    server.reset_counters()
    print(f"running {kind} at {bw:g} MB/s ...", flush=True)
    result = run_pipeline(kind, steps, run_dir, child_env(server, run_dir / "hf"))
    if args.timeline:
        write_timeline(args.timeline / f"{kind}-{bw:g}-{attempt}.json", server, result)
    result.update(bw=bw, down=server.downloaded_bytes, up=server.uploaded_bytes, held=held,
                  commits=len(server.requests_of("commit", status=200)), transfer=transfer_seconds(server))
    digests.setdefault((kind, bw), []).append(remote_digest(server, repo))  # each attempt's, compared
    server.repos.pop(repo, None)  # the server keeps repos in memory
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ Beyonder arithmetic


MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "sliding_window": 4096, "max_position_embeddings": 32768}


def _mistral_7b_on_the_hub(ref: str):
    """A Hub model's info as ``describe`` gives it for Mistral-7B: its tensor headers, no weights."""
    from lazymoe.io.safetensors import TensorInfo
    from lazymoe.io.sources import ModelInfo, ModelRef

    H, I, V, L, kv = 4096, 14336, 32000, 32, 1024
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in range(L):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)})
    folder = Path("/nonexistent-snapshot") / ref.replace("/", "--") / ("0" * 40)
    offset, tensors = 0, {}
    for name, shape in shapes.items():
        nbytes = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        tensors[name] = TensorInfo(name, "BF16", shape, folder / "model.safetensors", offset, nbytes)
        offset += nbytes
    return ModelInfo(ModelRef(ref, repo_id=ref), MISTRAL_7B, tensors, folder, offset)


def recipe_arithmetic(config, title: str) -> list[str]:
    """Bytes fetched and uploaded and peak disk for a recipe of Mistral-7B models on the Hub, from its plan."""
    from lazymoe.moe import checks
    from lazymoe.moe.plan import build_plan
    from lazymoe.options import DEFAULT_MAX_SHARD_BYTES
    from lazymoe.moe.plan import STREAMED_SHARDS_ON_DISK

    models = {ref: _mistral_7b_on_the_hub(ref) for ref in config.model_refs()}
    output = checks.choose_output(config, models)
    plan = build_plan(config, models, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, output=output)
    low = build_plan(config, models, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES, low_disk=True, output=output)
    whole = sum(m.weight_bytes for m in models.values())
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    return [
        f"{title} (gate_mode {config.gate_mode}, {len(plan.shards)} shards of at most {gb(plan.max_shard_bytes)}), "
        "from its plan:",
        f"- bytes fetched: {gb(plan.download_bytes)} (today: the {len(models)} repos whole, {gb(whole)}; "
        f"{whole / plan.download_bytes:.2f}x the bytes the MoE reads)",
        f"- bytes uploaded: {gb(plan.output_bytes)} (the shards) + config, tokenizer and card",
        f"- peak disk, download then merge (before this change): {gb(whole + plan.output_bytes)}; "
        f"lazymoe merge now: {gb(plan.disk_bytes)} (output + fetched ranges, kept for the next run); "
        f"--low-disk: {gb(low.disk_bytes)}",
        f"- peak disk, merge --push --no-keep: at most {gb(plan.streamed_disk_bytes())} "
        f"({STREAMED_SHARDS_ON_DISK} shards + what the router pass reads of the base, each deleted once written, "
        f"+ one fetch window of {gb(plan.fetch_window)})",
    ]


def beyonder_arithmetic() -> list[str]:
    from lazymoe.config import load_config
    from lazymoe.notebook.presets import load_preset

    beyonder = load_config(load_preset(REPO / "notebooks" / "presets" / "beyonder-4x7b-v3.yaml").config)
    experts = [beyonder.experts[i % 4].model_copy(update={"source_model": f"org/mistral-7b-expert{i}"})
               for i in range(8)]
    eight = beyonder.model_copy(update={"experts": experts, "base_model": "org/mistral-7b-expert0"})
    return (recipe_arithmetic(beyonder, "Beyonder-4x7B recipe (4 x Mistral-7B)") + [""]
            + recipe_arithmetic(eight, "An 8x7B recipe (8 distinct Mistral-7B fine-tunes, the first as base)"))


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bandwidths", default="5,20", help="MB/s of the local Hub, each direction (default 5,20)")
    ap.add_argument("--runs", default="sequential,streamed,mergekit",
                    help="pipelines, of sequential, streamed, mergekit, upload, resume")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--shard", default="20MB", help="output shard size (lazymoe; mergekit keeps its default)")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "hub")
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--timeline", type=Path, help="write each run's requests (kind, bytes, start, end) as JSON here")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "hub_bench.md")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of the streamed pipeline per bandwidth; the table shows the median run")
    args = ap.parse_args(argv)

    import _synth

    _synth.compile_lazymoe()

    runs = args.runs.split(",")
    if "mergekit" in runs and not args.mergekit.is_file():
        print(f"note: {args.mergekit} not found: mergekit runs skipped")
        runs.remove("mergekit")
    shape = _synth.Shape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=8,
                         kv_heads=2, vocab=1024)
    experts = _synth.build_experts(args.work / "synth", shape, 4, max_input_shard_bytes=20 * MB, log=lambda m: None)
    whole = sum(p.stat().st_size for e in experts for p in e.glob("*.safetensors"))

    with HubServer() as server:
        add_test_accounts(server)
        ids = []
        for i, folder in enumerate(experts):
            server.publish_folder(f"bench/expert{i}", folder)
            ids.append(f"bench/expert{i}")
        config = _synth.write_moe_config(args.work / "hub.yaml", [Path(i) for i in ids], **RECIPE)
        runs_root = args.work / "runs"
        shutil.rmtree(runs_root, ignore_errors=True)
        runs_root.mkdir(parents=True)
        figures = needed_bytes(server, config, runs_root, args.shard)
        if "upload" in runs:
            prepare_upload(experts, args.work, args.shard)
        rows, digests = [], {}
        for bw in [float(b) for b in args.bandwidths.split(",")]:
            server.set_bandwidth(download_bps=bw * MB, upload_bps=bw * MB)
            for kind in runs:
                tries = []
                for attempt in range(args.repeat if kind in REPEATED else 1):
                    tries.append(measure_run(server, kind, bw, runs_root, config, args, attempt, digests))
                    print(f"  {tries[-1]['wall']:.1f} s", flush=True)
                tries.sort(key=lambda r: r["wall"])
                result = dict(tries[len(tries) // 2])  # the median run (the upper one of an even count)
                result["walls"] = [r["wall"] for r in tries]
                rows.append(result)

    out_mb = figures["output"] / MB
    lines = [
        f"# Hub to Hub: {len(experts)} synthetic experts ({shape.key}), {whole / MB:.0f} MB on the Hub; the MoE reads "
        f"{figures['needed'] / MB:.0f} MB and writes {out_mb:.0f} MB in {figures['shards']} shards of <= {args.shard}",
        "",
        "| MB/s | pipeline | wall s | fetched MB | fetched / needed | uploaded MB | commits | peak disk MB | "
        "peak RSS MB | wall / max(fetch, upload) | transfer s | transfer / max(fetch, upload) | "
        "transfer floor s | transfer / floor | wall / upload alone |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    alone = {r["bw"]: r["wall"] for r in rows if r["name"] == "upload"}
    for r in rows:
        longer = max(figures["needed"], figures["output"]) / (r["bw"] * MB)  # the longer transfer, alone
        least = figures["floor"] / (r["bw"] * MB) if figures["floor"] is not None else None
        floor_cells = f"{least:.1f} | {r['transfer'] / least:.2f}" if least and r["transfer"] else "– | –"
        floor_cells += f" | {r['wall'] / alone[r['bw']]:.2f}" if r["bw"] in alone else " | –"
        walls = r["walls"]
        spread = f" ({walls[0]:.1f}–{walls[-1]:.1f}, {len(walls)} runs)" if len(walls) > 1 else ""
        ratio = f"{r['down'] / figures['needed']:.3f}" if r["down"] else "–"  # the upload run fetches nothing
        transfer = f"{r['transfer']:.1f} | {r['transfer'] / longer:.2f}" if r["transfer"] else "– | –"
        lines.append(
            f"| {r['bw']:g} | {r['name']} | {r['wall']:.1f}{spread} | {r['down'] / MB:.1f} | {ratio} "
            f"| {r['up'] / MB:.1f} | {r['commits']} | {r['disk'] / MB:.0f} | {r['rss'] / MB:.0f} | "
            f"{r['wall'] / longer:.2f} | {transfer} | {floor_cells} |")
    lines.append("")
    lines.append("fetched: body bytes the server sent (config, tokenizer and headers included); needed: the tensor "
                 "bytes the MoE reads (plan.download_bytes); max(fetch, upload): the needed bytes or the output, "
                 "whichever is larger, at the bandwidth; transfer: from the first request for weight bytes to the "
                 "end of the commit, as the server saw them (wall less the processes' start-up, imports, planning "
                 "and exit). A pipeline run several times (--repeat) shows its median run, with the range of its wall times. "
                 "transfer floor: a transfer time no pipeline can beat if it uploads a shard only once all of it "
                 "is known (an LFS upload starts with the file's sha256): (output + the largest shard's fetched "
                 "bytes - computed bytes) / bandwidth, whatever the order, when no source tensor feeds two shards "
                 "(bench/hub_bench.py: transfer_floor_bytes; – otherwise). upload alone: the `upload` run, "
                 "huggingface_hub's upload_folder of the same output (made beforehand from local folders) in a "
                 "fresh process: the time a user waits to upload this model, start-up, per-file requests and the "
                 "link's real pace included.")
    for bw in sorted({r["bw"] for r in rows}):
        for kind in ("streamed", "resume"):
            if ("sequential", bw) in digests and (kind, bw) in digests:
                same = all(d == digests[("sequential", bw)][0] for d in digests[(kind, bw)])
                lines.append(f"- {bw:g} MB/s: {kind} upload {'byte-identical to' if same else 'DIFFERS from'} "
                             "the sequential one (README and the saved recipe aside)")
        if ("upload", bw) in digests and ("streamed", bw) in digests:
            shards = [{p: d for p, d in run.items() if p.endswith(".safetensors")}
                      for run in digests[("upload", bw)] + digests[("streamed", bw)]]
            extra = sorted(set(digests[("upload", bw)][0]) - set(digests[("streamed", bw)][0]))
            lines.append(f"- {bw:g} MB/s: the upload run's shards {'are byte-identical to' if all(d == shards[0] for d in shards) else 'DIFFER from'} "
                         f"the streamed run's; it also sends {', '.join(extra) or 'nothing more'} (upload_folder sends "
                         "every file of the folder); its peak disk leaves out the folder, made beforehand")
    for r in rows:
        if r["name"] == "resume":
            lines.append(f"- {r['bw']:g} MB/s, resume: the interrupted run had sent {r['held']} of "
                         f"{figures['shards']} shards; the re-run fetched {r['down'] / MB:.1f} MB and uploaded "
                         f"{r['up'] / MB:.1f} MB (of the {figures['needed'] / MB:.0f} MB the MoE reads and the "
                         f"{out_mb:.0f} MB it writes), with one commit")
    lines += [""] + beyonder_arithmetic()
    text = "\n".join(lines)
    print("\n" + text)
    results = args.results
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_sample_disk(sys.argv[2]) if sys.argv[1:2] == ["_sample_disk"] else main())
