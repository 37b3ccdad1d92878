"""What the gate modes whose experts write (``expert_classifier``, ``trained``) cost: calibration tokens, fit
seconds on a GPU and a CPU, peak memory. Plain arithmetic on the plan (no torch), so the plan reports it."""

from __future__ import annotations

from ..moe import arch

#: tokens each expert writes after each of its positive prompts (router_continuation_tokens overrides)
WRITTEN_TOKENS = 48
#: continuations each expert writes per prompt: five one-word prompts are otherwise little text
SAMPLES_PER_PROMPT = 2
#: router-only training: full-batch Adam steps (``trained``)
TRAIN_STEPS = 60
#: Per layer, at Mistral-7B width (hidden 4096, MLP 14336, 4 experts), per 1,000 calibration tokens, on 2
#: CPU cores: the classifier fit (it always runs on the CPU, in float64; README's measurement of the
#: ``classifier`` mode, ~1,000 tokens) and one router-training step (forward, checkpointed recompute and
#: backward in float32; ``bench/router_fit_cost.py``: 64 s for 256 tokens on a heavily shared CPU, so an
#: upper bound).
CLASSIFIER_S_PER_LAYER_KTOK = 22.0
TRAIN_STEP_S_PER_LAYER_KTOK_CPU = 250.0
#: GPU estimate for training: FLOPs at a T4's sustained ~5 TFLOP/s in float32, plus moving each layer's
#: weights (float32) to the GPU twice per step at ~5 GB/s (they are re-read each time: the MoE never fits)
GPU_FLOPS = 5e12
HOST_TO_GPU_BYTES_PER_S = 5e9
#: an expert is loaded whole to write (disk to device, ~0.5 GB/s); writing is memory-bound: ~20 tokens/s
#: for 7B on a T4, ~1 token/s on a CPU
LOAD_BYTES_PER_S = 0.5e9
WRITE_TOKENS_PER_S_GPU, WRITE_TOKENS_PER_S_CPU_7B = 20.0, 1.0


def calibration_tokens(config) -> int:
    """About how many tokens the routers are fitted and trained on (prompts ~8 tokens; text ~4 chars/token)."""
    new = WRITTEN_TOKENS if config.router_continuation_tokens is None else config.router_continuation_tokens
    total = 0
    for spec in config.experts:
        total += len(spec.positive_prompts) * SAMPLES_PER_PROMPT * (8 + new)
        total += sum(len(t) for t in spec.calibration_texts()) // 4
    return total


def fit_estimate(plan) -> dict[str, float]:
    """Seconds the ``expert_classifier`` / ``trained`` router fit takes, on a GPU and on a CPU, and the
    memory (bytes) it holds at its peak: the larger of one whole expert (loaded to write) and the streamed
    training state (one layer of base and expert weights in float32 twice -- forward and recompute --, the
    per-layer activations of the calibration tokens, and the logits)."""
    config = plan.config
    tokens = calibration_tokens(config)
    L, E = plan.num_layers, config.num_experts
    H = int(plan.out_config["hidden_size"])
    V = int(plan.out_config.get("vocab_size", 32000))
    width = plan.expert_params / max(L, 1) / (3 * 4096 * 14336)  # per-layer MLP size relative to 7B's
    new = WRITTEN_TOKENS if config.router_continuation_tokens is None else config.router_continuation_tokens
    base_bytes = plan.base.weight_bytes or sum(t.nbytes for t in plan.base.tensors.values())
    write = E * base_bytes / LOAD_BYTES_PER_S
    write_gpu = write + E * new / WRITE_TOKENS_PER_S_GPU
    write_cpu = write + E * new * max(width, 0.01) / WRITE_TOKENS_PER_S_CPU_7B
    classifier = L * CLASSIFIER_S_PER_LAYER_KTOK * tokens / 1000 * (H / 4096) * E / 4
    out = {"tokens": float(tokens), "gpu_seconds": write_gpu + classifier, "cpu_seconds": write_cpu + classifier}
    per_layer = 4 * (sum(t.numel for n, t in plan.base.tensors.items() if arch.layer_of(n) == 0)
                     + E * plan.expert_params // max(L, 1))
    whole = base_bytes  # the base's size stands for an expert's: merges check they match
    if config.gate_mode == "trained":
        scale = tokens / 1000 * max(width, 1e-4) * (E / 4)
        out["cpu_seconds"] += (TRAIN_STEPS + 1) * L * TRAIN_STEP_S_PER_LAYER_KTOK_CPU * scale
        attn = sum(t.numel for n, t in plan.base.tensors.items() if arch.layer_of(n) == 0)
        flops = 3.5 * 2 * tokens * (attn + config.experts_per_token * plan.expert_params // max(L, 1)) * L
        out["gpu_seconds"] += (TRAIN_STEPS + 1) * (flops / GPU_FLOPS + 2 * L * per_layer / HOST_TO_GPU_BYTES_PER_S)
        streamed = 2 * per_layer + 4 * tokens * (H * (L + 8) + 3 * V) + 4 * V * H
    else:
        streamed = per_layer + 4 * tokens * H * 4
    out["peak_bytes"] = float(max(whole, streamed))
    return out
