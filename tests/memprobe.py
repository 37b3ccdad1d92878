"""Peak memory of one call, measured the way the operating system sees it (run in a fresh process).

``python tests/memprobe.py SCENARIO ARGS_JSON`` prints one JSON line: the call's peak resident memory above
what the process held just before it (``/proc/self/status`` VmHWM after resetting it through
``/proc/self/clear_refs``), plus what the scenario reports. glibc is told to serve every allocation over
64 KiB with its own mapping, so freed tensors leave the resident set at once and the peak is what was live.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_of(call) -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS")
    call()
    return _status("VmHWM") - before


def writer(args: dict) -> dict:
    import torch

    from lazymoe.io.sources import WeightStore
    from lazymoe.pipeline.merge import make_plan
    from lazymoe.moe.writer import write_shards

    plan = make_plan(args["config"], progress=False)
    gates = torch.randn(plan.num_layers, plan.config.num_experts, int(plan.out_config["hidden_size"]))
    out = Path(args["out"])
    store = WeightStore(plan.models)
    (out / "warm").mkdir()
    write_shards(plan, gates, out / "warm", store, progress=False)  # warm: imports and first-use setup
    (out / "measured").mkdir()
    peak = peak_of(lambda: write_shards(plan, gates, out / "measured", store, progress=False))
    source = max(p.source.nbytes for t in plan.tensors for p in t.pieces if p.source is not None)
    return {"peak": peak, "biggest_source": source, "biggest_output": max(t.nbytes for t in plan.tensors)}


def router(args: dict) -> dict:
    from transformers import AutoTokenizer

    from lazymoe.pipeline.merge import make_plan
    from lazymoe.router.gates import compute_gates

    plan = make_plan(args["config"], progress=False)
    plan = plan.__class__(**{**plan.__dict__, "config": plan.config.with_seed()})
    tokenizer = AutoTokenizer.from_pretrained(str(plan.base.folder))
    compute_gates(plan, tokenizer, device="cpu", progress=False)  # warm: imports, lazy inits, thread pools
    peak = peak_of(lambda: compute_gates(plan, tokenizer, device="cpu", progress=False))
    return {"peak": peak, "estimate": plan.router_pass_bytes}


if __name__ == "__main__":
    scenario, raw = sys.argv[1], sys.argv[2]
    print(json.dumps({"writer": writer, "router": router}[scenario](json.loads(raw))))
