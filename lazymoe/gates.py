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

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .arch import SHARED_GATE_CONSTANT
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


def hidden_gates(base, tokenizer, config: MoEConfig, *, device: torch.device, progress: bool = True,
                 dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The reference ``hidden``/``hidden_avg`` rows, from one layer-streamed pass of the base.

    Each expert's positive prompts form one left-padded batch and its negatives another, exactly as the
    reference batches them (padding changes ``hidden_avg``); every batch goes through a layer before the
    next layer is read, so the base's weights are read once and never held whole.
    """
    from .streamed import StreamedBase

    average = config.gate_mode == "hidden_avg"
    batches, owners = [], []
    for e, expert in enumerate(config.experts):
        for prompts, sign in ((expert.positive_prompts, 1.0), (expert.negative_prompts, -1.0)):
            if prompts:
                batches.append(tokenize_prompts(tokenizer, prompts))
                owners.append((e, sign))

    def reduce(h: torch.Tensor, _mask: torch.Tensor) -> torch.Tensor:
        h = h.float()
        per_prompt = h.mean(dim=1) if average else h[:, -1, :]  # mean over positions, padding included
        return per_prompt.mean(dim=0).cpu()

    states = StreamedBase(base, device=device, dtype=dtype).collect(batches, residual=reduce, progress=progress)
    rows = torch.zeros(len(states["residual"][0]), config.num_experts, states["residual"][0][0].shape[-1])
    for (e, sign), per_layer in zip(owners, states["residual"]):
        rows[:, e] += sign * torch.stack(per_layer)
    return _unit(rows)  # (L, E, H)


# ----------------------------------------------------------------------------------- fitted modes

FITTED_MODES = ("centroid", "classifier")
_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried by cross-validation (per-token mean loss scale)
_MAX_FOLDS = 5  # prompt j of every expert is held out in fold j % 5


def router_token_ids(tokenizer, prompt: str, *, chat_template: bool = False) -> list[int]:
    """The ids the MoE sees for ``prompt``: with the tokenizer's own BOS handling, or as a chat user turn."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "router_chat_template is true but the base model's tokenizer has no chat template; "
                "set router_chat_template: false or use a base whose tokenizer_config.json defines one."
            )
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # jinja2's SecurityError/TemplateError, or transformers' ValueError
            raise ConfigError(
                f"router_chat_template is true but the base model's chat template fails "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); set router_chat_template: false "
                "or use a base whose chat template renders."
            ) from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at its true position, and causal attention never sees the pads."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class PromptSet:
    """Every prompt the fitted modes read, as token ids, and whose it is."""

    seqs: list[list[int]]
    expert: torch.Tensor  # (S,) expert the prompt belongs to (or argues against, for negatives)
    positive: torch.Tensor  # (S,) bool
    index: torch.Tensor  # (S,) index among that expert's positive prompts: the cross-validation fold


def prompt_set(tokenizer, config: MoEConfig) -> PromptSet:
    chat = bool(config.router_chat_template)
    seqs, expert, positive, index = [], [], [], []
    for e, spec in enumerate(config.experts):
        for kind, prompts in ((True, spec.positive_prompts), (False, spec.negative_prompts)):
            for j, prompt in enumerate(prompts):
                seqs.append(router_token_ids(tokenizer, prompt, chat_template=chat))
                expert.append(e)
                positive.append(kind)
                index.append(j if kind else 0)
    return PromptSet(seqs, torch.tensor(expert), torch.tensor(positive), torch.tensor(index))


DEFAULT_CONTINUATION_TOKENS = 48


@torch.no_grad()
def continue_prompts(model, tokenizer, prompts: PromptSet, *, new_tokens: int, seed: int,
                     batch_size: int = 16) -> PromptSet:
    """Extend every positive prompt with ``new_tokens`` tokens sampled from ``model`` (the base).

    A router meets tokens deep inside texts of its expert's kind, with long contexts; five short prompts
    only show it their first few tokens. The base's own continuation of a prompt is such a text (for a chat
    template, it is the answer), and it costs no extra input from the user.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = list(prompts.seqs)
    todo = [i for i, positive in enumerate(prompts.positive.tolist()) if positive]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded, without disturbing the caller's random state
        torch.manual_seed(seed)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            width = max(len(prompts.seqs[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts.seqs[i])) + prompts.seqs[i] for i in chunk])
            mask = torch.tensor([[0] * (width - len(prompts.seqs[i])) + [1] * len(prompts.seqs[i]) for i in chunk])
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 do_sample=True, temperature=0.8, top_p=0.95, top_k=0, pad_token_id=pad)
            for row, i in zip(gen[:, width:].tolist(), chunk):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out[i] = prompts.seqs[i] + row
    return PromptSet(out, prompts.expert, prompts.positive, prompts.index)


def real_tokens(mask: torch.Tensor, ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(B, T) bool: real tokens, minus a leading BOS (the same state whatever the prompt, so it says nothing)."""
    keep = mask.bool().clone()
    if bos_id is not None:
        keep[:, 0] &= ids[:, 0] != bos_id
    return keep


def _balanced_weights(labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each expert's tokens weigh 1/E in total, however long its prompts are."""
    counts = torch.bincount(labels, minlength=num_experts).clamp(min=1).double()
    return 1.0 / (counts[labels] * num_experts)


def _loss_and_grad(W, X, y, w, Xn, yn, wn, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """P independent problems at once. W (P, E, H); token weights w (P, N) and wn (P, M); lam (P,).

    Each problem: weighted cross-entropy of the positives, -log(1 - p_e) of the negatives, L2 ``lam``.
    The gradient is written by hand: autograd's bookkeeping costs more than the maths at these sizes, and
    solving every (L2 strength, fold) problem of a layer in one batched L-BFGS run saves the Python loop.
    """
    z = torch.einsum("nh,peh->pne", X, W)
    rows = torch.arange(len(y))
    loss = (w * (torch.logsumexp(z, 2) - z[:, rows, y])).sum()
    dz = z.softmax(2)
    dz[:, rows, y] -= 1.0
    grad = torch.einsum("pne,nh->peh", dz * w[..., None], X)
    if Xn.shape[0]:
        zn = torch.einsum("mh,peh->pme", Xn, W)
        others = zn.scatter(2, yn[None, :, None].expand(len(W), -1, 1), float("-inf"))
        # -log(1 - p_e) = logsumexp(all) - logsumexp(all but e); its gradient is softmax(all) - softmax(others)
        loss = loss + (wn * (torch.logsumexp(zn, 2) - torch.logsumexp(others, 2))).sum()
        grad = grad + torch.einsum("pme,mh->peh", (zn.softmax(2) - others.softmax(2)) * wn[..., None], Xn)
    return loss + 0.5 * (lam * (W * W).sum((1, 2))).sum(), grad + lam[:, None, None] * W


def _lbfgs(loss_and_grad, param: torch.Tensor, *, max_iter: int = 200) -> torch.Tensor:
    param = param.detach().clone()
    opt = torch.optim.LBFGS([param], lr=1, max_iter=max_iter, tolerance_grad=1e-8, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        loss, grad = loss_and_grad(param)
        param.grad = grad
        return loss

    with torch.no_grad():
        opt.step(closure)
    return param


def _regressions(X, y, Xn, yn, num_experts: int, train: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """Solve one bias-free softmax regression per row of ``train`` (a (P, N) bool token mask) and ``lams``."""
    X, Xn = X.double(), Xn.double()
    w = torch.zeros(train.shape, dtype=torch.float64)
    for p in range(len(train)):  # class-balanced within each problem's own training tokens
        w[p, train[p]] = _balanced_weights(y[train[p]], num_experts)
    wn = (_balanced_weights(yn, num_experts) * 0.5).expand(len(train), -1) if Xn.shape[0] else \
        torch.zeros(len(train), 0, dtype=torch.float64)
    W0 = torch.zeros(len(train), num_experts, X.shape[1], dtype=torch.float64)
    return _lbfgs(lambda W: _loss_and_grad(W, X, y, w, Xn, yn, wn, lams.double()), W0)


def softmax_regression(X, y, Xn, yn, num_experts: int, lam: float) -> torch.Tensor:
    """Bias-free multinomial logistic regression (float64), negatives as counter-examples, L2 ``lam``."""
    train = torch.ones(1, len(y), dtype=torch.bool)
    return _regressions(X, y, Xn, yn, num_experts, train, torch.tensor([lam]))[0]


def fit_classifier(X, y, groups, Xn, yn, num_experts: int, *, lambdas=_LAMBDAS) -> tuple[torch.Tensor, float]:
    """One layer's router as a calibrated classifier; returns (E, H) float32 rows and the chosen L2 strength.

    The L2 strength is picked by leave-one-prompt-out cross-validation (fold k holds out every expert's
    k-th prompt), scored by the balanced cross-entropy of the held-out tokens.
    """
    scale = torch.cat([X, Xn]).double().pow(2).mean(0).sqrt().clamp(min=1e-6)  # per-dimension RMS
    Xs, Xns = X.double() / scale, Xn.double() / scale
    prompts_each = [len(set(groups[y == e].tolist())) for e in range(num_experts)]
    folds = int(groups.max()) + 1 if len(lambdas) > 1 and min(prompts_each) >= 2 else 0
    if not folds:
        lambdas = (sorted(lambdas)[len(lambdas) // 2],)
    masks = [torch.ones(len(y), dtype=torch.bool)] + [groups != k for k in range(folds)]
    train = torch.stack([m for _ in lambdas for m in masks])
    lams = torch.tensor([lam for lam in lambdas for _ in masks], dtype=torch.float64)
    W = _regressions(Xs, y, Xns, yn, num_experts, train, lams).view(len(lambdas), len(masks), num_experts, -1)
    scores = []
    for i in range(len(lambdas)):
        total = 0.0
        for k in range(folds):
            test = ~masks[k + 1]
            z = Xs[test] @ W[i, k + 1].T
            ce = torch.logsumexp(z, 1) - z.gather(1, y[test][:, None]).squeeze(1)
            total += float((_balanced_weights(y[test], num_experts) * ce).sum())
        scores.append(total)
    best = min(range(len(lambdas)), key=scores.__getitem__)
    return (W[best, 0] / scale).float(), float(lambdas[best])


def calibrate_scale(W: torch.Tensor, X, y, num_experts: int) -> float:
    """The logit scale s minimising the balanced cross-entropy of softmax(s * X W^T) on the prompt tokens."""
    z = X.double() @ W.double().T
    z = z / z.std().clamp(min=1e-12)
    w = _balanced_weights(y, num_experts)
    rows = torch.arange(len(y))

    def loss_and_grad(s):  # convex in s; a weak prior keeps it finite when the prompts are separable
        zs = z * s
        loss = (w * (torch.logsumexp(zs, 1) - zs[rows, y])).sum() + 1e-3 * (s * s).sum()
        grad = (w * ((zs.softmax(1) * z).sum(1) - z[rows, y])).sum() + 2e-3 * s
        return loss, grad.reshape(1)

    s = _lbfgs(loss_and_grad, torch.ones(1, dtype=torch.float64), max_iter=50)
    return float(s.clamp(min=0.0)) / float((X.double() @ W.double().T).std().clamp(min=1e-12))


def fit_centroid(X, y, Xn, yn, num_experts: int) -> torch.Tensor:
    """Centred class means (minus centred negative means), at a calibrated logit scale. (E, H) float32."""
    means = torch.stack([X[y == e].double().mean(0) for e in range(num_experts)])
    centre = means.mean(0)
    W = means - centre
    for e in range(num_experts):
        if bool((yn == e).any()):
            W[e] -= Xn[yn == e].double().mean(0) - centre
    return (W * calibrate_scale(W, X, y, num_experts)).float()


def fit_layer(mode: str, X, y, groups, Xn, yn, num_experts: int) -> torch.Tensor:
    if mode == "centroid":
        return fit_centroid(X, y, Xn, yn, num_experts)
    return fit_classifier(X, y, groups, Xn, yn, num_experts)[0]


@torch.no_grad()
def fitted_gates(plan, tokenizer, *, device: str | None = None, progress: bool = True,
                 resolve=None, upstream: str = "moe", prompts: PromptSet | None = None,
                 fit_mode: str | None = None) -> torch.Tensor:
    """Fit every layer's router, first to last, on the router inputs the MoE itself produces.

    The prompts run through the MoE one layer at a time (only one layer's weights in memory): layer l's
    router is fitted on its real input, then the MoE block of layer l -- the experts' MLPs mixed by that
    router -- produces the input of layer l + 1 (``residual_scale`` applied; ``noise_scale``, zero-mean and
    small, is not). ``upstream="base"`` runs the base's own MLPs instead: it needs no expert weights, for a
    merge that fetches experts one at a time to save disk, at some cost in accuracy (4 points of top-1
    routing, 83% -> 79%, on an earlier benchmark world, prompts only). ``resolve(ref, name) -> TensorInfo``
    locates tensors (default: the plan's, which must then be local files). ``prompts`` replaces the
    config's prompts and the base's continuations (``router_train`` passes text the experts wrote);
    ``fit_mode`` (default: the config's gate mode) is ``centroid`` or ``classifier``.
    """
    if upstream not in ("moe", "base"):
        raise ValueError(f"upstream must be 'moe' or 'base', got {upstream!r}")
    from . import arch
    from .routing import moe_mlp, shared_mlp
    from .transforms import expert_weight
    from .streamed import LayerStack

    config = plan.config
    resolve = resolve or (lambda ref, name: plan.models[ref].tensors[name])
    dev = pick_device(device)
    base_ref = config.base_model

    def base_tensor(name: str) -> torch.Tensor:
        return read_tensor(resolve(base_ref, name)).to(dev, torch.float32)

    fit_mode = fit_mode or config.gate_mode
    new_tokens = config.router_continuation_tokens
    new_tokens = DEFAULT_CONTINUATION_TOKENS if new_tokens is None else new_tokens
    if prompts is not None:
        new_tokens = 0
    else:
        prompts = prompt_set(tokenizer, config)
    if new_tokens:
        model = load_router_model(plan.base.folder, device=dev, dtype=getattr(torch, plan.dtype))
        try:
            with tqdm(total=1, desc="Router: continuing the prompts", disable=not progress) as bar:
                prompts = continue_prompts(model, tokenizer, prompts, new_tokens=new_tokens, seed=config.seed or 0)
                bar.update()
        finally:
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    E, k = config.num_experts, config.experts_per_token
    stack = LayerStack(plan.base.folder, prompts.seqs, base_tensor("model.embed_tokens.weight"), dev)
    keep = real_tokens(stack.mask, stack.ids, tokenizer.bos_token_id).to(dev)
    owner = torch.arange(len(prompts.seqs), device=dev)[:, None].expand_as(keep)[keep].cpu()
    labels, is_pos = prompts.expert[owner], prompts.positive[owner]
    groups = prompts.index[owner] % _MAX_FOLDS
    for e in range(E):
        if not bool((is_pos & (labels == e)).any()):
            raise ConfigError(f"experts[{e}]'s positive prompts have no token besides BOS; give it a few words.")
    rows = []
    for layer in tqdm(range(plan.num_layers), desc=f"Router: fitting {fit_mode}", disable=not progress):
        x = stack.mlp_input(layer, base_tensor)
        feats = x[keep].cpu()
        W = fit_layer(fit_mode, feats[is_pos], labels[is_pos], groups[is_pos], feats[~is_pos],
                      labels[~is_pos], E)
        rows.append(W)
        if layer + 1 == plan.num_layers:
            continue  # nothing runs after the last layer; `continue`, not `break`, lets the bar reach 100%
        if upstream == "base":
            mlp = [base_tensor(arch.mlp_name(layer, part)) for part in arch.MLP_PARTS]
            stack.add_mlp_output((stack.act(x @ mlp[0].T) * (x @ mlp[1].T)) @ mlp[2].T)
            continue
        experts = []
        stored = getattr(torch, plan.dtype)
        specs = config.experts + ([config.shared_expert] if config.shared_expert else [])
        for e, spec in enumerate(specs):
            # exactly the weights the writer stores (noise, residual scale, dtype), as float32
            g, u, d = (expert_weight(config, e, name, read_tensor(resolve(spec.source_model, name)),
                                     is_residual=part == "down_proj", dtype=stored).to(dev, torch.float32)
                       for part in arch.MLP_PARTS for name in [arch.mlp_name(layer, part)])
            experts.append((g, u, d))
        out = moe_mlp(x, x @ W.to(dev).T, experts[:E], k, stack.act, normalise=plan.output.norm_topk_prob)
        if len(experts) > E:  # the shared expert, behind its constant gate (sigmoid = 1/2)
            gate = constant_shared_gate(1, x.shape[-1])[0, 0].to(dev)
            out = out + shared_mlp(x, gate, experts[E], stack.act)
        stack.add_mlp_output(out)
        del experts
    return torch.stack(rows)  # (L, E, H)


def load_router_model(folder, *, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The whole base, loaded straight onto ``device``: a 7B base in bfloat16 (14.5 GB) fits a T4's memory
    but not a free Colab's 12.7 GB of RAM, so it must never be staged on the CPU first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map={"": str(device)})
    return model.eval()


def compute_gates(plan, tokenizer, *, device: str | None = None, progress: bool = True, resolve=None,
                  upstream: str = "moe", folder_of=None) -> torch.Tensor:
    """Gate rows for every layer and expert, as float32 on the CPU: (L, plan.gate_rows, H), the routed experts'
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
    from .router_train import WRITTEN_MODES, written_gates  # router_train builds on this module

    spec = config.shared_expert
    # the shared expert's gate comes from its prompts as one more row of the same computation (mergekit's
    # way); without prompts, or in the fitted modes (which fit the routed experts only), it is a constant
    prompted = (plan.gate_rows > E and spec is not None and bool(spec.positive_prompts)
                and mode not in FITTED_MODES + WRITTEN_MODES)
    rows_config = config.model_copy(update={"experts": config.experts + [spec]}) if prompted else config
    R = rows_config.num_experts
    if mode in ("random", "uniform_random"):
        assert config.seed is not None, "compute_gates needs a config with a pinned seed (MoEConfig.with_seed)"
        gates = random_gates(L, R, H, mode=mode, seed=config.seed)
    elif mode == "cheap_embed":
        gates = cheap_embed_gates(read_tensor(base.tensors["model.embed_tokens.weight"]), tokenizer, rows_config, L)
    elif mode in HIDDEN_MODES:
        gates = hidden_gates(base, tokenizer, rows_config, device=pick_device(device), progress=progress)
    elif mode in WRITTEN_MODES and upstream == "base":
        gates = fitted_gates(plan, tokenizer, device=device, progress=progress, resolve=resolve, upstream=upstream,
                             fit_mode="classifier")
    elif mode in WRITTEN_MODES:
        gates = written_gates(plan, tokenizer, device=pick_device(device), progress=progress, resolve=resolve,
                              folder_of=folder_of)
    elif mode in FITTED_MODES:
        gates = fitted_gates(plan, tokenizer, device=device, progress=progress, resolve=resolve, upstream=upstream)
    else:  # config validation makes this unreachable; keep the message for direct API misuse
        raise ConfigError(f"Unknown gate_mode {mode!r}.")
    if plan.gate_rows > R:
        gates = torch.cat([gates, constant_shared_gate(L, H)], dim=1)
    assert gates.shape == (L, plan.gate_rows, H), gates.shape
    return gates


def constant_shared_gate(num_layers: int, hidden: int) -> torch.Tensor:
    """(L, 1, H): the shared gate whose sigmoid is 1/2 for every token (to float rounding; see arch)."""
    return torch.full((num_layers, 1, hidden), SHARED_GATE_CONSTANT)


def degenerate_layers(gates: torch.Tensor, threshold: float | None = None) -> list[int]:
    """Layers whose router can barely tell some experts apart (see ``routing.gate_condition``).

    The measure ignores what all rows share, which a softmax router ignores too, so the centred rows of
    the fitted modes are not flagged; for the reference modes it flags the layers mergekit-moe flags.
    """
    from .routing import SINGULAR_CONDITION, gate_condition

    limit = SINGULAR_CONDITION if threshold is None else threshold
    return [layer for layer in range(gates.shape[0]) if gate_condition(gates[layer]) > limit]
