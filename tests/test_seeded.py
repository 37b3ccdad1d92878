"""The random gate modes' rows come from numpy (``lazymoe.router.seeded``), not torch: every bit must still be
torch's, from the generator to the router bytes in the merged model, and a merge in those modes must not import
torch at all."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import moe_config
from safetensors import safe_open

import lazymoe
from lazymoe.io.safetensors import float32_bytes
from lazymoe.router import seeded
from lazymoe.router.reference import random_gates

#: the CPU kernels whose randn this module reproduces (torch elsewhere uses libm's log/sin/cos: see seeded)
X86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_x86 = pytest.mark.skipif(not X86, reason="torch's randn takes its AVX2 kernel only on x86 CPUs with AVX2")

SEEDS = [0, 1, 7, 42, 2**31 + 5, 2**32 + 7, 2**63 - 1, -3]
#: a multiple of 16, a tail redrawn (n % 16 != 0), fewer than 16 (torch's other path), a 7B-sized router
SHAPES = [(4, 8, 512), (3, 5, 7), (2, 3, 17), (1, 2, 7), (1, 1, 16), (32, 8, 4096)]


def bits(a) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def raw(t: torch.Tensor) -> list[int]:
    """A float tensor's elements as their bit patterns."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).reshape(-1).tolist()


@needs_x86
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_and_rand_are_torchs_bit_for_bit(seed):
    for shape in SHAPES:
        want = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        got = seeded.randn(shape, seed)
        assert got.dtype == np.float32 and got.shape == shape
        assert bits(got) == bits(want.numpy()), (seed, shape)
        want = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
        assert bits(seeded.rand(shape, seed)) == bits(want.numpy()), (seed, shape)


@needs_x86
@pytest.mark.parametrize("hidden", [64, 100, 4096])
def test_the_random_modes_rows_are_what_mergekits_torch_calls_give(hidden):
    # mergekit-moe: torch.randn for `random`; torch.nn.Linear's U(-1/sqrt(H), 1/sqrt(H)) for `uniform_random`
    shape, bound = (3, 5, hidden), 1 / math.sqrt(hidden)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    assert bits(random_gates(*shape, mode="random", seed=11)) == bits(want.numpy())
    want = torch.rand(shape, generator=torch.Generator().manual_seed(11)) * (2 * bound) - bound
    assert bits(random_gates(*shape, mode="uniform_random", seed=11)) == bits(want.numpy())


def _round_to_f32(exact: Fraction) -> np.float32:
    """The float32 nearest to an exact rational, ties to even (the reference for a fused multiply-add)."""
    big = np.finfo(np.float32).max
    if abs(exact) >= Fraction(float(big)) + Fraction(2**103):  # IEEE: at or past the threshold, infinity
        return np.float32(np.inf if exact > 0 else -np.inf)
    with np.errstate(over="ignore"):
        r = np.float32(float(exact))  # within one float32 step of the answer
    if np.isinf(r):
        r = np.float32(big if exact > 0 else -big)
    with np.errstate(over="ignore"):
        candidates = {c for c in (r, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf)))
                      if np.isfinite(c)}
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.uint32)) & 1))


def test_the_fused_multiply_add_rounds_once_even_where_float64_lands_on_a_float32_halfway_point():
    # a*b = half a float32 step of c, less a sliver float64 cannot hold: the float64 sum sits exactly halfway
    # between two float32 values (and c's last bit is odd, so ties-to-even would round away); the exact sum
    # lies below, so the fused result is c itself. The same with the sliver added rounds up.
    rng = np.random.default_rng(0)
    c = rng.uniform(1, 2, 2000).astype(np.float32)
    c = (c.view(np.uint32) | np.uint32(1)).view(np.float32)  # odd last bit
    step = np.nextafter(c, np.float32(np.inf)).astype(np.float64) - c.astype(np.float64)
    a = np.full_like(c, np.float32(1 + 2**-23))
    b_down = (step / 2 * (1 - 2**-23)).astype(np.float32)  # a * b_down = step/2 * (1 - 2**-46)
    b_up = (step / 2 * (1 - 2**-22)).astype(np.float32)
    a_up = np.full_like(c, np.float32(1 + 2**-22))  # a_up * b_up = step/2 * (1 - 2**-44): still below
    sign = np.where(rng.random(c.shape) < 0.5, np.float32(1), np.float32(-1))
    random = [rng.standard_normal(3000).astype(np.float32) * np.float32(s) for s in (1, 1, 1e-3)]
    # float32's overflow threshold is a halfway point too: a product of 2**103 - 2**56 added to FLT_MAX lands on
    # it in float64, while the exact sum stays below it (FLT_MAX, not infinity)
    big = np.float32(np.finfo(np.float32).max)
    edge = [np.array([10610063 * 2.0**28, -10610063 * 2.0**28, 2.0**64], np.float32),
            np.array([13264529 * 2.0**28] * 2 + [2.0**64], np.float32), np.array([big, -big, big], np.float32)]
    for x, y, z in [(a, b_down, c), (a_up, b_up, c), (a, b_down, -c), (sign * a, b_down, c), random, edge]:
        got = seeded._fma(x, y, z)
        want = [_round_to_f32(Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r))) for p, q, r in zip(x, y, z)]
        assert bits(got) == bits(np.array(want, np.float32))
    halfway = (seeded._fma(a, b_down, c).astype(np.float64) - c) == 0
    assert halfway.all(), "the crafted cases round to c: float64 alone, rounding to even, would have said c + step"


def test_float32_bytes_cast_as_torch_does():
    specials = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 3.3895314e38, 65504.0, 65520.0,
                1e-45, 1.17549435e-38, 6e-8, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, 1 + 2**-11, 1 + 3 * 2**-11]
    x = np.concatenate([np.array(specials, np.float32),
                        np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * np.float32(30),
                        np.random.default_rng(2).integers(0, 2**32, 100_000, dtype=np.uint32).view(np.float32)])
    t = torch.from_numpy(x.copy())
    for tag, dtype in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
        want = t.to(dtype)
        got = torch.frombuffer(bytearray(float32_bytes(x, tag)), dtype=dtype)
        same = [a == b for a, b in zip(raw(got), raw(want))]
        nan = (got.isnan() & want.isnan()).tolist() if tag != "F32" else [False] * len(same)  # a NaN is a NaN
        assert all(s or n for s, n in zip(same, nan)), tag
    with pytest.raises(ValueError, match="F32, F16 or BF16"):
        float32_bytes(x, "I8")


def _gate_rows(folder, name_part="gate.weight"):
    rows = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith(name_part) and "_proj" not in key:
                    rows[key] = st.get_tensor(key)
    return rows


@needs_x86
@pytest.mark.parametrize("mode", ["random", "uniform_random"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_the_merged_routers_hold_torchs_rows_cast_as_torch_casts(tiny_world, tmp_path, mode, dtype):
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"], tiny_world["math"]],
                     gate_mode=mode, seed=1234, dtype=dtype)
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    config = json.loads((out / "config.json").read_text())
    L, H, E = config["num_hidden_layers"], config["hidden_size"], 3
    gen = torch.Generator().manual_seed(1234)
    if mode == "random":
        want = torch.randn((L, E, H), generator=gen)
    else:
        want = torch.rand((L, E, H), generator=gen) * (2 / math.sqrt(H)) - 1 / math.sqrt(H)
    rows = _gate_rows(out)
    assert len(rows) == L
    for layer in range(L):
        (got,) = [t for k, t in rows.items() if f".{layer}." in k]
        assert got.dtype == getattr(torch, dtype) and raw(got) == raw(want[layer].to(got.dtype)), layer


@needs_x86
def test_a_qwen_moe_in_random_mode_takes_the_shared_experts_row_from_the_same_draw(tmp_path):
    from lazymoe.demo import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    base = build_model(tmp_path / "base", tokenizer_dir=tok, seed=0, model_type="qwen2")
    experts = [build_model(tmp_path / f"e{i}", tokenizer_dir=tok, base=base, perturb=0.3, seed=i) for i in (1, 2)]
    cfg = moe_config(base, experts, gate_mode="random", seed=5, dtype="float32", architecture="Qwen MoE",
                     shared_experts=[{"source_model": str(base), "positive_prompts": ["hi there"]}])
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    config = json.loads((out / "config.json").read_text())
    L, H = config["num_hidden_layers"], config["hidden_size"]
    want = torch.randn((L, 3, H), generator=torch.Generator().manual_seed(5))  # 2 experts + the shared gate's row
    gates, shared = _gate_rows(out, "mlp.gate.weight"), _gate_rows(out, "shared_expert_gate.weight")
    for layer in range(L):
        assert raw(gates[f"model.layers.{layer}.mlp.gate.weight"]) == raw(want[layer, :2])
        assert raw(shared[f"model.layers.{layer}.mlp.shared_expert_gate.weight"]) == raw(want[layer, 2:])


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_a_random_merge_never_imports_torch(tiny_world, tmp_path, mode):
    # torch's import is 1.5-3 s of CPU, most of what a local random-mode merge took over a plain copy
    # float32, the tiny world's own dtype: every other tensor is a straight copy
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode=mode, seed=3)
    path = tmp_path / "moe.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    code = ("import sys\n"
            "from lazymoe.cli import main\n"
            "assert main(['-q', 'merge', sys.argv[1], sys.argv[2]]) in (0, None)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n")
    run = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "moe")], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
    # the same model as the in-process merge, which has torch loaded (this test module imports it)
    again = lazymoe.merge(cfg, tmp_path / "again", progress=False)
    for f in again.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "moe" / f.name).read_bytes()
