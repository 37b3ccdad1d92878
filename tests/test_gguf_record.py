"""The GGUF folder's record of what each file was made from (``gguf.convert``), against records a person or a
crash could leave: nothing raises, and only the model's own files, made from it as it is now, are current."""

from __future__ import annotations

import json
from pathlib import Path

from lazymoe.gguf.convert import _read_gguf_record, current_gguf_files, model_fingerprint
from lazymoe.io.folder import GGUF_RECORD


def _model(tmp_path: Path, name: str = "m") -> tuple[Path, Path]:
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text("{}")
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    out = tmp_path / f"{name}-GGUF"
    out.mkdir()
    return model, out


def test_what_changes_the_models_fingerprint(tmp_path):
    model, _ = _model(tmp_path)
    first = model_fingerprint(model)
    for later_step in ("eval.json", "answers.json", "benchmarks.json", "README.md", ".lazymoe-card.sha256"):
        (model / later_step).write_text("written after the conversion")
    assert model_fingerprint(model) == first, "what later steps write beside the model is not what was converted"
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert model_fingerprint(model) != first, "the converter reads the chat template"
    second = model_fingerprint(model)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-16] + b"\1" * 16)  # merged again: same header, other weights
    assert model_fingerprint(model) != second


def test_only_the_models_own_files_made_from_it_as_it_is_now_are_current(tmp_path):
    model, out = _model(tmp_path, "my moe")  # a space in the name, as a folder may have
    files = [out / "my moe.F16.gguf", out / "my moe.Q8_0.gguf", out / "my moe.v2.F16.gguf", out / "other.Q8_0.gguf"]
    for f in files:
        f.write_bytes(b"GGUF")
    state = model_fingerprint(model)
    record = {f.name: state for f in files}
    (out / GGUF_RECORD).write_text(json.dumps({"made_from": {**record, "../outside.F16.gguf": state}}))
    assert current_gguf_files(model) == files[:2]
    assert current_gguf_files(model, out, name="my moe.v2") == [files[2]]
    (model / "config.json").write_text('{"merged": "again"}')
    assert current_gguf_files(model) == []
    assert current_gguf_files(tmp_path / "gone", out) == [], "a model folder that is not there has no current files"


def test_a_damaged_record_is_no_record(tmp_path):
    model, out = _model(tmp_path)
    (out / "m.F16.gguf").write_bytes(b"GGUF")
    for text in ("[" * 100_000 + "]" * 100_000, '{"made_from": [1]}', "{", '{"made_from": {"m.F16.gguf": 7}}',
                 '{"made_from": {"m.F16.gguf": "a\\u0000b"}}', "[]"):
        (out / GGUF_RECORD).write_text(text)
        assert current_gguf_files(model) == [], text
    (out / GGUF_RECORD).unlink()
    (out / GGUF_RECORD).mkdir()  # not even a file
    assert _read_gguf_record(out) == {} and current_gguf_files(model) == []
