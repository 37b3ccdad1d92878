#!/usr/bin/env python3
"""What the written-text gate modes cost at 7B width: one layer measured on this CPU, then extrapolated.

    python bench/router_fit_cost.py --tokens 512

Builds one Mistral-7B-wide decoder layer (hidden 4096, MLP 14336, 32 heads, 8 KV heads) with four
random experts in memory, then times, on ``--tokens`` calibration tokens:

* one router-training step of that layer (``trained``): forward, then the checkpointed recompute and
  backward, exactly as ``lazymoe.router.written.train_routers`` runs it;
* the per-layer classifier fit (``expert_classifier``, and ``trained``'s initialisation).

It prints the per-layer seconds, the peak resident memory, and the extrapolation to 32 layers and the
default number of steps. The numbers feed ``lazymoe.router.written.FIT_COST`` (what ``plan`` reports).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lazymoe.router import written as router_train  # noqa: E402
from lazymoe.router.fitted import fit_classifier  # noqa: E402

MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1,
           "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "hidden_act": "silu", "sliding_window": None, "tie_word_embeddings": False}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens (the default config writes "
                        "about 2,000 for four experts with five prompts)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-classifier", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    H, I, E = MISTRAL["hidden_size"], MISTRAL["intermediate_size"], args.experts
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.02):
        return torch.randn(shape, generator=gen) * scale

    kv = MISTRAL["num_key_value_heads"] * H // MISTRAL["num_attention_heads"]
    base = {"model.embed_tokens.weight": rnd(MISTRAL["vocab_size"], H), "model.norm.weight": torch.ones(H),
            "model.layers.0.input_layernorm.weight": torch.ones(H),
            "model.layers.0.post_attention_layernorm.weight": torch.ones(H),
            "model.layers.0.self_attn.q_proj.weight": rnd(H, H), "model.layers.0.self_attn.k_proj.weight": rnd(kv, H),
            "model.layers.0.self_attn.v_proj.weight": rnd(kv, H), "model.layers.0.self_attn.o_proj.weight": rnd(H, H)}
    experts = [(rnd(I, H), rnd(I, H), rnd(H, I)) for _ in range(E)]
    lm_head = rnd(MISTRAL["vocab_size"], H)
    seq_len = 64
    seqs = [torch.randint(3, 32000, (seq_len,), generator=gen).tolist() for _ in range(max(1, args.tokens // seq_len))]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(MISTRAL))
        moe = router_train.StreamedMoE(tmp, seqs, base.__getitem__, lambda layer: experts, k=2,
                                       device=torch.device("cpu"), num_layers=1)
    keep = moe.stack.mask.bool()
    W0 = rnd(1, E, H, scale=1.0)
    W = W0.clone().requires_grad_(True)
    before = rss_gb()
    start = time.perf_counter()
    lm, bal = router_train.lm_and_balance(moe, W, keep, lm_head)
    forward = time.perf_counter() - start
    (lm + 0.01 * bal).backward()
    step = time.perf_counter() - start
    out = {"tokens": keep.sum().item(), "threads": args.threads, "train_step_layer_s": step,
           "train_forward_layer_s": forward, "peak_rss_gb": rss_gb(), "rss_before_step_gb": before}
    if not args.skip_classifier:
        with torch.no_grad():
            x = torch.randn(int(keep.sum()), H, generator=gen)
        y = torch.arange(len(x)) % E
        groups = (torch.arange(len(x)) // 64) % 5
        start = time.perf_counter()
        fit_classifier(x, y, groups, x[:0], y[:0], E)
        out["classifier_layer_s"] = time.perf_counter() - start
    layers, steps = 32, router_train.TRAIN_STEPS
    out["trained_32_layers_cpu_hours"] = out["train_step_layer_s"] * layers * (steps + 1) / 3600
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
