"""Dense -> MoE tensor-name tables, written once as data.

Input families: Llama and Mistral (same tensor names). Output: Mixtral, in one of two layouts:

* ``classic`` (default): ``block_sparse_moe.experts.E.w1/w2/w3`` + ``block_sparse_moe.gate``. Read by
  transformers 4.x, by transformers 5 (converted to its fused layout in memory, identical logits), by
  llama.cpp's ``convert_hf_to_gguf.py`` and by vLLM. This is what every consumer accepts.
* ``fused``: transformers 5's in-memory layout, ``mlp.experts.gate_up_proj`` (E, 2I, H) and
  ``mlp.experts.down_proj`` (E, H, I). Loads without conversion in transformers 5, but transformers 4.x and
  llama.cpp's converter (0.3.36) refuse it, so it is opt-in.

Both are byte streams of the same expert tensors in a different grouping, so the writer streams either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Layout = Literal["classic", "fused"]
LAYOUTS = ("classic", "fused")

#: input model types we can turn into Mixtral, and the family used to tell "same family"
FAMILIES = {"llama": "llama", "mistral": "llama"}

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
#: per layer, what the base contributes besides its MLP (Llama names, which Mixtral shares)
LAYER_SHARED = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj")
CLASSIC_EXPERT_NAME = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

# Non-MLP tensors the base contributes unchanged. Anything else in the base is a tensor Mixtral has
# no place for, which we refuse rather than silently drop.
_SHARED = [
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
]
SHARED_RE = re.compile("^(" + "|".join(_SHARED) + ")$")
MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# buffers some old checkpoints carry; transformers recomputes them
IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def mlp_name(layer: int, part: str) -> str:
    return f"{layer_prefix(layer)}mlp.{part}.weight"


def expert_params(hidden: int, intermediate: int, layers: int) -> int:
    """One expert's parameters over all layers: gate_proj, up_proj (I x H each) and down_proj (H x I)."""
    return 3 * hidden * intermediate * layers


@dataclass(frozen=True)
class MixtralNames:
    layout: Layout = "classic"

    def gate(self, layer: int) -> str:
        block = "block_sparse_moe" if self.layout == "classic" else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def expert(self, layer: int, expert: int, part: str) -> str:
        assert self.layout == "classic"
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{CLASSIC_EXPERT_NAME[part]}.weight"

    def fused(self, layer: int, which: Literal["gate_up_proj", "down_proj"]) -> str:
        assert self.layout == "fused"
        return f"model.layers.{layer}.mlp.experts.{which}"


def config_dtype(cfg: dict) -> str | None:
    """The dtype a config.json declares (transformers 4 writes ``torch_dtype``, 5 writes ``dtype``), if any."""
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    return str(value) if value else None


def layout_of(names: Iterable[str]) -> Layout | None:
    """The expert layout a Mixtral checkpoint's tensor names use; None when it has no expert tensors."""
    names = list(names)
    if any(".block_sparse_moe." in name for name in names):
        return "classic"
    if any(".mlp.experts." in name for name in names):
        return "fused"
    return None


def layer_of(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def mixtral_config(base: dict, *, num_experts: int, experts_per_token: int, dtype: str) -> dict:
    """config.json for the MoE: the base's settings kept verbatim (RoPE, tying, norms), MoE keys added."""
    out = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype",
                                                       "_name_or_path", "mlp_bias", "pretraining_tp",
                                                       "transformers_version")}
    out["architectures"] = ["MixtralForCausalLM"]
    out["model_type"] = "mixtral"
    out["num_local_experts"] = num_experts
    out["num_experts_per_tok"] = experts_per_token
    out.setdefault("sliding_window", None)  # Llama bases have none; Mistral's value is kept as is
    _pin_rope(out)
    out.setdefault("router_aux_loss_coef", 0.02)
    out.setdefault("output_router_logits", False)
    # transformers < 4.56 reads only torch_dtype, later ones read both; writing one key keeps it unambiguous
    out["torch_dtype"] = dtype
    return out


#: what Llama and Mistral configs mean when they omit rope_theta (Mixtral's own default is 1e6)
DENSE_ROPE_THETA = 10000.0


def _pin_rope(out: dict) -> None:
    """Spell the base's RoPE out in both the transformers-5 and the 4.x form.

    A transformers-5 base keeps RoPE in ``rope_parameters`` only; transformers 4.x (and older converters)
    read ``rope_theta``/``rope_scaling`` and would otherwise fall back to *Mixtral's* default theta of 1e6,
    silently breaking every attention layer. A base that omits theta altogether means the dense default.
    """
    params = out.get("rope_parameters")
    if isinstance(params, dict):
        out.setdefault("rope_theta", params.get("rope_theta", DENSE_ROPE_THETA))
        if params.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
            out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        out.setdefault("rope_theta", DENSE_ROPE_THETA)

