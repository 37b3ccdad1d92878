"""The base model's forward pass, one decoder layer in memory at a time.

Router initialisation needs the base's hidden states, and the reference tool loads the whole base for
that: 14.5 GB in bfloat16 for a 7B model, more than a free Colab has in RAM (12.7 GB). Here the model is
built on the meta device and each decoder layer gets its weights from safetensors just before it runs
and drops them right after, so memory is one layer (~0.45 GB for 7B) plus activations, on CPU or GPU.

Every prompt batch passes through a layer before the next layer is loaded, so the weights are read once
however many batches there are. The computation is transformers' own: its embedding, rotary, mask and
decoder-layer code run unchanged, so results equal a full-model run (tests compare them).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..io.safetensors import read_tensor
from ..io.sources import ModelInfo
from ..lazy import no_grad, torch
from ..moe import arch
from .prompts import right_padded

#: a reduction of one layer's input, (B, T, H) and the attention mask (B, T) -> anything
Reducer = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


def _meta_model(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)


def _causal_mask(inner, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """transformers' own mask for this model (sliding-window for Mistral bases, as MistralModel picks it);
    its keyword names changed across versions, so ask."""
    from transformers import masking_utils

    create_causal_mask = masking_utils.create_causal_mask
    # Qwen2-MoE configs say "no window" with sliding_window 0, Qwen2/3 with None
    if getattr(inner.config, "sliding_window", None) and getattr(inner.config, "use_sliding_window", True):
        create_causal_mask = masking_utils.create_sliding_window_causal_mask
    params = inspect.signature(create_causal_mask).parameters
    kwargs = {"config": inner.config, "inputs_embeds": embeds, "attention_mask": attention_mask}
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids
    return create_causal_mask(**kwargs)


class StreamedBase:
    """Run batches through the base model's first ``num_layers`` decoder layers, layer by layer."""

    def __init__(self, base: ModelInfo, *, device: torch.device, dtype: torch.dtype | None = None):
        from transformers import AutoConfig

        self.base = base
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if dtype is None else dtype  # None: bfloat16
        config = AutoConfig.from_pretrained(str(base.folder))
        self.inner = _meta_model(config, dtype).model
        self.num_layers = int(config.num_hidden_layers)
        # the rotary table is a computed buffer: build it for real on the target device
        rotary_cls = type(self.inner.rotary_emb)
        self.rotary = rotary_cls(config=self.inner.config).to(self.device)

    def _load_layer(self, index: int) -> torch.nn.Module:
        layer = self.inner.layers[index]
        prefix = arch.layer_prefix(index)
        # names first, then each tensor: ``base.tensors`` may locate (fetch) a tensor when it is looked up
        state = {
            name[len(prefix):]: read_tensor(self.base.tensors[name]).to(self.device, self.dtype)
            for name in self.base.tensors
            if name.startswith(prefix) and not arch.IGNORED_RE.match(name)
        }
        # assign: the layer takes these tensors as its weights (no second copy of the layer in memory)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval()

    @no_grad
    def collect(
        self,
        batches: list[dict[str, torch.Tensor]],
        *,
        residual: Reducer | None = None,
        mlp_input: Reducer | None = None,
        progress: bool = True,
    ) -> dict[str, list[list[torch.Tensor]]]:
        """Per batch and layer, reductions of what the base computes, without holding the model.

        ``residual``: applied to the residual stream entering each layer (``hidden_states[l]`` of a full
        run, what the reference router init reads). ``mlp_input``: applied to each layer's MLP input (the
        post-attention, post-norm state the MoE router sees at inference). ``batches`` hold ``input_ids``
        and ``attention_mask`` (B, T), positions implicit as in ``model(**batch)``. Returns
        ``{"residual": out[batch][layer], "mlp_input": ...}`` for what was asked.
        """
        if residual is None and mlp_input is None:
            raise ValueError("collect() needs residual= or mlp_input=")
        # the residual stream entering the last layer needs layers 0..L-2 only; MLP inputs need them all
        layers = self.num_layers if mlp_input is not None else self.num_layers - 1
        embed = read_tensor(self.base.tensors[arch.EMBED]).to(self.device, self.dtype)
        states, extras = [], []
        out: dict[str, list[list[torch.Tensor]]] = {}
        if residual is not None:
            out["residual"] = [[] for _ in batches]
        if mlp_input is not None:
            out["mlp_input"] = [[] for _ in batches]
        for b, batch in enumerate(batches):
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            h = torch.nn.functional.embedding(ids, embed)
            pos = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            extras.append((mask, _causal_mask(self.inner, h, mask, pos), pos, self.rotary(h, pos)))
            states.append(h)
        del embed
        current: list[torch.Tensor | None] = [None]

        def grab(_module, args):
            current[0] = args[0]

        for index in tqdm(range(layers), desc="Router: base layers", disable=not progress or layers < 3):
            layer = self._load_layer(index)
            hook = layer.mlp.register_forward_pre_hook(grab) if mlp_input is not None else None
            for b, (mask, causal, pos, rope) in enumerate(extras):
                if residual is not None:
                    out["residual"][b].append(residual(states[b], mask))
                h = layer(states[b], attention_mask=causal, position_ids=pos, position_embeddings=rope)
                states[b] = h[0] if isinstance(h, tuple) else h  # transformers 4.x returns a tuple
                if mlp_input is not None:
                    out["mlp_input"][b].append(mlp_input(current[0], mask))
            if hook is not None:
                hook.remove()
            layer.to("meta")  # frees this layer's weights before the next one is read
        if residual is not None and layers == self.num_layers - 1:
            for b, (mask, *_rest) in enumerate(extras):
                out["residual"][b].append(residual(states[b], mask))
        return out


class LayerStack:
    """Token sequences through a decoder's attention half, layer by layer, with the MLP half left to the
    caller: what the fitted gate modes and the routing picture need, since they run their own MoE block
    (routers being fitted, or read from a merged folder) on each layer's MLP input.

    The attention half is transformers' own (norms, rotary, mask, attention) built on the meta device;
    ``mlp_input(layer, get)`` loads that layer's attention and norm weights through ``get(name)`` (float32,
    the dense family's names, which every MoE output keeps), runs them and drops them, so one layer is in memory
    at a time.
    Sequences are right-padded: every real token sits at its true position and, attention being causal,
    never sees a pad.
    """

    def __init__(self, config_folder, seqs: list[list[int]], embed: torch.Tensor, device: torch.device):
        from transformers import AutoConfig
        from transformers.activations import ACT2FN

        self.cfg = json.loads((Path(config_folder) / "config.json").read_text())
        self.device = torch.device(device)
        self.act = ACT2FN[self.cfg.get("hidden_act", "silu")]
        self.ids, self.mask = right_padded(seqs, pad_id=seqs[0][0])
        self.inner = _meta_model(AutoConfig.from_pretrained(str(config_folder)), torch.float32).model
        self.h = embed.to(self.device, torch.float32)[self.ids.to(self.device)]
        self.pos = torch.arange(self.ids.shape[1], device=self.device).unsqueeze(0)
        rotary = type(self.inner.rotary_emb)(config=self.inner.config).to(self.device)
        self.rope = rotary(self.h, self.pos)
        self.causal = _causal_mask(self.inner, self.h, self.mask.to(self.device), self.pos)

    def _load(self, module: torch.nn.Module, prefix: str, get) -> torch.nn.Module:
        names = list(module.state_dict())
        module.load_state_dict({n: get(f"{prefix}.{n}") for n in names}, strict=True, assign=True)
        return module

    @no_grad
    def mlp_input(self, layer: int, get) -> torch.Tensor:
        """Add layer ``layer``'s attention to the residual stream; return what its MLP (and router) reads."""
        mod, p = self.inner.layers[layer], arch.layer_prefix(layer).rstrip(".")
        parts = [self._load(getattr(mod, n), f"{p}.{n}", get)
                 for n in ("input_layernorm", "self_attn", "post_attention_layernorm")]
        norm_in, attn, norm_post = parts
        out = attn(hidden_states=norm_in(self.h), position_embeddings=self.rope, attention_mask=self.causal,
                   position_ids=self.pos)
        self.h = self.h + (out[0] if isinstance(out, tuple) else out)
        x = norm_post(self.h)
        for part in parts:
            part.to("meta")
        return x

    def add_mlp_output(self, out: torch.Tensor) -> None:
        self.h = self.h + out

    @no_grad
    def final_norm(self, get) -> torch.Tensor:
        """The residual stream after the model's final norm: what ``lm_head`` reads (after the last layer)."""
        norm = self._load(self.inner.norm, "model.norm", get)
        out = norm(self.h)
        norm.to("meta")
        return out
