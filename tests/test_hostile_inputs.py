"""Issue 11's adversarial corpus: every bad input is one line on stderr and exit status 2, no traceback, and
nothing that looks finished is left behind.

As in the issue, ``D`` is the ``inputs/`` folder ``lazymoe demo`` writes and ``C`` a config whose first expert
is a copy of ``D/chat`` at ``x/``, damaged one way per case. The CLI runs in-process (``cli.main``), so a
traceback would fail the test as an exception; a few cases also run as real ``python -m lazymoe`` processes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import one_line_error

import lazymoe
from lazymoe.io import outdir
from lazymoe.cli import main
from lazymoe.errors import InsufficientResourcesError, LazyMoEError


@pytest.fixture(scope="module")
def D(tmp_path_factory) -> Path:
    from lazymoe.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("hostile") / "inputs").parent


def _demo_config(D: Path) -> dict:
    return yaml.safe_load((D / "demo.yaml").read_text(encoding="utf-8"))


def make_C(D: Path, tmp_path: Path, damage=None, **overrides) -> Path:
    """``C``: the demo config with its first expert a copy of D/chat at x/, passed to ``damage(x)``."""
    x = tmp_path / "x"
    shutil.copytree(D / "chat", x)
    if damage is not None:
        damage(x)
    cfg = _demo_config(D)
    cfg["experts"][0]["source_model"] = str(x)
    cfg.update(overrides)
    path = tmp_path / "C.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path




def assert_nothing_finished(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert not any(name.startswith(".") or name == "out" for name in left), left


# --------------------------------------------------------------------------- damaging a model folder


def rewrite_header(path: Path, change) -> None:
    """Replace a safetensors file's header by ``change(header)`` (any JSON value), keeping the data."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    new = json.dumps(change(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + size:])


def first_mlp(header: dict) -> str:
    return next(n for n in header if n.endswith("mlp.up_proj.weight"))


def _entry(change):
    def damage(x: Path) -> None:
        def edit(header):
            change(header, first_mlp(header))
            return header

        rewrite_header(x / "model.safetensors", edit)

    return damage


def _config_json(text: str):
    return lambda x: (x / "config.json").write_text(text, encoding="utf-8")


def _config_field(key, value):
    def damage(x: Path) -> None:
        cfg = json.loads((x / "config.json").read_text())
        cfg[key] = value
        (x / "config.json").write_text(json.dumps(cfg))

    return damage


def _index(weight_map_or_text):
    def damage(x: Path) -> None:
        if isinstance(weight_map_or_text, str):
            text = weight_map_or_text
        else:
            text = json.dumps(weight_map_or_text(x))
        (x / "model.safetensors.index.json").write_text(text)

    return damage


def _all_to(target: str):
    def weight_map(x: Path) -> dict:
        raw = (x / "model.safetensors").read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        names = [n for n in json.loads(raw[8:8 + size]) if n != "__metadata__"]
        return {"metadata": {}, "weight_map": {n: target for n in names}}

    return weight_map


def _truncate(fraction: float):
    def damage(x: Path) -> None:
        path = x / "model.safetensors"
        os.truncate(path, int(path.stat().st_size * fraction))

    return damage


MODEL_CASES = [
    # (id, damage, what the one line must say) -- defect 4: malformed folders
    ("header-is-a-list", lambda x: rewrite_header(x / "model.safetensors", lambda h: [h]), "header is a JSON list"),
    ("entry-without-data_offsets", _entry(lambda h, n: h[n].pop("data_offsets")), "has data_offsets None"),
    ("entry-not-a-dict", _entry(lambda h, n: h.__setitem__(n, [1, 2])), "is described by a JSON list"),
    ("config-not-json", _config_json("{bad"), "config.json is not valid JSON (line 1, column 2)"),
    ("config-a-list", _config_json("[1, 2]"), "config.json holds a JSON list, not an object"),
    ("config-field-wrong-type", _config_field("num_hidden_layers", "two"), "num_hidden_layers='two'"),
    ("config-field-bool", _config_field("hidden_size", True), "hidden_size=True"),
    ("config-field-negative", _config_field("intermediate_size", -64), "intermediate_size=-64"),
    ("config-missing-field", _config_field("hidden_size", None), "config.json has no hidden_size"),
    ("index-not-json", _index("{"), "model.safetensors.index.json is not valid JSON"),
    ("index-without-weight_map", _index(lambda x: {"metadata": {}}), "has no weight_map"),
    ("index-weight_map-a-list", _index(lambda x: {"weight_map": ["model.safetensors"]}), "has no weight_map"),
    # defect 5: truncated or inconsistent weights pass plan today and fail mid-merge
    ("truncated", _truncate(0.55), "is truncated: tensor"),
    ("truncated-in-header", lambda x: os.truncate(x / "model.safetensors", 20), "truncated inside its header"),
    ("shape-disagrees-with-offsets", _entry(lambda h, n: h[n].__setitem__("shape", [h[n]["shape"][0], 1])),
     "data_offsets span"),
    ("offsets-past-the-end", _entry(lambda h, n: h[n].__setitem__("data_offsets", [0, 10**12])), "is truncated"),
    ("offsets-reversed", _entry(lambda h, n: h[n].__setitem__("data_offsets", [8, 4])), "two integers [start, end]"),
    ("unknown-dtype", _entry(lambda h, n: h[n].__setitem__("dtype", "F8_E4M3")), "has dtype F8_E4M3"),
    ("negative-shape", _entry(lambda h, n: h[n].__setitem__("shape", [-1, 4])), "a list of non-negative integers"),
    ("float-shape", _entry(lambda h, n: h[n].__setitem__("shape", [1.5, 4])), "a list of non-negative integers"),
    # defect 9: an index that points outside the model folder is never read
    ("index-parent-path", _index(_all_to("../code/model.safetensors")), "not a file name in the model folder"),
    ("index-absolute-path", _index(_all_to("/etc/passwd")), "not a file name in the model folder"),
    ("index-dot-dot", _index(_all_to("..")), "not a file name in the model folder"),
    ("index-missing-shard", _index(_all_to("model-00009-of-00009.safetensors")), "the file is missing"),
    ("random-bytes", lambda x: (x / "model.safetensors").write_bytes(os.urandom(4096)), "not a safetensors file"),
    ("empty-weights", lambda x: (x / "model.safetensors").write_bytes(b""), "shorter than 8 bytes"),
    ("bin-weights-only", lambda x: (x / "model.safetensors").rename(x / "pytorch_model.bin"), "convert them"),
]


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_a_damaged_model_folder_is_one_line_at_plan_and_at_merge(D, tmp_path, capsys, damage, message):
    C = make_C(D, tmp_path, damage)
    line = one_line_error(capsys, ["plan", str(C)])
    assert message in line and str(tmp_path / "x") in line, line
    assert message in one_line_error(capsys, ["merge", str(C), str(tmp_path / "out")])
    assert_nothing_finished(tmp_path)


def test_the_issues_reproduction_as_a_real_process(D, tmp_path):
    # cp -r D/chat x; echo '{bad' > x/config.json; lazymoe plan C  -- and truncate -s 300000 x/model.safetensors
    for damage in (_config_json("{bad\n"), lambda x: os.truncate(x / "model.safetensors", 300000)):
        shutil.rmtree(tmp_path / "x", ignore_errors=True)
        C = make_C(D, tmp_path, damage)
        proc = subprocess.run([sys.executable, "-m", "lazymoe", "plan", str(C)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(lazymoe.__file__).parent.parent)})
        lines = proc.stderr.strip().splitlines()  # progress bars (no -q) go to stderr too, above the error
        assert proc.returncode == 2 and lines[-1].startswith("error: "), proc.stderr
        assert [line for line in lines if "error" in line.lower()] == lines[-1:]
        assert "Traceback" not in proc.stderr and "No problems found" not in proc.stdout


def test_card_on_a_folder_with_a_broken_config_json(D, tmp_path, capsys):
    out = lazymoe.merge(D / "demo.yaml", tmp_path / "moe", progress=False, max_shard_bytes="200KB")
    for text, message in [("{bad", "config.json is not valid JSON"), ("[]", "holds a JSON list"),
                          ('{"model_type": "mixtral"}', "num_local_experts=None")]:
        (out / "config.json").write_text(text)
        assert message in one_line_error(capsys, ["card", str(out)])


# --------------------------------------------------------------------------- configs and options


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "C.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _with(D: Path, **changes) -> str:
    cfg = _demo_config(D)
    cfg.update(changes)
    return yaml.safe_dump(cfg, sort_keys=False)


def _first_expert(D: Path, **changes) -> str:
    cfg = _demo_config(D)
    cfg["experts"][0].update(changes)
    return yaml.safe_dump(cfg, sort_keys=False)


def _alias_bomb(D: Path) -> str:
    """A billion-laughs config: 9**8 prompts through nested YAML aliases, in two dozen lines."""
    items, prev = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'], "a"
    for name in "bcdefgh":
        items.append(f"&{name} [" + ",".join(["*" + prev] * 9) + "]")
        prev = name
    return (f"base_model: x\nexperts:\n- source_model: x\n  positive_prompts: [{', '.join(items)}]\n"
            "- source_model: y\n  positive_prompts: *h\n")


CONFIG_CASES = [
    ("yaml-alias-bomb", _alias_bomb, "experts[0].positive_prompts[0]: Input should be a valid string"),
    ("not-utf8", lambda D: _with(D).encode() + b"# caf\xe9\n", "is not UTF-8 text (byte 0xe9"),
    ("seed-2**70", lambda D: _with(D, seed=2**70), "seed: must be a whole number from 0 to 2**63-1"),
    ("seed-negative", lambda D: _with(D, seed=-1), "seed: must be a whole number from 0"),
    ("shared_experts-5", lambda D: _with(D, shared_experts=5), "shared_experts must be a list"),
    ("shared_experts-two", lambda D: _with(D, shared_experts=[{"source_model": "a/b"}, {"source_model": "c/d"}]),
     "shared_experts has 2 entries"),
    ("source_model-no-such-user", lambda D: _first_expert(D, source_model="~nosuchuser/m"), "no such user's home"),
    ("experts_per_token-true", lambda D: _with(D, experts_per_token=True), "experts_per_token: must be a number, not true"),
    ("experts_per_token-huge", lambda D: _with(D, experts_per_token=10**30), "experts_per_token is 10000000000000"),
    ("noise_scale-true", lambda D: _first_expert(D, noise_scale=True), "noise_scale: must be a number, not true"),
    ("noise_scale-huge", lambda D: _first_expert(D, noise_scale=1e40), "noise drowns the weights"),
    ("residual_scale-huge", lambda D: _first_expert(D, residual_scale=-1e40), "keep it within ±100"),
    ("noise_scale-inf", lambda D: _first_expert(D, noise_scale=float("inf")), "must be a finite number"),
    ("duplicate-top-key", lambda D: _with(D) + "gate_mode: random\n", "the key 'gate_mode' appears twice"),
    ("duplicate-expert-key", lambda D: _with(D).replace("- source_model:", "- source_model: a/b\n  source_model:", 1),
     "the key 'source_model' appears twice"),
    ("continuation-negative", lambda D: _with(D, router_continuation_tokens=-5, gate_mode="centroid"),
     "router_continuation_tokens: must be from 0"),
    ("continuation-huge", lambda D: _with(D, router_continuation_tokens=10**9), "router_continuation_tokens: must be from 0"),
    ("revision-injection", lambda D: _first_expert(D, source_model="org/name@v1](javascript:alert(1))<img src=x onerror=a()>"),
     "is not a revision the Hub accepts"),
    ("source-with-newline", lambda D: _first_expert(D, source_model="org/na\nme"), "contains a control character"),
    ("python-tag", lambda D: "!!python/object/apply:os.system ['echo pwned']\n", "could not determine a constructor"),
    ("not-a-mapping", lambda D: "- a\n- b\n", "must be a mapping"),
    ("empty-file", lambda D: "", "must be a mapping"),
    ("tab-indented", lambda D: "base_model: a\n\texperts: []\n", "not valid YAML"),
    ("deep-nesting", lambda D: "a: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
    ("experts-a-mapping", lambda D: _with(D, experts={"a": 1}), "experts must be a list"),
    ("empty-prompt", lambda D: _first_expert(D, positive_prompts=["  "]), "positive_prompts[0] is empty"),
    ("prompts-a-number", lambda D: _first_expert(D, positive_prompts=[5]), "positive_prompts[0]"),
    ("base-a-number", lambda D: _with(D, base_model=12), "base_model"),
    ("unknown-gate-mode", lambda D: _with(D, gate_mode="hiden"), "Did you mean 'hidden'?"),
    ("prompt-longer-than-context", lambda D: _first_expert(D, positive_prompts=["chat " * 5000]),
     "tokens long but the base reads at most 4096"),
    ("config-is-a-folder", lambda D: None, "is a folder; give the YAML config file"),
    ("huge-input-repr", lambda D: _with(D, gate_mode="x" * 10000), "is not allowed"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_config_is_one_line(D, tmp_path, capsys, text, message):
    C = tmp_path if text(D) is None else _write(tmp_path, text(D))
    line = one_line_error(capsys, ["plan", str(C)])
    assert message in line, line
    assert len(line) < 600, "one readable line, not a dump of the input"


@pytest.mark.parametrize("size", ["inf", "nan", "1e400", "-5GB", "0", "0.1", "2 parsecs", "9" * 100])
def test_a_bad_max_shard_size_is_one_line(D, capsys, size):
    assert "is not a size" in one_line_error(capsys, ["plan", str(D / "demo.yaml"), f"--max-shard-size={size}"])


def test_a_chat_template_the_sandbox_blocks_is_refused_at_plan(D, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(D / "base", base)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    C = _write(tmp_path, _with(D, base_model=str(base), router_chat_template=True, gate_mode="centroid"))
    line = one_line_error(capsys, ["plan", str(C)])
    assert "chat template fails (SecurityError" in line and "router_chat_template: false" in line


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("kind", ["symlink-to-empty-folder", "dangling-symlink", "symlink-to-file", "a-file"])
def test_an_output_path_that_is_a_link_or_a_file_is_refused(D, tmp_path, capsys, kind):
    out = tmp_path / "out"
    target = tmp_path / "target"
    if kind == "symlink-to-empty-folder":
        target.mkdir()
        out.symlink_to(target)
    elif kind == "dangling-symlink":
        out.symlink_to(target)
    elif kind == "symlink-to-file":
        target.write_text("mine")
        out.symlink_to(target)
    else:
        out.write_text("mine")
    line = one_line_error(capsys, ["merge", str(D / "demo.yaml"), str(out), "--overwrite"])
    assert ("symbolic link" if "symlink" in kind else "is a file") in line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if kind == "symlink-to-file" or kind == "a-file":
        assert out.read_text() == "mine"


def test_an_output_folder_we_cannot_write_is_one_line(D, tmp_path, capsys, monkeypatch):
    # root ignores permission bits, so a read-only disk is simulated where the first write happens
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    line = one_line_error(capsys, ["merge", str(D / "demo.yaml"), str(tmp_path / "ro" / "out")])
    assert "Cannot write the output" in line and "Read-only file system" in line
    assert list((tmp_path / "ro").iterdir()) == []


def test_paths_with_spaces_and_unicode_work(D, tmp_path):
    folder = tmp_path / "mes modèles ü 😀"
    shutil.copytree(D / "chat", folder / "chat expert")
    cfg = _demo_config(D)
    cfg["experts"][0]["source_model"] = str(folder / "chat expert")
    out = lazymoe.merge(cfg, folder / "sortie « moe »", progress=False)
    assert (out / "config.json").is_file()
    assert "sortie « moe »" in (out / "README.md").read_text(encoding="utf-8")


def test_a_disk_that_fills_during_the_merge_is_one_actionable_error(D, tmp_path, monkeypatch):
    import lazymoe.moe.writer as writer

    real, calls = writer.copy_bytes, {"n": 0}

    def fills_up(info, dst):  # what os.copy_file_range raises when the disk fills
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(info, dst)

    monkeypatch.setattr(writer, "copy_bytes", fills_up)
    with pytest.raises(InsufficientResourcesError) as caught:
        lazymoe.merge(D / "demo.yaml", tmp_path / "out", progress=False)
    message = str(caught.value)
    assert "filled up while writing (No space left on device)" in message and "Free at least" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_the_disk_messages_show_the_margin_and_suggest_low_disk_only_where_it_helps(D, tmp_path, monkeypatch):
    from lazymoe.gguf import convert as gguf
    from lazymoe.pipeline import merge as merging

    monkeypatch.setattr(merging, "free_disk_bytes", lambda path: 1000)
    with pytest.raises(InsufficientResourcesError) as caught:
        lazymoe.merge(D / "demo.yaml", tmp_path / "out", progress=False)
    assert "+ 67.1 MB margin) but only 1.0 KB is free" in str(caught.value), str(caught.value)
    assert "low_disk" not in str(caught.value), "nothing is downloaded, so low-disk mode cannot help"

    free = 100 * 1024**2  # 100 MiB: enough for 50 MiB, not for 50 MiB + the 64 MiB margin
    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))
    with pytest.raises(InsufficientResourcesError) as caught:
        gguf._check_disk(tmp_path, 50 * 1024**2, "the F16 file")
    # it refuses although 100 MiB > 50 MiB, so the message shows the margin that makes the difference
    assert "about 119.5 MB needed (52.4 MB + 67.1 MB margin), 104.9 MB free" in str(caught.value), str(caught.value)


def test_a_merge_of_duplicated_experts_works(D, tmp_path):
    cfg = _demo_config(D)
    cfg["experts"][1]["source_model"] = cfg["experts"][0]["source_model"]  # chat twice, with other prompts
    out = lazymoe.merge(cfg, tmp_path / "out", progress=False)
    assert (out / "config.json").is_file()


# --------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("config", [None, 12, 3.5, ["a"], b"base_model: x"])
def test_the_python_api_refuses_a_config_of_the_wrong_type(tmp_path, config):
    with pytest.raises(LazyMoEError, match="A MoE config"):
        lazymoe.make_plan(config, progress=False)


@pytest.mark.parametrize("output_dir", [None, 12, ""])
def test_the_python_api_refuses_an_output_folder_of_the_wrong_type(D, output_dir):
    with pytest.raises(LazyMoEError, match="output folder"):
        lazymoe.merge(D / "demo.yaml", output_dir, progress=False)


def test_work_folders_are_named_after_the_output(tmp_path):
    assert outdir.final_name(".moe.lazymoe-partial-1f2e3d4c") == "moe"
    assert outdir.final_name(".my.moe.lazymoe-new") == "my.moe"
    assert outdir.final_name("moe") == "moe"


# --------------------------------------------------------------------------- model card injection (defect 8)


def test_the_card_never_turns_user_strings_into_links_or_html(D, tmp_path, capsys):
    out = lazymoe.merge(D / "demo.yaml", tmp_path / "my`moe", progress=False)
    hostile = "org/name@v1](javascript:alert(1))<img src=x onerror=alert(1)>"
    recipe = yaml.safe_load((out / "lazymoe_config.yml").read_text(encoding="utf-8"))
    recipe["experts"][0]["source_model"] = hostile
    recipe["experts"][1]["source_model"] = "org/good@refs/pr/1"
    (out / "lazymoe_config.yml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert main(["-q", "card", str(out)]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    body = card.split("\n---\n", 1)[1]  # below the YAML front matter
    body = re.sub(r"\n(`{3,}).*?\n\1\n", "\n", body, flags=re.S)  # fenced blocks (the recipe) are inert
    # shown only as code (it is not a valid Hub reference), so inert: never a link, never HTML
    assert body.count(hostile) == body.count(f"`{hostile}`") >= 1
    assert body.count("](javascript:") == body.count("<img") == body.count(hostile)
    assert "[org/good@refs/pr/1](https://huggingface.co/org/good/tree/refs%2Fpr%2F1)" in body
    assert "Replace ``your-username/my`moe`` with" in body  # the backtick stays inside the code span


# --------------------------------------------------------------------------- notebook


def test_the_notebook_steps_refuse_hostile_values_in_one_red_line(D, tmp_path):
    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.ui import Builder, StepFailed
    from lazymoe.notebook.form import MoEForm

    cfg = _demo_config(D)
    for bad, message in [({"seed": 2**70}, "seed: must be a whole number from 0 to 2**63-1"),
                         ({"experts_per_token": True}, "experts_per_token: must be a number, not true/false"),
                         ({"router_continuation_tokens": -5}, "router_continuation_tokens: must be from 0")]:
        form = MoEForm(yaml.safe_dump({**cfg, **bad}))
        assert form.last_message == ("error", f"Nothing was loaded: {form.last_message[1].split(': ', 1)[1]}")
        assert message in form.last_message[1]

    (tmp_path / "a-file").write_text("")
    shown = []
    builder = Builder(MoEForm(yaml.safe_dump({**cfg, "notebook": {"model_name": "m"}})),
                      workdir=tmp_path / "a-file" / "sub", show=shown.append)
    with pytest.raises(StepFailed, match="Cannot create the work folder"):
        builder.plan()
    assert "Traceback" not in str(shown)


@pytest.mark.parametrize("weight_map", [{"a": "../x/model.safetensors"}, {"a": "/etc/passwd"}, {"a": ["x"]},
                                        {"a": 1, "b": "model.safetensors"}, ["model.safetensors"]])
def test_push_refuses_an_index_that_points_outside_or_is_malformed(tmp_path, capsys, weight_map):
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    line = one_line_error(capsys, ["push", str(folder), "me/moe"])
    assert "model.safetensors.index.json is not a valid index" in line
