"""Each gate mode's maths against an independent computation on tiny real checkpoints.

Reference modes are checked against what mergekit-moe computes, written out differently: transformers'
full model with hooks for ``hidden*``, an explicit one-hot @ embedding product for ``cheap_embed``.
Fitted modes are checked against transformers' own forward (router inputs), autograd (the classifier's
optimum and gradient) and the merged MoE itself (the routers are fitted on what the MoE computes).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import moe_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe.router import fitted, gates, reference
from lazymoe.router import prompts as router_prompts
from lazymoe.config import load_config
from lazymoe.errors import ConfigError
from lazymoe.pipeline.merge import make_plan


def _plan(tiny_world, gate_mode, **overrides):
    experts = [tiny_world["chat"], tiny_world["code"], tiny_world["math"]]
    cfg = moe_config(tiny_world["base"], experts, gate_mode=gate_mode, seed=1234, **overrides)
    return make_plan(cfg, progress=False)


def _tok(tiny_world):
    return AutoTokenizer.from_pretrained(str(tiny_world["base"]))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------- reference modes


def test_random_modes_are_seeded_and_have_the_reference_distributions():
    a = reference.random_gates(4, 8, 512, mode="random", seed=7)
    assert np.array_equal(a, reference.random_gates(4, 8, 512, mode="random", seed=7))
    assert not np.array_equal(a, reference.random_gates(4, 8, 512, mode="random", seed=8))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1.0) < 0.02  # N(0, 1), not normalised
    u = reference.random_gates(4, 8, 512, mode="uniform_random", seed=7)
    bound = 1 / math.sqrt(512)
    assert float(np.abs(u).max()) <= bound
    assert abs(float(u.std()) - bound / math.sqrt(3)) < 0.02 * bound  # U(-b, b) has std b / sqrt(3)


def test_cheap_embed_is_the_one_hot_embedding_sum(tiny_world):
    plan, tok = _plan(tiny_world, "cheap_embed"), _tok(tiny_world)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.float32)
    embed = base.get_input_embeddings().weight
    V = embed.shape[0]

    def vec(prompts):  # mergekit: BOS as text, no special tokens, one-hot @ embedding, masked sum, unit length
        total = torch.zeros(embed.shape[1])
        for p in prompts:
            ids = torch.tensor(tok(tok.bos_token + p, add_special_tokens=False)["input_ids"])
            total += (torch.nn.functional.one_hot(ids, V).float() @ embed.detach()).sum(0)
        return _unit(total)

    got = torch.from_numpy(gates.compute_gates(plan, tok, progress=False))
    for e, expert in enumerate(plan.config.experts):
        want = vec(expert.positive_prompts)
        if expert.negative_prompts:
            want = _unit(want - vec(expert.negative_prompts))
        for layer in range(plan.num_layers):  # the same vector in every layer
            assert torch.allclose(got[layer, e], want, atol=1e-5), (layer, e)


@pytest.mark.parametrize("mode", ["hidden", "hidden_last", "hidden_avg"])
def test_hidden_modes_are_the_residual_stream_entering_each_layer(tiny_world, mode):
    # Independent of hidden_states indexing: forward pre-hooks on the decoder layers see the residual
    # stream entering each layer. The reference batch is rebuilt by hand (BOS text, BOS left padding).
    plan, tok = _plan(tiny_world, mode), _tok(tiny_world)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.bfloat16).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].float()))

    def mean_state(prompts):
        rows = [tok(tok.bos_token + p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.bos_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        states = torch.stack([seen[i] for i in range(len(seen))])  # (L, B, T, H)
        per_prompt = states.mean(2) if mode == "hidden_avg" else states[:, :, -1]
        return per_prompt.mean(1)

    got = torch.from_numpy(gates.compute_gates(plan, tok, device="cpu", progress=False))
    for e, expert in enumerate(plan.config.experts):
        want = mean_state(expert.positive_prompts)
        if expert.negative_prompts:
            want = want - mean_state(expert.negative_prompts)
        cos = (got[:, e] * _unit(want)).sum(-1)
        assert bool((cos > 0.9999).all()), cos
        assert torch.allclose(got[:, e].norm(dim=-1), torch.ones(plan.num_layers), atol=1e-5)


# ------------------------------------------------------------------------------------- fitted modes


def test_router_token_ids_follow_the_tokenizer_and_the_chat_template(tiny_world):
    tok = _tok(tiny_world)
    plain = router_prompts.router_token_ids(tok, "def add(a, b):")
    assert plain == tok("def add(a, b):")["input_ids"] and plain[0] == tok.bos_token_id  # one BOS, not two
    chat = router_prompts.router_token_ids(tok, "def add(a, b):", chat_template=True)
    text = tok.apply_chat_template([{"role": "user", "content": "def add(a, b):"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == tok(text, add_special_tokens=False)["input_ids"] and len(chat) > len(plain)
    tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        router_prompts.router_token_ids(tok, "hi", chat_template=True)


def test_layer_stack_reads_the_post_attention_norm_output_at_true_positions(tiny_world):
    from lazymoe.router.streamed import LayerStack
    from lazymoe.io.safetensors import read_tensor

    plan, tok = _plan(tiny_world, "classifier"), _tok(tiny_world)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0]))
    seqs = [tok(p)["input_ids"] for p in ("Hello there, how are you today?", "def f(x):", "Once")]
    get = lambda name: read_tensor(plan.base.tensors[name]).float()  # noqa: E731
    stack = LayerStack(plan.base.folder, seqs, get("model.embed_tokens.weight"), torch.device("cpu"))
    for layer in range(plan.num_layers):
        x = stack.mlp_input(layer, get)
        for b, seq in enumerate(seqs):  # each prompt alone, unpadded: the positions it really has
            with torch.no_grad():
                model(input_ids=torch.tensor([seq]))
            assert torch.allclose(x[b, : len(seq)], seen[layer][0], atol=1e-5), (layer, b)
        mlp = model.model.layers[layer].mlp
        with torch.no_grad():
            stack.add_mlp_output(mlp(x))


def _separable(seed=0, n=60, H=24, E=3, noise=1.0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(E, H, generator=gen) * 1.5
    y = torch.arange(E).repeat_interleave(n)
    X = centres[y] + noise * torch.randn(len(y), H, generator=gen)
    return X, y


def test_softmax_regression_reaches_the_autograd_optimum():
    X, y = _separable()
    Xn = X[:10] + 0.1  # counter-examples against expert 2 that look like expert 0
    yn = torch.full((10,), 2)
    lam = 0.05
    W = fitted.softmax_regression(X, y, Xn, yn, 3, lam)
    # the same objective written independently, minimised by autograd + Adam from another start
    w = 1.0 / (torch.bincount(y).double()[y] * 3)
    wn = 0.5 / (10 * 3) * torch.ones(10, dtype=torch.float64)
    def objective(V):
        ce = torch.nn.functional.cross_entropy(X.double() @ V.T, y, reduction="none")
        p_neg = (Xn.double() @ V.T).softmax(1)[torch.arange(10), yn]
        return (w * ce).sum() - (wn * torch.log1p(-p_neg)).sum() + 0.5 * lam * (V * V).sum()

    V = torch.randn(3, X.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    opt = torch.optim.LBFGS([V], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(V)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(objective(W.double())) <= float(objective(V.detach())) + 1e-7
    assert torch.allclose(W.double(), V.detach(), atol=1e-4), (W.double() - V).abs().max()


def test_negatives_push_their_expert_down_where_they_are():
    X, y = _separable(seed=1)
    probe = X[y == 0][:20]
    no_neg = fitted.softmax_regression(X, y, X[:0], y[:0], 3, 0.05)
    with_neg = fitted.softmax_regression(X, y, probe, torch.zeros(20, dtype=torch.long), 3, 0.05)
    p_before = (probe.double() @ no_neg.T).softmax(1)[:, 0].mean()
    p_after = (probe.double() @ with_neg.T).softmax(1)[:, 0].mean()
    assert p_after < p_before - 0.2


def test_classifier_cross_validates_the_l2_strength_and_is_scale_free():
    X, y = _separable(seed=2, noise=2.5)
    groups = torch.arange(len(y)) % 5
    W, lam = fitted.fit_classifier(X, y, groups, X[:0], y[:0], 3)
    assert lam in fitted._LAMBDAS
    # rescaling one input dimension (a "massive activation") must not change the decisions
    Xs = X.clone()
    Xs[:, 0] *= 100
    W2, lam2 = fitted.fit_classifier(Xs, y, groups, Xs[:0], y[:0], 3)
    assert lam2 == lam
    assert torch.equal((X @ W.T).argmax(1), (Xs @ W2.T).argmax(1))
    # the rows are centred (the L2 optimum adds nothing all experts share) and route the training data
    assert float(W.sum(0).abs().max()) < 1e-4 * float(W.abs().max())
    assert float(((X @ W.T).argmax(1) == y).float().mean()) > 0.9


def test_centroid_rows_are_centred_means_at_the_cross_entropy_optimal_scale():
    X, y = _separable(seed=3, noise=2.0)
    Xn = X[y == 1][:5]
    yn = torch.zeros(5, dtype=torch.long)
    W = fitted.fit_centroid(X, y, Xn, yn, 3).double()
    means = torch.stack([X[y == e].double().mean(0) for e in range(3)])
    direction = means - means.mean(0)
    direction[0] -= Xn.double().mean(0) - means.mean(0)
    scale = W.norm() / direction.norm()
    assert torch.allclose(W, direction * scale, atol=1e-6)

    def ce(s):
        z = s * (X.double() @ direction.T)
        return float((torch.nn.functional.cross_entropy(z, y, reduction="none") / 3 / 60).sum())

    s = float(scale)
    assert ce(s) <= min(ce(0.8 * s), ce(1.25 * s))  # a (near-)minimum of the calibration objective


@pytest.mark.parametrize(("mode", "tweak"), [("centroid", False), ("classifier", False), ("classifier", True)])
def test_fitted_routers_are_fitted_on_what_the_merged_moe_feeds_them(tiny_world, tmp_path, mode, tweak):
    # Merge, then run the prompts through transformers' Mixtral and capture what each router receives.
    # Refitting every layer on those captured inputs must give back the gates that were written -- also
    # when noise_scale / residual_scale change the experts: routers are fitted on the experts as written.
    plan, tok = _plan(tiny_world, mode, router_continuation_tokens=0), _tok(tiny_world)
    config = plan.config
    if tweak:
        experts = [e.model_copy() for e in config.experts]
        experts[0] = experts[0].model_copy(update={"noise_scale": 0.05})
        experts[1] = experts[1].model_copy(update={"residual_scale": 0.5})
        config = config.model_copy(update={"experts": experts})
    out = lazymoe.merge(config, tmp_path / "moe", progress=False)
    moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(moe.model.layers):
        layer.mlp.gate.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0]))
    prompts = router_prompts.prompt_set(tok, plan.config)
    feats = {i: [] for i in range(plan.num_layers)}
    for seq in prompts.seqs:  # one prompt at a time: no padding, true positions
        with torch.no_grad():
            moe(input_ids=torch.tensor([seq]))
        for i in feats:
            feats[i].append(seen[i].reshape(len(seq), -1)[1:])  # drop the BOS
    owners = torch.cat([torch.full((len(s) - 1,), j) for j, s in enumerate(prompts.seqs)])
    labels, pos, groups = prompts.expert[owners], prompts.positive[owners], prompts.index[owners]
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        written = torch.stack([f.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight")
                               for i in range(plan.num_layers)])
    for i in range(plan.num_layers):
        X = torch.cat(feats[i])
        refit = fitted.fit_layer(mode, X[pos], labels[pos], groups[pos], X[~pos], labels[~pos], 3)
        assert torch.allclose(refit, written[i], rtol=1e-3, atol=1e-4 * float(written[i].abs().max())), i


def test_base_upstream_fits_on_the_dense_base_states(tiny_world):
    # upstream="base" (no expert weights needed) must fit exactly on the dense base's MLP inputs.
    plan, tok = _plan(tiny_world, "centroid", router_continuation_tokens=0), _tok(tiny_world)
    got = fitted.fitted_gates(plan, tok, progress=False, upstream="base")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.float32).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0][0, 1:]))
    prompts = router_prompts.prompt_set(tok, plan.config)
    feats = {i: [] for i in range(plan.num_layers)}
    for seq in prompts.seqs:
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for i in feats:
            feats[i].append(seen[i])
    owners = torch.cat([torch.full((len(s) - 1,), j) for j, s in enumerate(prompts.seqs)])
    labels, pos = prompts.expert[owners], prompts.positive[owners]
    for i in range(plan.num_layers):
        X = torch.cat(feats[i])
        want = fitted.fit_centroid(X[pos], labels[pos], X[~pos], labels[~pos], 3)
        assert torch.allclose(got[i], want, rtol=1e-4, atol=1e-5 * float(want.abs().max())), i
    with pytest.raises(ValueError, match="upstream"):
        fitted.fitted_gates(plan, tok, progress=False, upstream="dense")


def test_continuations_are_seeded_samples_of_the_base_appended_to_positive_prompts(tiny_world):
    plan, tok = _plan(tiny_world, "classifier"), _tok(tiny_world)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.float32).eval()
    prompts = router_prompts.prompt_set(tok, plan.config)
    rng_before = torch.get_rng_state()
    a = router_prompts.continue_prompts(model, tok, prompts, new_tokens=12, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random state is left alone
    b = router_prompts.continue_prompts(model, tok, prompts, new_tokens=12, seed=5, batch_size=1)
    c = router_prompts.continue_prompts(model, tok, prompts, new_tokens=12, seed=6)
    assert a.seqs != c.seqs
    for i, (old, new) in enumerate(zip(prompts.seqs, a.seqs)):
        assert new[: len(old)] == old  # the prompt itself is kept, unpadded
        if prompts.positive[i]:
            assert 0 < len(new) - len(old) <= 12 and tok.eos_token_id not in new[len(old):]
        else:
            assert new == old  # negatives are not continued: they say what an expert is *not*
    # left padding must not change what a prompt continues into: compare batched with one-by-one greedy
    greedy = [model.generate(torch.tensor([s]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)[0]
              .tolist() for s in prompts.seqs[:3]]
    width = max(len(s) for s in prompts.seqs[:3])
    ids = torch.tensor([[tok.eos_token_id] * (width - len(s)) + s for s in prompts.seqs[:3]])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in prompts.seqs[:3]])[:, None]).long()
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    for s, g, row in zip(prompts.seqs[:3], greedy, batched.tolist()):
        assert row[width:] == g[len(s):]
    assert len(b.seqs) == len(a.seqs)


@pytest.mark.parametrize("mode", ["centroid", "classifier"])
def test_identical_experts_still_reproduce_the_dense_model(tiny_world, tmp_path, mode):
    cfg = moe_config(tiny_world["base"], [tiny_world["same1"], tiny_world["same2"]], gate_mode=mode,
                     allow_all_same_experts=True, router_continuation_tokens=4)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    text = "def add(a, b): return a + b. Once upon a time"
    tok = _tok(tiny_world)
    with torch.no_grad():
        moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(**tok(text, return_tensors="pt"))
        dense = AutoModelForCausalLM.from_pretrained(str(tiny_world["base"]), dtype=torch.float32)(
            **tok(text, return_tensors="pt"))
    assert torch.allclose(moe.logits, dense.logits, atol=1e-5, rtol=0)


def test_fitted_modes_validate_like_the_reference_modes(tiny_world):
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="classifier")
    assert load_config(cfg).gate_mode == "classifier"
    assert "router_chat_template" not in load_config(cfg).to_dict()  # mergekit YAML stays mergekit YAML
    cfg["experts"][1]["positive_prompts"] = []
    with pytest.raises(ConfigError, match="positive_prompts"):
        load_config(cfg)
