"""The GGUF folder's record of what each file was made from (``gguf.convert``), against records a person or a
crash could leave: nothing raises, and only the model's own files, made from it as it is now, are current."""

from __future__ import annotations

import json
from pathlib import Path

from lazymoe.gguf.files import current_gguf_files, model_fingerprint, read_gguf_record
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
    assert read_gguf_record(out).made_from == {} and current_gguf_files(model) == []


def test_a_gguf_folder_holding_files_of_an_earlier_merge_is_not_pushed(hub, recipe, tmp_path):
    """A quantisation made before the model was merged again, and not asked for again: refused before any repo
    is created, by a push of the folder and by a release of the model (its GGUF step), naming the file."""
    import pytest
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import HubError
    from lazymoe.pipeline.merge import merge
    from lazymoe.pipeline.release import release
    from lazymoe.publish.hub import check_no_stale_gguf, push_to_hub

    model = merge(recipe, tmp_path / "moe", progress=False)
    repos = set(hub.repos)
    out = tmp_path / "moe-GGUF"
    out.mkdir()
    for tag in ("F16", "Q8_0", "Q4_K_M"):
        (out / f"moe.{tag}.gguf").write_bytes(b"GGUF" + bytes(12))
    now = model_fingerprint(model)
    (out / GGUF_RECORD).write_text(json.dumps({"model": str(model), "name": "moe", "made_from": {
        "moe.F16.gguf": now, "moe.Q8_0.gguf": now, "moe.Q4_K_M.gguf": "a merge of moe before this one"}}))
    told = (f"{out} holds GGUF files made from an earlier merge of its model (merged again since): moe.Q4_K_M.gguf. "
            "Delete it, or make it again from the model as it is now (ask for Q4_K_M in the GGUF step, or with "
            "`lazymoe gguf --quant`), then push again.")
    with pytest.raises(HubError) as caught:
        push_to_hub(out, "moe-GGUF", token=ALICE_WRITE_TOKEN, progress=False)
    assert str(caught.value) == told
    with pytest.raises(HubError) as caught:
        release(model, repo="moe", gguf=True, quants=["Q8_0"], token=ALICE_WRITE_TOKEN, progress=False)
    assert str(caught.value) == told
    assert set(hub.repos) == repos and not hub.requests_of("commit"), "nothing was created or sent"
    from lazymoe.publish.card import detected_extras

    assert detected_extras(model)["gguf_files"] == [out / "moe.F16.gguf", out / "moe.Q8_0.gguf"], "nor on the card"
    check_no_stale_gguf(out, remade=["moe.F16.gguf", "moe.Q4_K_M.gguf"])  # a run that makes it again may go on
    (out / "moe.Q4_K_M.gguf").unlink()
    check_no_stale_gguf(out)
    # a record that does not name its model (written before it did), or a model no longer there: nothing to judge
    (out / "moe.Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(12))
    (out / GGUF_RECORD).write_text(json.dumps({"model": str(tmp_path / "gone"), "name": "moe", "made_from": {
        "moe.Q4_K_M.gguf": "old"}}))
    check_no_stale_gguf(out)
