"""The written-text gate modes: experts write calibration text, routers train on the MoE's own LM loss."""

from __future__ import annotations

import pytest
import torch
from helpers import moe_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import lazymoe
from lazymoe.config import load_config
from lazymoe.errors import ConfigError
from lazymoe.io.safetensors import read_tensor
from lazymoe.moe import arch
from lazymoe.pipeline.merge import make_plan
from lazymoe.router import gates
from lazymoe.router import written as router_train
from lazymoe.router.prompts import real_tokens
from lazymoe.router.reference import random_gates

TEXTS = ["def add(a, b): return a + b", "Once upon a time a fox lived here.", "12 + 30 = 42 and 7 * 8 = 56"]


def _cfg(world, mode="trained", **extra):
    cfg = moe_config(world["base"], [world["chat"], world["code"], world["math"]], gate_mode=mode, seed=3,
                     dtype="float32", **extra)
    cfg["experts"][0]["positive_prompts"] = ["chat", "tell me"]
    cfg["experts"][0].pop("negative_prompts", None)
    cfg["experts"][1]["positive_prompts"] = ["code", "python"]
    cfg["experts"][2]["positive_prompts"] = ["math", "12 + 30 ="]
    return cfg


def _gates(folder, layers):
    with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
        return torch.stack([f.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(layers)])


def _streamed(plan, seqs):
    def get(name):
        return read_tensor(plan.base.tensors[name]).float()

    def experts(layer):
        return [tuple(read_tensor(plan.models[e.source_model].tensors[arch.mlp_name(layer, p)]).float()
                      for p in arch.MLP_PARTS) for e in plan.config.experts]

    moe = router_train.StreamedMoE(plan.base.folder, seqs, get, experts, k=plan.config.experts_per_token,
                                   device=torch.device("cpu"), num_layers=plan.num_layers)
    return moe, get("lm_head.weight")


def test_streamed_moe_is_the_merged_mixtral_and_its_objective_is_the_lm_loss_alone(tiny_world, tmp_path):
    # The training objective must be the merged model's own next-token loss, computed from its logits:
    # Mixtral's out.loss adds router_aux_loss_coef x aux when router logits are asked for.
    cfg = _cfg(tiny_world, "random")
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    plan = make_plan(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    seqs = [tok(t)["input_ids"] for t in TEXTS]
    moe, lm_head = _streamed(plan, seqs)
    W = _gates(out, plan.num_layers)
    keep = real_tokens(moe.stack.mask, moe.stack.ids, tok.bos_token_id)
    lm, balance = router_train.lm_and_balance(moe, W, keep, lm_head, checkpoint=False)
    mixtral = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    mixtral.config.router_aux_loss_coef = 0.5  # large, so a leak of the aux loss into the LM term shows
    total, n, aux = 0.0, 0, []
    h, router = moe.forward(W, checkpoint=False)
    for i, seq in enumerate(seqs):
        ids = torch.tensor([seq])
        with torch.no_grad():
            res = mixtral(input_ids=ids, labels=ids, output_router_logits=True)
        logits = h[i, : len(seq)] @ lm_head.T
        assert torch.allclose(logits, res.logits[0], atol=1e-4, rtol=1e-4)
        for layer, z in enumerate(router):
            assert torch.allclose(z[i, : len(seq)], res.router_logits[layer].reshape(len(seq), -1), atol=1e-4)
        ce = torch.nn.functional.cross_entropy(res.logits[0, :-1], ids[0, 1:], reduction="sum")
        total, n = total + float(ce), n + len(seq) - 1
        assert float(res.loss) > float(ce) / (len(seq) - 1) + 1e-3  # out.loss carries the aux term
        aux.append(res.aux_loss)
    assert float(lm) == pytest.approx(total / n, rel=1e-5)
    assert 0.5 < float(balance) < float(plan.config.num_experts)


def test_trained_routers_lower_the_moe_lm_loss_on_the_calibration_text(tiny_world):
    plan = make_plan(_cfg(tiny_world), progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    moe, lm_head = _streamed(plan, [tok(t)["input_ids"] for t in TEXTS])
    keep = real_tokens(moe.stack.mask, moe.stack.ids, tok.bos_token_id)
    W0 = torch.from_numpy(random_gates(plan.num_layers, 3, moe.stack.h.shape[-1], mode="uniform_random", seed=0))
    trained, history = router_train.train_routers(moe, W0, keep, lm_head, steps=15, progress=False)
    lm_trained, _ = router_train.lm_and_balance(moe, trained, keep, lm_head)
    assert float(lm_trained) < history[0] - 1e-4
    assert float(lm_trained) == pytest.approx(min(history), abs=0.02)


def test_same_config_and_seed_give_bit_identical_routers(tiny_world, monkeypatch):
    monkeypatch.setattr(router_train, "TRAIN_STEPS", 3)  # seconds, not minutes: determinism needs few steps
    plan = make_plan(_cfg(tiny_world, router_continuation_tokens=6), progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    a, b = (gates.compute_gates(plan, tok, device="cpu", progress=False) for _ in range(2))
    assert a.tobytes() == b.tobytes() and a.shape == (2, 3, 64)


def test_experts_write_from_their_own_prompts_and_the_users_text_joins(tiny_world):
    cfg = _cfg(tiny_world, "expert_classifier")
    cfg["experts"][1]["calibration_text"] = "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)"
    cfg["experts"][2]["negative_prompts"] = ["Once upon a time"]
    plan = make_plan(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    written = router_train.expert_written(plan.config, tok, folder_of=lambda ref: plan.models[ref].folder,
                                          device=torch.device("cpu"), dtype=torch.float32, seed=1, new_tokens=5,
                                          samples=2, progress=False)
    pos = written.positive.tolist()
    assert written.expert.tolist() == [0] * 4 + [1] * 5 + [2] * 5
    assert pos == [True] * 13 + [False]
    prompt = tok("code")["input_ids"]
    for seq in written.seqs[4:6]:  # two samples of expert 1's first prompt, continued by expert 1 itself
        assert seq[: len(prompt)] == prompt and len(prompt) < len(seq) <= len(prompt) + 5
    assert written.seqs[4] != written.seqs[5]  # sampled, not greedy
    assert written.seqs[8] == tok(cfg["experts"][1]["calibration_text"])["input_ids"]
    assert written.index.tolist()[4:9] == [0, 0, 1, 1, 2]  # cross-validation folds: one per prompt or text
    model = AutoModelForCausalLM.from_pretrained(str(tiny_world["code"]), dtype=torch.float32)
    with torch.no_grad():  # what expert 1 wrote is likelier under expert 1 than under expert 0
        own = -model(input_ids=torch.tensor([written.seqs[4]]), labels=torch.tensor([written.seqs[4]])).loss
        other = AutoModelForCausalLM.from_pretrained(str(tiny_world["chat"]), dtype=torch.float32)
        theirs = -other(input_ids=torch.tensor([written.seqs[4]]), labels=torch.tensor([written.seqs[4]])).loss
    assert own > theirs


def test_calibration_text_is_validated_and_optional(tiny_world):
    cfg = _cfg(tiny_world)
    assert load_config(cfg).experts[0].calibration_text == []
    cfg["experts"][0]["calibration_text"] = ["  "]
    with pytest.raises(ConfigError, match=r"experts\[0\]\.calibration_text\[0\] is empty"):
        load_config(cfg)


def test_calibration_text_may_name_a_file_of_texts(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "code.txt").write_text("def f(x):\n    return x\n\n\nclass A:\n    pass\n", encoding="utf-8")
    (tmp_path / "code.jsonl").write_text('{"text": "import os"}\n"print(1)"\n', encoding="utf-8")
    cfg = _cfg(tiny_world, "expert_classifier")
    cfg["experts"][1]["calibration_text"] = ["code.txt", "for i in range(3): pass", str(tmp_path / "code.jsonl")]
    plan = make_plan(cfg, progress=False)
    assert plan.config.experts[1].calibration_texts() == [
        "def f(x):\n    return x", "class A:\n    pass", "for i in range(3): pass", "import os", "print(1)"]
    tok = AutoTokenizer.from_pretrained(str(tiny_world["base"]))
    written = router_train.expert_written(plan.config, tok, folder_of=lambda ref: plan.models[ref].folder,
                                          device=torch.device("cpu"), dtype=torch.float32, seed=1, new_tokens=0,
                                          samples=2, progress=False)
    ones = [seq for seq, e in zip(written.seqs, written.expert.tolist()) if e == 1]
    assert ones[-5:] == [tok(t)["input_ids"] for t in plan.config.experts[1].calibration_texts()]
    assert plan.router_fit["tokens"] > make_plan(_cfg(tiny_world, "expert_classifier"), progress=False).router_fit["tokens"]

    cfg["experts"][1]["calibration_text"] = ["missing.txt"]  # stops at planning, before any expert is read
    with pytest.raises(ConfigError, match=r"experts\[1\]\.calibration_text file missing\.txt does not exist"):
        make_plan(cfg, progress=False)
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    cfg["experts"][1]["calibration_text"] = ["empty.json"]
    with pytest.raises(ConfigError, match=r"calibration_text file empty\.json holds no text"):
        make_plan(cfg, progress=False)
    cfg["experts"][1]["calibration_text"] = ["missing.txt"]  # a mode that never reads it: a warning, no error
    assert any("does not use it" in w for w in make_plan({**cfg, "gate_mode": "hidden"}, progress=False).warnings)


def test_plan_reports_fit_time_and_peak_memory_for_the_written_modes(tiny_world):
    from lazymoe.moe.report import plan_rows

    plans = {m: make_plan(_cfg(tiny_world, m), progress=False) for m in ("classifier", "expert_classifier", "trained")}
    assert plans["classifier"].router_fit is None
    written, trained = plans["expert_classifier"].router_fit, plans["trained"].router_fit
    assert written["tokens"] == trained["tokens"] == 3 * 2 * router_train.SAMPLES_PER_PROMPT * (8 + 48)
    assert trained["cpu_seconds"] > written["cpu_seconds"] > 0 and trained["gpu_seconds"] > written["gpu_seconds"]
    assert plans["trained"].router_pass_bytes == int(trained["peak_bytes"]) >= plans["trained"].base.weight_bytes
    rows = dict(plan_rows(plans["trained"]))
    assert "with a GPU" in rows["Router fit time"] and "on CPU only" in rows["Router fit time"]
