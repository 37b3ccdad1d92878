"""Dense -> MoE tensor-name and config tables, written once as data: input families and output architectures.

Input families (``FAMILIES``, by ``model_type``): ``llama`` (Llama 1-3.x, incl. ``llama3`` RoPE scaling) and
``mistral`` (same tensor names, one family); ``qwen2`` (q/k/v biases); ``qwen3`` (q/k RMS norms). The base
contributes embeddings, attention, norms and ``lm_head``; experts contribute their MLPs only.

Output architectures (``OUTPUTS``), named as mergekit-moe names them:

* **Mixtral** (llama/mistral experts): ``block_sparse_moe.experts.E.w1/w2/w3`` + ``block_sparse_moe.gate``
  (``classic``, read by every consumer) or transformers 5's fused ``mlp.experts.gate_up_proj``/``down_proj``
  (``fused``: transformers 4.x and llama.cpp's Mixtral converter refuse it, so it is opt-in).
* **Qwen MoE** = Qwen2-MoE (qwen2 experts, or llama/mistral ones on request): ``mlp.gate`` (E x H),
  ``mlp.experts.E.{gate,up,down}_proj`` and always a shared expert ``mlp.shared_expert.*`` with its sigmoid
  gate ``mlp.shared_expert_gate`` (1 x H): transformers builds one in every layer and llama.cpp's ``qwen2moe``
  requires its tensors, so "no shared expert" is written as a width-1 shared expert of zeros.
* **Qwen3 MoE** (qwen3 experts): ``mlp.gate`` + ``mlp.experts.E.*``, no shared expert, q/k norms kept.

What each output computes per token (x: the MLP input, p = softmax(W_gate x), T: the top-k experts,
m = sum of p over T, M_e: expert e's MLP, S: the shared expert, g: its gate row):

* Mixtral, Qwen3 MoE (``norm_topk_prob: true``; llama.cpp's ``qwen3moe`` also renormalises):
  ``y = sum_{e in T} (p_e / m) M_e(x)``. All experts equal to the dense MLP M => ``y = M(x)``: dense logits,
  whatever the router and k.
* Qwen MoE: llama.cpp's ``qwen2moe`` never renormalises the top-k weights, so lazymoe writes
  ``norm_topk_prob: false`` (mergekit writes true, and its GGUF then computes something else than
  transformers): ``y = sum_{e in T} p_e M_e(x) + sigmoid(g.x) S(x)``. All routed experts equal to M and the
  shared expert equal to M, the routed ones scaled by c (``residual_scale``) => ``y = (c m(x) + sigmoid(g.x)) M(x)``,
  dense iff ``c m(x) + sigmoid(g.x) = 1`` for every token. ``m = 1`` needs k = E, so exactly: k = E, c = 1/2 and
  a constant gate of 1/2 (lazymoe's constant gate, below). Without a shared expert (zeros) ``y = m(x) M(x)``:
  dense iff k = E. mergekit's recipe (c = 1, prompt gate) gives ``(m + sigmoid) M``, up to twice the MLP
  output: the "gibberish after a Qwen2.5 merge with a shared expert" users report.

The constant shared gate is the row ``SHARED_GATE_CONSTANT`` in every entry, not zero: llama.cpp computes
sigmoid(z) as silu(z)/z, which is 0/0 = NaN at z = 0. At 2^-20 per entry, sigmoid(g.x) = 1/2 within
2^-22 |sum(x)|, i.e. to float32 rounding at the widths of real models' normalised inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Layout = Literal["classic", "fused"]
LAYOUTS = ("classic", "fused")

# ------------------------------------------------------------------------------------------- input families

#: input model types we accept, and the family used to tell "same family" (llama and mistral share every name)
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

#: per family, the attention tensors beyond q/k/v/o weights: what the base must have and the MoE keeps
FAMILY_ATTENTION_EXTRAS: dict[str, tuple[str, ...]] = {
    "llama": (),
    "qwen2": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
}

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
CLASSIC_EXPERT_NAME = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LAYER_TENSORS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                 "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")

# Non-MLP tensors the base contributes unchanged. Anything else in the base is a tensor the MoE has no place
# for, which we refuse rather than silently drop.
_SHARED = [
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
]
#: per family, the names the base contributes (its attention extras included)
SHARED_RE_BY_FAMILY = {
    family: re.compile("^(" + "|".join(_SHARED + [r"model\.layers\.\d+\." + re.escape(x) for x in extras]) + ")$")
    for family, extras in FAMILY_ATTENTION_EXTRAS.items()
}
MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# buffers some old checkpoints carry; transformers recomputes them
IGNORED_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def mlp_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def layer_of(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------- output architectures


@dataclass(frozen=True)
class Output:
    """One output architecture: what it is called, what it accepts, how it is laid out."""

    key: str
    name: str  # mergekit-moe's name for it: what ``architecture:`` is matched against
    architecture: str  # config.json ``architectures``
    model_type: str
    families: tuple[str, ...]  # input families it can hold
    max_shared_experts: int
    #: an explicit ``lm_head`` even for tied bases: llama.cpp's qwen2moe requires ``output.weight``
    untie: bool = False
    #: q/k/v biases always present (Qwen2-MoE's attention has them in transformers 4.x and llama.cpp)
    qkv_bias: bool = False
    #: always a shared expert (+ gate) per layer
    shared_block: bool = False
    norm_topk_prob: bool = True
    experts_key: str = "num_experts"  # config key of the expert count


OUTPUTS: dict[str, Output] = {
    "mixtral": Output("mixtral", "Mixtral", "MixtralForCausalLM", "mixtral", ("llama",), 0,
                      experts_key="num_local_experts"),
    "qwen2_moe": Output("qwen2_moe", "Qwen MoE", "Qwen2MoeForCausalLM", "qwen2_moe", ("qwen2", "llama"), 1,
                        untie=True, qkv_bias=True, shared_block=True, norm_topk_prob=False),
    "qwen3_moe": Output("qwen3_moe", "Qwen3 MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), 0),
}
#: the output each family gets when ``architecture`` is not given (a shared expert moves llama to Qwen MoE)
DEFAULT_OUTPUT = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
#: output names mergekit knows and lazymoe does not write, with the reason
NOT_WRITTEN = {"DeepSeek MoE": "it needs remote code (trust_remote_code) to load"}
#: further spellings accepted for ``architecture`` (model types and class names), beyond mergekit's prefixes
_ALIASES = {k: k for k in OUTPUTS} | {o.architecture.lower(): k for k, o in OUTPUTS.items()} | {
    "qwen2": "qwen2_moe", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}

#: the shared gate's entries when it is a constant (see the module docstring: never exactly 0)
SHARED_GATE_CONSTANT = 2.0**-20
#: width of the all-zero shared expert that stands for "no shared expert" in Qwen MoE
EMPTY_SHARED_WIDTH = 1


def match_architecture(value: str) -> list[str]:
    """Output keys ``architecture: value`` may mean, as mergekit-moe matches it: every output whose name
    starts with the value, case-insensitively ("qwen" -> Qwen MoE and Qwen3 MoE). Model types and class names
    (``qwen2_moe``, ``Qwen3MoeForCausalLM``) are accepted too. Empty list: nothing matches."""
    text = value.strip().lower()
    found = [k for k, o in OUTPUTS.items() if o.name.lower().startswith(text)]
    if not found and text.replace(" ", "_") in _ALIASES:
        found = [_ALIASES[text.replace(" ", "_")]]
    return found


def not_written(value: str) -> str | None:
    """The reason lazymoe does not write the mergekit output ``value`` names, if it names one."""
    text = value.strip().lower()
    return next((why for name, why in NOT_WRITTEN.items() if text and name.lower().startswith(text)), None)


def choose_output(architecture: str | None, family: str, num_shared: int) -> tuple[Output, str]:
    """The output for these inputs and why, or ValueError with the reason none fits (the caller words it)."""
    if architecture:
        keys = match_architecture(architecture)
        fits = [k for k in keys if family in OUTPUTS[k].families and num_shared <= OUTPUTS[k].max_shared_experts]
        if not fits:
            names = " or ".join(OUTPUTS[k].name for k in keys)
            why = [f"{OUTPUTS[k].name} holds {'/'.join(OUTPUTS[k].families)} experts"
                   + (" and no shared expert" if OUTPUTS[k].max_shared_experts == 0 else " and at most one shared expert")
                   for k in keys]
            raise ValueError(f"architecture {architecture!r} ({names}) cannot hold {family} experts"
                             f"{' with a shared expert' if num_shared else ''}: {'; '.join(why)}")
        return OUTPUTS[fits[0]], f"architecture: {architecture!r} asks for it"
    key = DEFAULT_OUTPUT[family]
    if num_shared > OUTPUTS[key].max_shared_experts:
        holders = [o for o in OUTPUTS.values() if family in o.families and num_shared <= o.max_shared_experts]
        if not holders:
            raise ValueError(f"{OUTPUTS[key].name}, the only output for {family} experts, has no shared expert")
        return holders[0], f"{family} experts with a shared expert ({OUTPUTS[key].name} has no shared expert)"
    return OUTPUTS[key], f"the experts are {family} models"


@dataclass(frozen=True)
class MoENames:
    """Output tensor names of one output architecture and layout."""

    output: Output
    layout: Layout = "classic"

    @property
    def _mixtral_classic(self) -> bool:
        return self.output.key == "mixtral" and self.layout == "classic"

    def gate(self, layer: int) -> str:
        block = "block_sparse_moe" if self._mixtral_classic else "mlp"
        return f"model.layers.{layer}.{block}.gate.weight"

    def expert(self, layer: int, expert: int, part: str) -> str:
        assert self.layout == "classic"
        if self._mixtral_classic:
            return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{CLASSIC_EXPERT_NAME[part]}.weight"
        return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"

    def fused(self, layer: int, which: Literal["gate_up_proj", "down_proj"]) -> str:
        assert self.layout == "fused"
        return f"model.layers.{layer}.mlp.experts.{which}"

    def shared(self, layer: int, part: str) -> str:
        return f"model.layers.{layer}.mlp.shared_expert.{part}.weight"

    def shared_gate(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


# ------------------------------------------------------------------------------------------- output config

_DROPPED_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", "_name_or_path", "mlp_bias",
                 "pretraining_tp", "transformers_version", "auto_map")


def moe_config(output: Output, base: dict, *, num_experts: int, experts_per_token: int, dtype: str,
               shared_width: int | None = None) -> dict:
    """config.json for the MoE: the base's settings kept verbatim (RoPE, tying, norms), the output's keys added.

    ``shared_width``: the shared expert's intermediate size (Qwen MoE only).
    """
    out = {k: v for k, v in base.items() if k not in _DROPPED_KEYS}
    out["architectures"] = [output.architecture]
    out["model_type"] = output.model_type
    out[output.experts_key] = num_experts
    out["num_experts_per_tok"] = experts_per_token
    _pin_rope(out)
    if output.key == "mixtral":
        out.setdefault("sliding_window", None)  # Llama bases have none; Mistral's value is kept as is
        out.setdefault("router_aux_loss_coef", 0.02)
    else:
        intermediate = int(base["intermediate_size"])
        out["moe_intermediate_size"] = intermediate
        out["decoder_sparse_step"] = 1  # every layer is sparse...
        out["mlp_only_layers"] = []  # ...and none is dense
        out["norm_topk_prob"] = output.norm_topk_prob
        out.setdefault("router_aux_loss_coef", 0.001)
        out.setdefault("head_dim", int(base["hidden_size"]) // int(base["num_attention_heads"]))
        if "use_sliding_window" not in base:  # a llama/mistral base: Mistral's window, if any, on every layer
            window = base.get("sliding_window")
            out["use_sliding_window"] = bool(window)
            out["sliding_window"] = window
            out["max_window_layers"] = 0
        if output.shared_block:
            out["shared_expert_intermediate_size"] = shared_width if shared_width is not None else intermediate
        if output.qkv_bias:
            out["qkv_bias"] = True
    if output.untie:
        out["tie_word_embeddings"] = False
    out.setdefault("output_router_logits", False)
    # transformers < 4.56 reads only torch_dtype, later ones read both; writing one key keeps it unambiguous
    out["torch_dtype"] = dtype
    return out


def output_of(config: dict) -> Output:
    """The output architecture a merged folder's config.json describes (KeyError if it is not one of ours)."""
    return next(o for o in OUTPUTS.values() if o.model_type == config.get("model_type"))


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
