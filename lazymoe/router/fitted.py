"""The fitted gate modes (``centroid``, ``classifier``): routers fitted layer by layer on the MLP inputs of the
MoE being built. The regression maths first, then the driver that streams the MoE (see ``router/gates.py``).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io.safetensors import read_tensor
from ..lazy import no_grad, torch
from ..moe import arch
from ..moe.transforms import expert_weight
from .block import constant_shared_gate, moe_mlp, shared_mlp
from .device import pick_device
from .prompts import DEFAULT_CONTINUATION_TOKENS, PromptSet, continue_prompts, prompt_set, real_tokens
from .streamed import LayerStack

_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0)  # L2 strengths tried by cross-validation (per-token mean loss scale)
_MAX_FOLDS = 5  # prompt j of every expert is held out in fold j % 5


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


@no_grad
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
    config's prompts and the base's continuations (``router.written`` passes text the experts wrote);
    ``fit_mode`` (default: the config's gate mode) is ``centroid`` or ``classifier``.
    """
    if upstream not in ("moe", "base"):
        raise ValueError(f"upstream must be 'moe' or 'base', got {upstream!r}")
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
    stack = LayerStack(plan.base.folder, prompts.seqs, base_tensor(arch.EMBED), dev)
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
            gate = torch.from_numpy(constant_shared_gate(1, x.shape[-1])[0, 0]).to(dev)
            out = out + shared_mlp(x, gate, experts[E], stack.act)
        stack.add_mlp_output(out)
        del experts
    return torch.stack(rows)  # (L, E, H)


def load_router_model(folder, *, device: torch.device, dtype: torch.dtype | None = None):
    """The whole base, loaded straight onto ``device``: a 7B base in bfloat16 (14.5 GB) fits a T4's memory
    but not a free Colab's 12.7 GB of RAM, so it must never be staged on the CPU first."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if dtype is None else dtype
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map={"": str(device)})
    return model.eval()
