"""GGUF conversion, quantisation and inference against transformers, on tiny merged Mixtral models.

Thresholds for quantised files (measured on these models: Q8_0 r≈0.9993, Q4_K_M r≈0.93): Q8_0 rounds each
weight to 1/127 of its 32-block's maximum (≈0.6 % RMS error), Q4_K to 1/15 of its sub-block range (≈9 %).
A random 2-layer MoE compounds that over nine quantised matrices and flips some top-2 routing choices, so
Q4_K_M cannot correlate better than ≈0.93 here; a real bug (wrong scales, q/k permutation, expert order)
drops the correlation to ~0, far below both bounds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lazymoe import demo
from lazymoe.gguf.converter import _extract_converter, ensure_converter
from lazymoe.errors import GGUFError
from helpers import iter_test_strings

from lazymoe.cli import build_parser
from lazymoe.cli.publish_commands import cmd_chat
from lazymoe.gguf.convert import convert_to_gguf, parse_quants, quantize_gguf
from lazymoe.gguf.llama import chat, expert_prompts, open_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (see README: GGUF)")
pytestmark = pytest.mark.llama

PROMPTS = ["Once upon a time, the dragon", "def fibonacci(n):", "Solve 2x + 3 = 11, so x ="]


def _build_moe(root: Path, hidden: int, intermediate: int) -> Path:
    from lazymoe.pipeline.merge import merge

    config = demo.build_demo(root / "src", hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4,
                             num_key_value_heads=2, initializer_range=0.1, perturb=0.3)
    return merge(config, root / "moe", progress=False)


@pytest.fixture(scope="module")
def moe256(tmp_path_factory) -> Path:
    """Hidden and intermediate 256: every matrix width is a multiple of 256, so K-quants really apply."""
    return _build_moe(tmp_path_factory.mktemp("moe256"), 256, 256)


@pytest.fixture(scope="module")
def gguf256(moe256, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf256")
    paths = convert_to_gguf(moe256, out, outtype="f32", quants="Q8_0,Q4_K_M", threads=1, progress=False)
    return {p.name.split(".")[-2]: p for p in paths}


@pytest.fixture(scope="module")
def hf256(moe256):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(moe256, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(moe256), model


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _gguf_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_outputs_are_named_and_complete(gguf256):
    assert set(gguf256) == {"F32", "Q8_0", "Q4_K_M"}
    folder = gguf256["F32"].parent
    assert sorted(p.name for p in folder.iterdir()) == [  # no .partial left; the record of what each came from
        ".lazymoe-gguf.json", "lazymoe_config.yml", "moe.F32.gguf", "moe.Q4_K_M.gguf", "moe.Q8_0.gguf"]
    sizes = {k: p.stat().st_size for k, p in gguf256.items()}
    assert sizes["F32"] > 3 * sizes["Q8_0"] > 1.5 * 3 * sizes["Q4_K_M"]


def test_f32_logits_and_greedy_match_transformers(gguf256, hf256):
    tok, model = hf256
    with open_gguf(gguf256["F32"], n_threads=1, n_gpu_layers=0, logits_all=True, n_ctx=256) as llm:
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            ref, got = _hf_logits(model, ids), _gguf_logits(llm, ids)
            assert ref.std() > 1.0  # the comparison means something only if logits are spread out
            assert np.abs(ref - got).max() < 0.05, prompt  # measured ≈0.008
            expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
            assert _gguf_greedy(llm, ids, 12) == expected, prompt


@pytest.mark.parametrize(("quant", "min_corr"), [("Q8_0", 0.995), ("Q4_K_M", 0.85)])
def test_quantised_logits_correlate(gguf256, hf256, quant, min_corr):
    tok, model = hf256
    with open_gguf(gguf256[quant], n_threads=1, n_gpu_layers=0, logits_all=True, n_ctx=256) as llm:
        refs, gots = [], []
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            refs.append(_hf_logits(model, ids))
            gots.append(_gguf_logits(llm, ids))
    assert _corr(np.concatenate(refs), np.concatenate(gots)) > min_corr


def test_k_quants_really_applied_at_width_256(gguf256, tmp_path):
    report = quantize_gguf(gguf256["F32"], tmp_path / "m.Q4_K_M.gguf", "q4_k_m", threads=1)
    assert report.fallbacks == []
    gguf = _gguf_module()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(report.path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
    assert types["blk.0.ffn_down_exps.weight"] in ("Q4_K", "Q6_K")  # Q4_K_M upgrades some down projections
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # llama.cpp keeps routers unquantised


def test_narrow_model_reports_fallback_tensors(tmp_path):
    moe = _build_moe(tmp_path, 64, 128)
    f32 = convert_to_gguf(moe, tmp_path / "g", outtype="f32", quants=None, progress=False)[0]
    report = quantize_gguf(f32, tmp_path / "g" / "moe.Q4_K_M.gguf", "Q4_K_M", threads=1)
    fell = {f.tensor: f for f in report.fallbacks}
    assert fell["blk.0.ffn_down_exps.weight"].ncols == 128 and fell["blk.0.ffn_down_exps.weight"].block == 256
    assert fell["blk.1.attn_q.weight"].wanted == "q4_K" and fell["blk.1.attn_q.weight"].used == "q5_0"
    assert "fell back" in report.summary() and "blk." in report.summary()
    types = {t.name: t.tensor_type.name for t in _gguf_module().GGUFReader(report.path).tensors}
    assert types["blk.1.attn_q.weight"] == "Q5_0"  # the report agrees with what was written
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the f32 path is exact at any width

    tok, model = AutoTokenizer.from_pretrained(moe), AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    with open_gguf(f32, n_threads=1, n_gpu_layers=0, logits_all=True, n_ctx=128) as llm:
        ids = tok(PROMPTS[0])["input_ids"]
        assert np.abs(_hf_logits(model, ids) - _gguf_logits(llm, ids)).max() < 0.05


def test_tokenisation_matches_base_tokenizer(gguf256, moe256):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(moe256)
    with open_gguf(gguf256["Q8_0"], n_threads=1, n_gpu_layers=0, vocab_only=True) as llm:
        for text in iter_test_strings():
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text
            ids = tok(text)["input_ids"]  # llama-cpp-python drops the dummy-prefix space only after a BOS
            assert llm.detokenize(ids).decode("utf-8") == tok.decode(ids, skip_special_tokens=True), text


def test_chat_answers_one_prompt_per_expert(gguf256, capsys):
    prompts = expert_prompts(gguf256["Q4_K_M"].parent / "lazymoe_config.yml")
    assert [name for name, _ in prompts] == ["0:chat", "1:code", "2:math", "3:stories"]
    assert prompts[1][1] == "Write a short answer about code, python and javascript."
    replies = chat(gguf256["Q4_K_M"], [p for _, p in prompts], n_threads=1, max_tokens=8)
    assert len(replies) == 4 and all(isinstance(r, str) and r for r in replies)

    parser = build_parser()
    args = parser.parse_args(["chat", str(gguf256["Q4_K_M"]), "--max-tokens", "4", "--threads", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- expert ") == 4 and "Write a short answer about storywriting" in printed


def test_cli_gguf_reuses_complete_files(gguf256, moe256, capsys):
    parser = build_parser()
    folder = gguf256["F32"].parent
    before = {p: p.stat().st_mtime_ns for p in gguf256.values()}
    args = parser.parse_args(["gguf", str(moe256), "--outdir", str(folder), "--outtype", "f32", "--quant", "q8_0"])
    args.quiet = True
    assert args.func(args) == 0
    assert "moe.Q8_0.gguf" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing rebuilt


def test_a_model_merged_again_under_the_same_name_gets_new_gguf_files_not_the_earlier_ones(moe256, tmp_path, caplog):
    """A rerun reuses a GGUF file only when it was made from the model as it is now: merged again (other experts,
    another seed), the model's files are new, and so must the GGUF files be; else the old model would be
    quantised, published and chatted with under the new one's name."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from lazymoe.gguf.files import current_gguf_files
    from lazymoe.io.folder import GGUF_RECORD

    model, out = tmp_path / "moe", tmp_path / "moe-GGUF"
    shutil.copytree(moe256, model)
    first = convert_to_gguf(model, out, outtype="f32", quants="Q8_0,Q4_K_M", threads=1, progress=False)
    q4 = first.pop()
    made = {p: p.stat().st_mtime_ns for p in first}
    assert set(json.loads((out / GGUF_RECORD).read_text())["made_from"]) == {p.name for p in [*first, q4]}
    assert current_gguf_files(model, out) == sorted([*first, q4])

    (model / "eval.json").write_text("{}")  # a later step's file beside the model: not what was converted
    assert convert_to_gguf(model, out, outtype="f32", quants="Q8_0", threads=1, progress=False) == first
    assert {p: p.stat().st_mtime_ns for p in first} == made, "the same model: nothing made again"
    first[0].unlink()  # the 16-bit file deleted to save disk: made again, and the quantisation still reused
    assert convert_to_gguf(model, out, outtype="f32", quants="Q8_0", threads=1, progress=False) == first
    assert first[1].stat().st_mtime_ns == made[first[1]]
    made[first[0]] = first[0].stat().st_mtime_ns

    # "merged again": the same names and sizes, other router rows (what another seed gives)
    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    gate = next(n for n in tensors if n.endswith("block_sparse_moe.gate.weight"))
    tensors[gate] = torch.flip(tensors[gate], dims=[0]).contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="lazymoe.gguf"):
        again = convert_to_gguf(model, out, outtype="f32", quants="Q8_0", threads=1, progress=False)
    assert again == first and all(p.stat().st_mtime_ns != made[p] for p in again), "both files made again"
    layer = int(gate.split(".")[2])
    written = {t.name: t for t in _gguf_module().GGUFReader(again[0]).tensors}[f"blk.{layer}.ffn_gate_inp.weight"]
    assert np.array_equal(np.asarray(written.data).reshape(tensors[gate].shape), tensors[gate].numpy())
    # the Q4_K_M this run did not ask for came from the earlier merge: left, named in a warning, never current
    assert q4.is_file() and current_gguf_files(model, out) == again
    assert f"{q4.name} made from the model as it was before (merged again since)" in caplog.text

    # a file no record names (made by a lazymoe before the record): never current, and named in a warning too
    caplog.clear()
    unknown = out / "moe.Q5_K_M.gguf"
    shutil.copyfile(q4, unknown)
    with caplog.at_level(logging.WARNING, logger="lazymoe.gguf"):
        convert_to_gguf(model, out, outtype="f32", quants="Q8_0", threads=1, progress=False)
    assert "moe.Q5_K_M.gguf of unknown origin (no record says what it was made from)" in caplog.text
    assert unknown not in current_gguf_files(model, out)

    # a record that cannot be read: nothing is known about the files, so they are made again
    remade = {p: p.stat().st_mtime_ns for p in again}
    (out / GGUF_RECORD).write_text("{not json")
    convert_to_gguf(model, out, outtype="f32", quants="Q8_0", threads=1, progress=False)
    assert all(p.stat().st_mtime_ns != remade[p] for p in again)
    assert json.loads((out / GGUF_RECORD).read_text())["made_from"].keys() == {p.name for p in again}


def test_converter_error_is_the_real_cause(moe256, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in moe256.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    shard = sorted(broken.glob("*.safetensors"))[0]  # an unknown tensor inside a shard the converter reads
    tensors = load_file(shard)
    tensors["model.layers.0.block_sparse_moe.mystery.weight"] = torch.zeros(4, 4)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = broken / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"]["model.layers.0.block_sparse_moe.mystery.weight"] = shard.name
        index.write_text(json.dumps(data))
    out = tmp_path / "out"
    with pytest.raises(GGUFError) as err:
        convert_to_gguf(broken, out, outtype="f16", quants=None, progress=False)
    message = str(err.value)
    assert "converter failed" in message and "(exit 1)" in message
    assert "Can not map tensor 'model.layers.0.block_sparse_moe.mystery.weight'" in message.splitlines()[0]
    assert [p.name for p in out.iterdir() if "gguf" in p.name] == []  # neither a final nor a .partial file
    log = out / ".broken.F16.convert.log"  # the converter's whole log is kept, and the message says where
    assert message.endswith(f"The converter's whole log: {log}")
    assert "INFO:hf-to-gguf:Loading model: broken" in log.read_text() and "Can not map tensor" in log.read_text()


def test_conversion_shows_progress_not_the_converters_log(moe256, tmp_path, capsys):
    convert_to_gguf(moe256, tmp_path / "out", outtype="f16", quants=None, progress=True)
    err = capsys.readouterr().err
    assert "INFO:" not in err  # ~60 lines of the converter's own log used to flood the terminal
    assert "convert F16" in err and "100%" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lazymoe-gguf.json", "lazymoe_config.yml",
                                                                    "moe.F16.gguf"]


def test_unsupported_architecture_error(moe256, tmp_path):
    broken = tmp_path / "arch"
    broken.mkdir()
    for f in moe256.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFError, match=r"(?s)Model FrobnicatorForCausalLM is not supported.*What to do"):
        convert_to_gguf(broken, tmp_path / "out", quants=None, progress=False)


def test_fused_layout_is_refused_before_converting(tmp_path, moe256):
    from lazymoe.pipeline.merge import merge

    fused = merge(moe256 / "lazymoe_config.yml", tmp_path / "fused", layout="fused", progress=False)
    with pytest.raises(GGUFError, match="merge again and pass layout='classic'"):
        convert_to_gguf(fused, tmp_path / "out", quants=None, progress=False)


def test_bad_inputs_are_explained(tmp_path, gguf256):
    with pytest.raises(GGUFError, match="unknown quantisation Q4_K_X"):
        parse_quants("Q4_K_M,q4_k_x")
    assert parse_quants("all")[0] == "Q2_K" and parse_quants("none") == [] and len(parse_quants("all")) == 14
    with pytest.raises(GGUFError, match="not a Hugging Face model folder"):
        convert_to_gguf(tmp_path, quants=None, progress=False)
    with pytest.raises(GGUFError, match="does not exist"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "Q8_0")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(GGUFError, match=r"return code 1"):
        quantize_gguf(garbage, tmp_path / "y.gguf", "Q8_0", threads=1)
    assert not (tmp_path / "y.gguf").exists() and not (tmp_path / ".y.gguf.partial").exists()
    with pytest.raises(GGUFError, match=r"could not load .*garbage\.gguf"):
        with open_gguf(garbage, n_threads=1, n_gpu_layers=0):
            pass


def test_disk_is_checked_before_each_step(moe256, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from lazymoe.errors import InsufficientResourcesError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(InsufficientResourcesError, match=r"not enough disk for moe\.F16\.gguf: about \d+\.\d MB needed \(\d+\.\d MB \+ 67\.1 MB margin\), \d+\.\d MB free"):
        convert_to_gguf(moe256, tmp_path / "out", quants=None, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir() if "gguf" in p.name] == []


def test_chat_without_prompts_or_config_says_what_to_pass(tmp_path):
    args = argparse.Namespace(gguf_file=str(tmp_path / "m.gguf"), prompt=None, config=None, max_tokens=4,
                              n_gpu_layers=0, threads=1, n_ctx=64)
    with pytest.raises(GGUFError, match="pass --prompt TEXT or --config PATH"):
        cmd_chat(args)
    with pytest.raises(GGUFError, match=r"with outtype q8_0, request no further quantisation \(or keep outtype f16"):
        convert_to_gguf(tmp_path, outtype="q8_0", quants="Q4_K_M", progress=False)


def test_extract_converter_keeps_only_its_parts(tmp_path):
    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    members = {
        "llama_cpp_python-9.9.9/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('hi')\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/conversion/__init__.py": b"",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/requirements.txt": b"torch==2.0\n",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/gguf-py/../../../escape.py": b"bad",
    }
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = ensure_converter("9.9.9", sdist=archive, cache_dir=tmp_path / "cache")
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "escape.py").exists()
    with pytest.raises(GGUFError, match="not contain"):
        _extract_converter(_tar_without_converter(tmp_path), tmp_path / "x")


def _tar_without_converter(tmp_path: Path) -> Path:
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("pkg-1.0/README.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return path


def _gguf_module():
    """llama.cpp's own gguf-py (the converter's), to read back tensor types."""
    path = str(ensure_converter() / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def test_chat_interactive_keeps_the_conversation(gguf256):
    from lazymoe.gguf.llama import chat_loop

    lines, shown = iter(["Tell me a story.", "And another one.", ""]), []
    turns = chat_loop(gguf256["Q8_0"], read=lambda prompt: next(lines), write=shown.append, max_tokens=4,
                      n_threads=1)
    assert turns == 2
    assert shown[0].startswith("Chatting with moe.Q8_0.gguf") and len([s for s in shown if s.startswith("model> ")]) == 2
