"""Router initialisation: one (num_layers, num_experts, hidden) float32 tensor of gate rows.

The reference modes follow mergekit-moe exactly (BRIEF §3), so recipes written for it route the way
their authors expect:

* ``random``: N(0, 1) entries; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) (torch.nn.Linear's init).
* ``cheap_embed``: per expert, the normalised sum of the prompts' input embeddings (positives, minus the
  normalised negatives), unit length, identical for every layer.
* ``hidden``/``hidden_last``/``hidden_avg``: the **base** model in bfloat16 runs the raw prompts (BOS
  prepended as text, left padding with BOS as pad, no position ids); row ℓ is the residual stream
  entering layer ℓ at the last token (``hidden_avg``: averaged over every position, padding included),
  averaged over prompts, positives minus negatives, unit length.

All randomness comes from one seeded generator, so a saved config reproduces its gates bit for bit.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from .config import MoEConfig
from .errors import ConfigError
from .safetensors_io import read_tensor

logger = logging.getLogger(__name__)

HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu.")
    return dev


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The reference tokenisation: BOS as text, no special tokens added, left-padded with BOS."""
    texts = [(tokenizer.bos_token or "") + p for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def random_gates(num_layers: int, num_experts: int, hidden: int, *, mode: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_experts, hidden)
    if mode == "random":
        return torch.randn(shape, generator=gen)
    bound = 1.0 / math.sqrt(hidden)
    return torch.rand(shape, generator=gen) * (2 * bound) - bound


def cheap_embed_gates(embed: torch.Tensor, tokenizer, config: MoEConfig, num_layers: int) -> torch.Tensor:
    embed = embed.float()

    def vec(prompts: list[str]) -> torch.Tensor:
        batch = tokenize_prompts(tokenizer, prompts)
        rows = embed[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)
        return _unit(rows.sum(dim=(0, 1)))

    out = []
    for expert in config.experts:
        v = vec(expert.positive_prompts)
        if expert.negative_prompts:
            v = v - vec(expert.negative_prompts)
        out.append(_unit(v))
    return torch.stack(out).unsqueeze(0).repeat(num_layers, 1, 1)


@torch.no_grad()
def hidden_states_for(model, tokenizer, prompts: list[str], *, average: bool) -> torch.Tensor:
    """(num_layers, hidden) float32: the mean over prompts of the residual stream entering each layer."""
    batch = {k: v.to(model.device) for k, v in tokenize_prompts(tokenizer, prompts).items()}
    out = model(**batch, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1]).float()  # (L, B, T, H)
    states = states.mean(dim=2) if average else states[:, :, -1, :]
    return states.mean(dim=1)


def hidden_gates(model, tokenizer, config: MoEConfig, *, progress: bool = True) -> torch.Tensor:
    average = config.gate_mode == "hidden_avg"
    rows = []
    for expert in tqdm(config.experts, desc="Router: expert prompts", disable=not progress):
        v = hidden_states_for(model, tokenizer, expert.positive_prompts, average=average)
        if expert.negative_prompts:
            v = v - hidden_states_for(model, tokenizer, expert.negative_prompts, average=average)
        rows.append(_unit(v))
    return torch.stack(rows, dim=1).cpu()  # (L, E, H)


def load_router_model(folder, *, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, low_cpu_mem_usage=True)
    return model.to(device).eval()


def compute_gates(plan, tokenizer, *, device: str | None = None, progress: bool = True) -> torch.Tensor:
    """Gate rows for every layer and expert, as float32 on the CPU."""
    config = plan.config
    base = plan.base
    L, E, H = plan.num_layers, config.num_experts, int(plan.out_config["hidden_size"])
    mode = config.gate_mode
    if mode in ("random", "uniform_random"):
        assert config.seed is not None, "compute_gates needs a config with a pinned seed (MoEConfig.with_seed)"
        gates = random_gates(L, E, H, mode=mode, seed=config.seed)
    elif mode == "cheap_embed":
        gates = cheap_embed_gates(read_tensor(base.tensors["model.embed_tokens.weight"]), tokenizer, config, L)
    elif mode in HIDDEN_MODES:
        model = load_router_model(base.folder, device=pick_device(device))
        try:
            gates = hidden_gates(model, tokenizer, config, progress=progress)
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    else:  # config validation makes this unreachable; keep the message for direct API misuse
        raise ConfigError(f"Unknown gate_mode {mode!r}.")
    assert gates.shape == (L, E, H), gates.shape
    return gates


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose gate matrix is badly conditioned: experts whose rows are nearly parallel share traffic."""
    out = []
    for layer in range(gates.shape[0]):
        if gates.shape[1] <= gates.shape[2] and torch.linalg.cond(gates[layer].float()) > threshold:
            out.append(layer)
    return out
