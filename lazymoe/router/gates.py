"""Router initialisation, the dispatcher: one (num_layers, num_experts, hidden) float32 numpy array of gate rows.

The reference modes follow mergekit-moe exactly (BRIEF §3), so recipes written for it route the way
their authors expect:

* ``random``: N(0, 1) entries; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) (torch.nn.Linear's init).
* ``cheap_embed``: per expert, the normalised sum of the prompts' input embeddings (positives, minus the
  normalised negatives), unit length, identical for every layer.
* ``hidden``/``hidden_last``/``hidden_avg``: the **base** model in bfloat16 runs the raw prompts (BOS
  prepended as text, left padding with BOS as pad, no position ids); row ℓ is the residual stream
  entering layer ℓ at the last token (``hidden_avg``: averaged over every position, padding included),
  averaged over prompts, positives minus negatives, unit length.

All randomness comes from one seeded generator, so a saved config reproduces its gates bit for bit. The random
modes draw torch's numbers without torch (``router.seeded``), so a merge in them never imports torch.

The fitted modes are lazymoe's own, and fit each router on what it reads at inference: the input of its
layer's MLP (the ``post_attention_layernorm`` output) **in the MoE being built**. The prompts run through
the MoE one layer at a time, straight from the safetensors files (one layer in memory): layer l's router is
fitted, then layer l's experts, mixed by that router, produce the input of layer l + 1. Every real token
counts (right padding, so positions are the ones the model uses; padding masked; the leading BOS skipped,
its state being the same for every prompt). Before that, the base continues each positive prompt with
``router_continuation_tokens`` sampled tokens (default 48; 0 = prompts only), so the routers also see
tokens deep inside a text of their expert's kind, as they will at inference.

* ``centroid``: per layer, each expert's mean router input, centred on the mean over experts (minus the
  centred mean of its negative prompts), times one logit scale fitted so that the router's softmax is
  calibrated on the prompt tokens (cross-entropy; otherwise logits are ~|x| and far too peaked).
* ``classifier``: per layer, a bias-free softmax regression on the prompt tokens: positives are labelled
  with their expert, negatives are counter-examples (their probability for that expert is pushed down).
  Classes are balanced, features are rescaled per dimension (real models have a few huge dimensions) and
  the L2 strength is picked by leave-one-prompt-out cross-validation, which also calibrates the logits.

``router_chat_template: true`` wraps each prompt as a user turn of the base's chat template first.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..io.safetensors import read_tensor
from ..lazy import np
from ..moe import arch
from .block import SINGULAR_CONDITION, constant_shared_gate, gate_condition
from .device import pick_device
from .fitted import fitted_gates
from .modes import BY_NAME
from .reference import cheap_embed_gates, hidden_gates, random_gates
from .written import written_gates


def compute_gates(plan, tokenizer, *, device: str | None = None, progress: bool = True, resolve=None,
                  upstream: str = "moe", folder_of=None) -> np.ndarray:
    """Gate rows for every layer and expert, a float32 numpy array (L, plan.gate_rows, H): the routed experts'
    rows first, then (Qwen MoE) the shared expert's gate row.

    ``resolve(ref, name) -> TensorInfo`` (e.g. ``WeightStore.resolve``) locates the tensors the fitted modes
    read: the base's, and every expert's MLPs. Without it they are looked up in ``plan.models``.
    ``upstream="base"`` lets the fitted modes run without expert weights (see ``fitted_gates``); the modes
    whose experts write calibration text then fall back to ``classifier`` (no expert is local yet).
    ``folder_of(ref)`` is a model's local folder (default: the plan's), for the experts that write.
    """
    config = plan.config
    base = plan.base
    L, E, H = plan.num_layers, config.num_experts, int(plan.out_config["hidden_size"])
    mode = config.gate_mode
    group = BY_NAME[mode].group if mode in BY_NAME else None
    spec = config.shared_expert
    # the shared expert's gate comes from its prompts as one more row of the same computation (mergekit's
    # way); without prompts, or in the fitted modes (which fit the routed experts only), it is a constant
    prompted = (plan.gate_rows > E and spec is not None and bool(spec.positive_prompts)
                and group not in ("fitted", "written"))
    rows_config = config.model_copy(update={"experts": config.experts + [spec]}) if prompted else config
    R = rows_config.num_experts
    if group == "random":
        assert config.seed is not None, "compute_gates needs a config with a pinned seed (MoEConfig.with_seed)"
        gates = random_gates(L, R, H, mode=mode, seed=config.seed)
    elif group == "embedding":
        gates = cheap_embed_gates(read_tensor(base.tensors[arch.EMBED]), tokenizer, rows_config, L)
    elif group == "hidden":
        gates = hidden_gates(base, tokenizer, rows_config, device=pick_device(device), progress=progress)
    elif group == "fitted":
        gates = fitted_gates(plan, tokenizer, device=device, progress=progress, resolve=resolve, upstream=upstream)
    elif group == "written" and upstream == "base":
        gates = fitted_gates(plan, tokenizer, device=device, progress=progress, resolve=resolve, upstream=upstream,
                             fit_mode="classifier")
    elif group == "written":
        gates = written_gates(plan, tokenizer, device=pick_device(device), progress=progress, resolve=resolve,
                              folder_of=folder_of)
    else:  # config validation makes this unreachable; keep the message for direct API misuse
        raise ConfigError(f"Unknown gate_mode {mode!r}.")
    if not isinstance(gates, np.ndarray):  # the modes that ran torch
        gates = gates.detach().float().cpu().numpy()
    if plan.gate_rows > R:
        gates = np.concatenate([gates, constant_shared_gate(L, H)], axis=1)
    gates = np.ascontiguousarray(gates, dtype=np.float32)
    assert gates.shape == (L, plan.gate_rows, H), gates.shape
    return gates


def degenerate_layers(gates: np.ndarray, threshold: float | None = None) -> list[int]:
    """Layers whose router can barely tell some experts apart (see ``block.gate_condition``).

    The measure ignores what all rows share, which a softmax router ignores too, so the centred rows of
    the fitted modes are not flagged; for the reference modes it flags the layers mergekit-moe flags.
    """
    limit = SINGULAR_CONDITION if threshold is None else threshold
    return [layer for layer in range(gates.shape[0]) if gate_condition(gates[layer]) > limit]
