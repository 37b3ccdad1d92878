"""Routers from text the experts write, and router-only training on the MoE's own LM loss.

Two gate modes, both fitted on exactly the experts that are written (``transforms.expert_weight``):

* ``expert_classifier``: each expert continues its own positive prompts (Self-MoE: an expert fine-tuned
  on a domain continues even a one-word prompt such as "code" inside its domain, where the base would
  continue it anywhere), plus any ``calibration_text`` the user gives for it; the ``classifier`` mode's
  per-layer softmax regression is then fitted on every token of that text, labelled with its writer.
* ``trained``: starts from ``expert_classifier`` and trains only the router weights (BTX's router stage)
  to minimise the MoE's own next-token cross-entropy on the same text, with top-k routing exactly as the
  merged model runs it and a small load-balance term. The loss is computed from the logits; the
  router's auxiliary loss never enters the LM term. The MoE is run **one layer at a time** (weights read
  just before a layer runs, recomputed in the backward pass by activation checkpointing), so memory is
  one layer's base and expert weights plus the per-layer activations of the calibration tokens: a small
  GPU, or a CPU for small models.

Everything is deterministic for a given config and seed: sampling uses a forked, seeded generator, and
training is full-batch with no randomness.
"""

from __future__ import annotations

import logging
import math

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io.safetensors import read_tensor
from ..lazy import no_grad, torch
from ..moe import arch
from ..moe.transforms import expert_weight
from ..tokens import router_token_ids
from .block import moe_mlp
from .fitted import fitted_gates, load_router_model
from .cost import SAMPLES_PER_PROMPT, TRAIN_STEPS, WRITTEN_TOKENS, calibration_tokens, fit_estimate  # noqa: F401
from .prompts import PromptSet, real_tokens
from .streamed import LayerStack

logger = logging.getLogger(__name__)

#: router-only training: full-batch Adam steps, step size (relative to each layer's router scale),
#: load-balance weight (BTX uses 0.01)
TRAIN_LR = 0.02
BALANCE = 0.01


# ------------------------------------------------------------------------------------ calibration text


@no_grad
def expert_written(config, tokenizer, *, folder_of, device: torch.device, dtype: torch.dtype, seed: int,
                   new_tokens: int = WRITTEN_TOKENS, samples: int = SAMPLES_PER_PROMPT, progress: bool = True):
    """The calibration set: each expert's continuations of its own prompts, plus its ``calibration_text``.

    ``folder_of(ref)`` is the local folder of a model. Experts are loaded one at a time, straight onto
    ``device``. Returns a ``gates.PromptSet`` whose positives are the written texts (prompt + continuation;
    the k-th prompt's samples share cross-validation fold k) and whose negatives are the config's negative
    prompts.
    """
    chat = bool(config.router_chat_template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    seqs, expert, positive, index = [], [], [], []
    devices = [device.index or 0] if device.type == "cuda" else []
    for e, spec in enumerate(tqdm(config.experts, desc="Router: experts writing calibration text",
                                  disable=not progress)):
        prompts = [router_token_ids(tokenizer, p, chat_template=chat) for p in spec.positive_prompts]
        written: list[list[int]] = []
        if new_tokens and prompts:
            model = load_router_model(folder_of(spec.source_model), device=device, dtype=dtype)
            try:
                width = max(len(p) for p in prompts)
                ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(samples)])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(samples)])
                with torch.random.fork_rng(devices=devices):  # seeded, the caller's random state untouched
                    torch.manual_seed((seed * 1_000_003 + e) % 2**63)
                    gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                                         top_k=0, pad_token_id=pad)
                for row_index, row in enumerate(gen[:, width:].tolist()):
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                    written.append(prompts[row_index // samples] + row)
            finally:
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        else:
            written = [p for p in prompts for _ in range(samples)]
        for j, seq in enumerate(written):
            seqs.append(seq)
            expert.append(e)
            positive.append(True)
            index.append(j // samples)
        for j, text in enumerate(spec.calibration_texts()):  # the user's own text: a fold of its own each
            seqs.append(list(tokenizer(text)["input_ids"]))
            expert.append(e)
            positive.append(True)
            index.append(len(prompts) + j)
        for prompt in spec.negative_prompts:
            seqs.append(router_token_ids(tokenizer, prompt, chat_template=chat))
            expert.append(e)
            positive.append(False)
            index.append(0)
    return PromptSet(seqs, torch.tensor(expert), torch.tensor(positive), torch.tensor(index))


# ------------------------------------------------------------------------------------ router-only training


class StreamedMoE:
    """The MoE's forward pass as a function of its router weights, one layer of weights in memory.

    ``get(name)`` returns a base tensor (float32, on the device); ``experts(layer)`` returns the layer's
    experts' (gate_proj, up_proj, down_proj) exactly as written. Both are called inside the checkpointed
    layer function, so the backward pass reads each layer again instead of keeping it.
    """

    def __init__(self, config_folder, seqs: list[list[int]], get, experts, *, k: int, device: torch.device,
                 num_layers: int):
        self.stack = LayerStack(config_folder, seqs, get("model.embed_tokens.weight"), device)
        self.get, self.experts, self.k, self.num_layers = get, experts, k, num_layers

    def _layer(self, layer: int, h: torch.Tensor, W: torch.Tensor):
        from torch.func import functional_call


        s, mod, prefix = self.stack, self.stack.inner.layers[layer], f"model.layers.{layer}"

        def call(name: str, *args, **kwargs):
            sub = getattr(mod, name)
            params = {n: self.get(f"{prefix}.{name}.{n}") for n, _ in sub.named_parameters()}
            return functional_call(sub, params, args, kwargs)

        attn = call("self_attn", hidden_states=call("input_layernorm", h), position_embeddings=s.rope,
                    attention_mask=s.causal, position_ids=s.pos)
        h = h + (attn[0] if isinstance(attn, tuple) else attn)
        x = call("post_attention_layernorm", h)
        logits = x @ W.T
        return h + moe_mlp(x, logits, self.experts(layer), self.k, s.act), logits

    def forward(self, W: torch.Tensor, *, checkpoint: bool = True):
        """Final hidden states after the last layer's norm, and the router logits of every layer."""
        from torch.utils.checkpoint import checkpoint as ckpt

        h, router = self.stack.h, []
        for layer in range(self.num_layers):
            if checkpoint:
                h, logits = ckpt(self._layer, layer, h, W[layer], use_reentrant=False)
            else:
                h, logits = self._layer(layer, h, W[layer])
            router.append(logits)
        weight = self.get("model.norm.weight")
        eps = float(self.stack.cfg.get("rms_norm_eps", 1e-6))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
        return h, router


def lm_and_balance(moe: StreamedMoE, W: torch.Tensor, keep: torch.Tensor, lm_head: torch.Tensor, *,
                   checkpoint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss, load-balance loss) of the MoE with routers ``W`` on the calibration tokens.

    LM loss: the mean next-token cross-entropy computed from the logits, over every target token in
    ``keep`` (B, T), with nothing of the router added. Load balance: Switch/Mixtral's
    E * sum_e f_e * P_e per layer (f_e: share of top-k slots given to e; P_e: mean router probability),
    averaged over layers; 1.0 when balanced.
    """
    h, router = moe.forward(W, checkpoint=checkpoint)
    ids = moe.stack.ids.to(h.device)
    target_keep = keep[:, 1:]
    logits = h[:, :-1][target_keep] @ lm_head.T
    lm = torch.nn.functional.cross_entropy(logits, ids[:, 1:][target_keep])
    E = W.shape[1]
    balance = []
    for z in router:
        z = z[keep]
        probs = z.softmax(-1)
        chosen = torch.nn.functional.one_hot(probs.topk(moe.k, -1).indices, E).sum(1).float()
        balance.append(E * (chosen.mean(0) / moe.k * probs.mean(0)).sum())
    return lm, torch.stack(balance).mean()


def train_routers(moe: StreamedMoE, W0: torch.Tensor, keep: torch.Tensor, lm_head: torch.Tensor, *,
                  steps: int = TRAIN_STEPS, lr: float = TRAIN_LR, balance: float = BALANCE,
                  progress: bool = True) -> tuple[torch.Tensor, list[float]]:
    """Adam on the router weights only, full batch, ``steps`` steps; returns the routers and the LM losses.

    Each layer's step size is ``lr`` times that layer's mean absolute router weight, so the schedule does
    not depend on the scale the initial fit chose. The routers with the lowest training objective seen are
    returned (the first step can only make things worse if the init is already good).
    """
    scale = W0.abs().mean(dim=(1, 2), keepdim=True).clamp(min=1e-12)
    delta = torch.zeros_like(W0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr, betas=(0.9, 0.99))
    best, best_loss, history = W0.clone(), math.inf, []
    bar = tqdm(range(steps + 1), desc="Router: training on the MoE's LM loss", disable=not progress)
    for step in bar:
        W = W0 + delta * scale
        lm, bal = lm_and_balance(moe, W, keep, lm_head)
        total = lm + balance * bal
        history.append(float(lm.detach()))
        if float(total.detach()) < best_loss:
            best_loss, best = float(total.detach()), W.detach().clone()
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        bar.set_postfix(lm=f"{history[-1]:.3f}", refresh=False)
    return best, history


def written_gates(plan, tokenizer, *, device: torch.device, progress: bool = True, resolve=None,
                  folder_of=None) -> torch.Tensor:
    """Gate rows for ``expert_classifier`` and ``trained`` (see the module docstring). (L, E, H) float32."""
    config = plan.config
    resolve = resolve or (lambda ref, name: plan.models[ref].tensors[name])
    folder_of = folder_of or (lambda ref: plan.models[ref].folder)
    new_tokens = WRITTEN_TOKENS if config.router_continuation_tokens is None else config.router_continuation_tokens
    if new_tokens < 0:
        raise ConfigError(f"router_continuation_tokens is {new_tokens}; use 0 (prompts only) or a positive count.")
    stored = getattr(torch, plan.dtype)
    calibration = expert_written(config, tokenizer, folder_of=folder_of, device=device, dtype=stored,
                                 seed=config.seed or 0, new_tokens=new_tokens, progress=progress)
    W = fitted_gates(plan, tokenizer, device=str(device), progress=progress, resolve=resolve,
                     prompts=calibration, fit_mode="classifier")
    if config.gate_mode == "expert_classifier":
        return W

    def get(name: str) -> torch.Tensor:
        return read_tensor(resolve(config.base_model, name)).to(device, torch.float32)

    def experts(layer: int):
        return [tuple(expert_weight(config, e, name, read_tensor(resolve(spec.source_model, name)),
                                    is_residual=part == "down_proj", dtype=stored).to(device, torch.float32)
                      for part in arch.MLP_PARTS for name in [arch.mlp_name(layer, part)])
                for e, spec in enumerate(config.experts)]

    positives = [s for s, p in zip(calibration.seqs, calibration.positive.tolist()) if p]
    moe = StreamedMoE(plan.base.folder, positives, get, experts, k=config.experts_per_token, device=device,
                      num_layers=plan.num_layers)
    keep = real_tokens(moe.stack.mask, moe.stack.ids, tokenizer.bos_token_id).to(device)
    lm_head = get("lm_head.weight") if "lm_head.weight" in plan.base.tensors else get("model.embed_tokens.weight")
    trained, history = train_routers(moe, W.to(device), keep, lm_head, steps=TRAIN_STEPS, lr=TRAIN_LR,
                                     balance=BALANCE, progress=progress)
    logger.info("Router training: LM loss on the calibration text %.4f -> %.4f", history[0], min(history))
    return trained.detach().float().cpu()


# ------------------------------------------------------------------------------------ what it costs

