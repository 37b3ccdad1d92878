"""A hostile but realistic user, fourth round: a demo stopped by Ctrl-C, thread counts llama.cpp cannot run, GGUF
folders that are not lazymoe's to fill, reused GGUF files cut short, and the words of the one line.

Each test is one finding: the input, then exactly what the user gets and what is left on disk, and for each the
library's check that CLI, Python and notebook share.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import moe_config, one_line_error, snapshot

import lazymoe
from lazymoe.cli import main
from lazymoe.errors import ConfigError, GGUFError, OutputExistsError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# --------------------------------------------------------------------------- a demo stopped by Ctrl-C


def test_a_demo_stopped_by_ctrl_c_runs_again(tmp_path):
    """Ctrl-C while `lazymoe demo` builds its models used to leave inputs/ without the demo's record, which the next
    `lazymoe demo` refused as a folder of the user's own: the user had to delete it by hand."""
    from lazymoe.demo import DEMO_RECORD, finished_demo

    work, inputs = tmp_path / "work", tmp_path / "work" / "inputs"
    cmd = [sys.executable, "-m", "lazymoe", "demo", str(work), "-q"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (inputs / "tokenizer" / "tokenizer.model").is_file():  # mid-build: the tokenizer, no model yet
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    # one Ctrl-C was lost once in a loaded full run (the demo ran to its end; a library's bare `except:` around
    # an optional import is the likely cause, not proven), so it is pressed again, as a user would, until the
    # demo stops; 2 s apart, so a press never lands in the exit of the one before
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None and not (inputs / "demo.yaml").exists():
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted"), (out, err)
    assert inputs.is_dir() and not (inputs / "demo.yaml").exists() and not finished_demo(inputs)
    assert "building" in json.loads((inputs / DEMO_RECORD).read_text(encoding="utf-8"))
    assert not (work / "merged").exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert finished_demo(inputs) and (work / "merged" / "config.json").is_file()


def test_a_demo_stopped_during_its_merge_runs_again(tmp_path, monkeypatch, capsys):
    """Stopped during the merge (whose output is all or nothing), the demo left finished inputs and no merged
    model; the same command then refused the inputs as "a demo built earlier" until --overwrite was added."""
    import lazymoe.pipeline.merge as merging

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    work = tmp_path / "work"
    with monkeypatch.context() as m:
        m.setattr(merging, "merge", stopped)
        assert main(["-q", "demo", str(work)]) == 130
    assert not (work / "merged").exists()
    assert main(["-q", "demo", str(work)]) == 0
    assert (work / "merged" / "config.json").is_file()
    capsys.readouterr()


def _stop_at_model(monkeypatch, n: int) -> None:
    """Make the demo's ``n``-th model (1: the base) stop as Ctrl-C would, after transformers wrote part of it."""
    import lazymoe.demo as demo

    real, calls = demo.build_model, []

    def build_model(out_dir, **kwargs):
        calls.append(out_dir)
        if len(calls) == n:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "config.json").write_text("{}", encoding="utf-8")  # save_pretrained writes this first
            raise KeyboardInterrupt
        return real(out_dir, **kwargs)

    monkeypatch.setattr(demo, "build_model", build_model)


def test_a_stopped_demo_build_is_started_again_and_never_takes_a_file_of_the_users(tmp_path, monkeypatch):
    from lazymoe.demo import build_demo, finished_demo

    inputs = tmp_path / "inputs"
    with monkeypatch.context() as m:
        _stop_at_model(m, 2)
        with pytest.raises(KeyboardInterrupt):
            build_demo(inputs, num_experts=2)
    assert (inputs / "chat" / "config.json").is_file() and not finished_demo(inputs)
    (inputs / "notes.txt").write_text("mine", encoding="utf-8")  # a file of the user's own, beside the stopped build
    with pytest.raises(OutputExistsError) as caught:
        build_demo(inputs, num_experts=2)
    assert str(caught.value) == (f"{inputs} holds files a demo build that was stopped did not write (notes.txt); "
                                 "rebuilding could replace them. Move them out of it, or give the demo another folder.")
    assert (inputs / "notes.txt").read_text(encoding="utf-8") == "mine"
    (inputs / "notes.txt").unlink()
    recipe = build_demo(inputs, num_experts=2)  # no overwrite needed: a stopped build is nothing to keep
    assert finished_demo(inputs) and yaml.safe_load(recipe.read_text(encoding="utf-8"))["experts"][1]["source_model"]
    assert json.loads((inputs / "chat" / "config.json").read_text(encoding="utf-8"))["model_type"] == "llama"


def test_a_stopped_rebuild_over_an_earlier_demo_is_started_again(tmp_path, monkeypatch):
    """--overwrite deleted the earlier demo's record first, then its files: stopped in between, the folder had
    neither record nor a whole demo, and was refused as the user's."""
    from lazymoe.demo import build_demo, finished_demo

    inputs = tmp_path / "inputs"
    build_demo(inputs, num_experts=3)
    with monkeypatch.context() as m:
        _stop_at_model(m, 1)
        with pytest.raises(KeyboardInterrupt):
            build_demo(inputs, overwrite=True, num_experts=2)
    assert not finished_demo(inputs) and not (inputs / "math").exists()  # the earlier demo's files are gone
    build_demo(inputs, num_experts=2)
    assert finished_demo(inputs)
    assert sorted(p.name for p in inputs.iterdir()) == [".lazymoe-demo.json", "base", "chat", "code", "demo.yaml",
                                                        "tokenizer"]


def test_the_notebook_rebuilds_demo_models_a_stopped_build_left(tmp_path, monkeypatch):
    """The notebook's demo step skipped the build whenever each model folder held a config.json, which a build
    stopped inside a model's save already leaves."""
    pytest.importorskip("ipywidgets")
    from lazymoe.demo import build_demo, finished_demo
    from lazymoe.notebook.ui import prepare_demo

    folder = tmp_path / "lazymoe-demo"
    with monkeypatch.context() as m:
        _stop_at_model(m, 5)  # the last expert: every folder has its config.json, the last has nothing else
        with pytest.raises(KeyboardInterrupt):
            build_demo(folder)
    assert all((folder / p / "config.json").is_file() for p in ("base", "chat", "code", "math", "stories"))
    shown = []
    assert prepare_demo(folder, show=shown.append) == folder
    assert finished_demo(folder) and list((folder / "stories").glob("*.safetensors"))
    assert "Built the demo models" in str(shown[-1].data)


# --------------------------------------------------------------------------- thread counts llama.cpp cannot run

_MOST = "it must be a whole number, from 0 to 512 ({}; llama.cpp runs at most 512 threads)."
_EVERY, _HALF = "0 uses every core, the default", "0 uses half the cores, the default"


@pytest.mark.parametrize(("argv", "message"), [
    (["gguf", "{merged}", "--threads", "100000"], "your --threads argument is 100000; " + _MOST.format(_EVERY)),
    (["gguf", "{merged}", "--threads", "513"], "your --threads argument is 513; " + _MOST.format(_EVERY)),
    (["chat", "{gguf}", "--prompt", "hi", "--threads", "100000"],
     "your --threads argument is 100000; " + _MOST.format(_HALF)),
    (["chat", "{gguf}", "-i", "--threads", "100000"], "your --threads argument is 100000; " + _MOST.format(_HALF)),
])
def test_a_thread_count_llama_cpp_cannot_run_is_refused_before_any_work(merged, tmp_path, capsys, argv, message):
    """--threads 100000 reached llama.cpp, which crashed (a segfault in chat, bad_alloc in the quantiser)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never loaded: the count is refused first
    before = snapshot(merged)
    assert one_line_error(capsys, [a.format(merged=merged, gguf=gguf) for a in argv]) == message
    assert snapshot(merged) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "moe", "moe.yaml"]  # no moe-GGUF folder


def test_python_and_the_notebook_get_the_same_thread_limit(merged, recipe, tmp_path):
    from lazymoe.gguf.convert import convert_to_gguf, quantize_gguf
    from lazymoe.gguf.llama import chat, chat_loop
    from lazymoe.options import LLAMA_MAX_THREADS

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for call, message in [
        (lambda: convert_to_gguf(merged, threads=100000, progress=False),
         "your threads= argument is 100000; " + _MOST.format(_EVERY)),
        (lambda: quantize_gguf(gguf, tmp_path / "m.Q8_0.gguf", "Q8_0", threads=LLAMA_MAX_THREADS + 1),
         "your threads= argument is 513; " + _MOST.format(_EVERY)),
        (lambda: chat(gguf, "hi", n_threads=100000), "your n_threads= argument is 100000; " + _MOST.format(_HALF)),
        (lambda: chat_loop(gguf, n_threads=100000, read=lambda: "hi"),
         "your n_threads= argument is 100000; " + _MOST.format(_HALF)),
    ]:
        with pytest.raises(ConfigError) as caught:
            call()
        assert str(caught.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "moe", "moe.yaml"]

    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.form import MoEForm
    from lazymoe.notebook.ui import Builder, StepFailed

    import json

    from lazymoe.gguf.files import model_fingerprint

    (tmp_path / "moe-GGUF").mkdir()
    (tmp_path / "moe-GGUF" / "moe.Q8_0.gguf").write_bytes(b"GGUF")  # an earlier session's file: never loaded
    (tmp_path / "moe-GGUF" / ".lazymoe-gguf.json").write_text(  # made from this model, as its record says
        json.dumps({"made_from": {"moe.Q8_0.gguf": model_fingerprint(merged)}}))
    notebook = {"model_name": "moe", "gguf": True, "quants": ["Q8_0"]}
    text = yaml.safe_dump({**yaml.safe_load(recipe.read_text(encoding="utf-8")), "notebook": notebook})
    shown = []
    builder = Builder(MoEForm(text), workdir=tmp_path, show=shown.append)
    with pytest.raises(StepFailed) as caught:
        builder.chat(n_threads=100000)
    assert str(caught.value) == "Chat: your n_threads= argument is 100000; " + _MOST.format(_HALF)
    assert "Traceback" not in str(shown)


# --------------------------------------------------------------------------- GGUF folders that are not lazymoe's to fill


@pytest.mark.parametrize("where", ["root", "home"])
def test_gguf_refuses_the_filesystem_root_and_the_home_folder(merged, tmp_path, capsys, monkeypatch, where):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("mine", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    target, said = (Path("/"), "the filesystem root") if where == "root" else (home, "your home folder")
    before = sorted(os.listdir(target))
    line = one_line_error(capsys, ["gguf", str(merged), "--quant", "none", "--outdir", str(target), "--overwrite"])
    assert line == (f"your --outdir argument {target} is {said}: give the GGUF files a folder of their own (such as "
                    f"{target / 'moe-GGUF'}), or leave it out to write them to {tmp_path / 'moe-GGUF'}.")
    assert sorted(os.listdir(target)) == before and not (tmp_path / "moe-GGUF").exists()


def test_gguf_refuses_a_folder_of_the_users_own_files_unless_told(merged, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    mine = tmp_path / "papers"
    mine.mkdir()
    for name in ("a.pdf", "b.pdf", "notes.md", "todo.txt"):
        (mine / name).write_text(name, encoding="utf-8")
    (mine / "drafts").mkdir()
    before = snapshot(mine)
    line = one_line_error(capsys, ["gguf", str(merged), "--quant", "none", "--outdir", str(mine)])
    assert line == (f"your --outdir argument {mine} holds files lazymoe did not write there (a.pdf, b.pdf, drafts/ "
                    "and 2 more), so the GGUF files would mix with them: give a new or empty folder, or add "
                    "--overwrite to write them beside those (files of the same names are replaced).")
    assert snapshot(mine) == before and not (tmp_path / "moe-GGUF").exists()

    assert main(["-q", "gguf", str(merged), "--quant", "none", "--outdir", str(mine), "--overwrite"]) == 0
    assert {**before, "moe.F16.gguf": (mine / "moe.F16.gguf").read_bytes(),
            "lazymoe_config.yml": (mine / "lazymoe_config.yml").read_bytes(),
            ".lazymoe-gguf.json": (mine / ".lazymoe-gguf.json").read_bytes()} == snapshot(mine)
    capsys.readouterr()


def test_gguf_writes_again_into_a_gguf_folder_lazymoe_made(merged, tmp_path, capsys):
    """The folder an earlier `lazymoe gguf` (and `publish`'s card) filled is lazymoe's: reused without --overwrite."""
    pytest.importorskip("llama_cpp")
    from lazymoe.publish.gguf_card import write_gguf_card

    out = tmp_path / "moe-GGUF"
    assert main(["-q", "gguf", str(merged), "--quant", "none"]) == 0
    write_gguf_card(out, base_repo_id="alice/moe")
    f16 = (out / "moe.F16.gguf").stat().st_mtime_ns
    assert main(["-q", "gguf", str(merged), "--quant", "none"]) == 0
    assert (out / "moe.F16.gguf").stat().st_mtime_ns == f16  # reused, not made again
    assert sorted(p.name for p in out.iterdir()) == [".lazymoe-card.sha256", ".lazymoe-gguf.json", "README.md",
                                                     "lazymoe_config.yml", "moe.F16.gguf"]
    capsys.readouterr()


def test_the_default_gguf_folder_holding_files_of_the_users_own_is_refused_in_every_front_end(merged, tmp_path):
    from lazymoe.gguf.convert import convert_to_gguf
    from lazymoe.pipeline.release import release

    out = tmp_path / "moe-GGUF"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    message = (f"{out} holds files lazymoe did not write there (holiday.jpg), so the GGUF files would mix with them: "
               "move them out of it and run again.")
    for call in (lambda: convert_to_gguf(merged, quants="none", progress=False),
                 lambda: release(merged, gguf=True, quants="none", progress=False)):
        with pytest.raises(GGUFError) as caught:
            call()
        assert str(caught.value) == message
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


# --------------------------------------------------------------------------- reused GGUF files cut short


def test_a_truncated_f16_file_in_the_gguf_folder_is_made_again(merged, tmp_path, capsys, caplog):
    """A cut-short F16 file (a copy that stopped, a disk that filled outside lazymoe) was reused, and the quantiser
    then failed with llama.cpp's message about tensor data out of bounds."""
    pytest.importorskip("llama_cpp")
    from lazymoe.gguf.header import gguf_problem

    out = tmp_path / "moe-GGUF"
    assert main(["-q", "gguf", str(merged), "--quant", "none"]) == 0
    f16 = out / "moe.F16.gguf"
    whole = f16.read_bytes()
    f16.write_bytes(whole[: len(whole) * 2 // 3])
    assert gguf_problem(f16) == (f"it is {len(whole) * 2 // 3:,} bytes but its header describes {len(whole):,}: it "
                                 "was cut short")
    capsys.readouterr()
    assert main(["-q", "gguf", str(merged), "--quant", "Q8_0"]) == 0
    assert f16.read_bytes() == whole and gguf_problem(out / "moe.Q8_0.gguf") is None
    notices = [r.getMessage() for r in caplog.records if r.name == "lazymoe.gguf" and r.levelname == "WARNING"]
    assert notices == [f"{f16} is not a whole GGUF file (it is {len(whole) * 2 // 3:,} bytes but its header describes "
                       f"{len(whole):,}: it was cut short); making it again."]
    capsys.readouterr()


def test_a_truncated_quantised_file_is_made_again_too(merged, tmp_path):
    pytest.importorskip("llama_cpp")
    from lazymoe.gguf.convert import convert_to_gguf

    f16, q8 = convert_to_gguf(merged, quants="Q8_0", threads=1, progress=False)
    whole = q8.read_bytes()
    q8.write_bytes(whole[:100])  # cut inside its header
    assert convert_to_gguf(merged, quants="Q8_0", threads=1, progress=False) == [f16, q8]
    assert q8.read_bytes() == whole


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory, tiny_world) -> bytes:
    """A real F16 file from llama.cpp's converter (the tiny two-expert merge)."""
    pytest.importorskip("llama_cpp")
    from lazymoe.gguf.convert import convert_to_gguf

    root = tmp_path_factory.mktemp("gguf-header")
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=7)
    (path,) = convert_to_gguf(lazymoe.merge(cfg, root / "moe", progress=False), quants="none", progress=False)
    return path.read_bytes()


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda b: b, None),  # whole: the header's last tensor ends exactly at the end of the file
    (lambda b: b + b"\0" * 7, None),  # longer is llama.cpp's business, not a cut
    (lambda b: b[:-1], "it is {n:,} bytes but its header describes {whole:,}: it was cut short"),  # one byte short
    (lambda b: b[:2], "it does not start with GGUF's magic bytes"),
    (lambda b: b[:30], "its header runs past the end of the file: it was cut short or is damaged"),  # in a key
    (lambda b: b"GGUF" + (1).to_bytes(4, "little") + b[8:], "it is GGUF version 1; llama.cpp writes versions 2 and 3"),
    (lambda b: b[:8] + (2**40).to_bytes(8, "little") + b[16:],
     "its header runs past the end of the file: it was cut short or is damaged"),  # a count no file could hold
    (lambda b: b"<html>not found</html>", "it does not start with GGUF's magic bytes"),  # a download gone wrong
])
def test_the_gguf_header_check_names_what_is_wrong(real_gguf, tmp_path, damage, problem):
    from lazymoe.gguf.header import gguf_problem

    path = tmp_path / "m.F16.gguf"
    path.write_bytes(damage(real_gguf))
    expected = problem and problem.format(n=path.stat().st_size, whole=len(real_gguf))
    assert gguf_problem(path) == expected


# --------------------------------------------------------------------------- the words of the one line


def test_card_names_the_flag_the_user_typed_for_a_bad_repo_id(merged, tmp_path, capsys):
    """`card --gguf-of "not a repo"` said "base_repo_id (the merged model's Hub id) 'not a repo' must be ...": the
    Python parameter, to a user who typed a flag."""
    from lazymoe.errors import CardError
    from lazymoe.gguf.files import GGUFFile
    from lazymoe.publish.gguf_card import build_gguf_card

    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "moe.Q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
    tail = "'not a repo' must be a full Hub repo id, namespace/name (like me/MyMoE-4x7B)."
    assert one_line_error(capsys, ["card", str(gguf), "--gguf-of", "not a repo"]) == f"your --gguf-of argument {tail}"
    assert one_line_error(capsys, ["card", str(merged), "--repo-id", "not a repo"]) == f"your --repo-id argument {tail}"
    assert one_line_error(capsys, ["card", str(merged), "--gguf-repo", "not a repo"]) == (
        f"your --gguf-repo argument {tail}")
    with pytest.raises(CardError) as caught:
        build_gguf_card([GGUFFile("moe.Q8_0.gguf", 68)], base_repo_id="not a repo")
    assert str(caught.value) == f"your base_repo_id= argument {tail}"
    assert not (gguf / "README.md").exists()


@pytest.mark.parametrize("argv", [["--max-shard-size", "-5GB"], ["--max-shard-size", "-0.5"],
                                  ["--max-shard-size=-5GB"]])
def test_a_negative_size_after_a_space_is_the_same_one_line(recipe, capsys, argv):
    """`--max-shard-size -5GB` (a space, not `=`) got argparse's usage block: it took -5GB for a flag."""
    size = argv[-1].split("=")[-1]
    assert one_line_error(capsys, ["plan", str(recipe), *argv]) == (
        f"--max-shard-size: {size!r} is not a size; write a positive size like 2GB, 500MB or 1.5GiB.")


def test_a_full_disk_says_so_and_what_to_do_not_check_the_path(merged, capsys, monkeypatch):
    """A disk that filled up where no step expected it ended in "...: No space left on device; check the path"."""
    import lazymoe.publish.card as card

    def full(folder, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "README.md"))

    monkeypatch.setattr(card, "write_card_text", full)
    assert one_line_error(capsys, ["card", str(merged), "--overwrite"]) == (
        f"The disk at {merged} filled up while writing (No space left on device). Free space there (or choose an "
        "output folder on a larger disk) and run again.")


def test_the_demo_on_a_full_disk_is_one_line_in_every_front_end(tmp_path, capsys, monkeypatch):
    import lazymoe.demo as demo
    from lazymoe.errors import InsufficientResourcesError

    def full(out_dir, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(demo, "build_model", full)
    inputs = tmp_path / "work" / "inputs"
    message = (f"The disk at {inputs} filled up while writing (No space left on device). Free space there (or choose "
               "an output folder on a larger disk) and run again.")
    with pytest.raises(InsufficientResourcesError) as caught:
        demo.build_demo(inputs)
    assert str(caught.value) == message
    assert one_line_error(capsys, ["demo", str(tmp_path / "work")]) == message


def test_every_error_line_starts_with_the_one_prefix():
    """The prefix of the one line was spelled out in each place that printed one; now errors.ERROR_PREFIX is the
    only spelling, and no module writes its own."""
    from lazymoe.errors import ERROR_PREFIX, error_line

    assert error_line("a\nb   c") == ERROR_PREFIX + "a b c" and ERROR_PREFIX == "error: "
    spelled = re.compile(r"""["'](?:[Ee]rror|ERROR):""")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in [*ROOT.joinpath("lazymoe").rglob("*.py"),
                                                          *ROOT.joinpath("tools").glob("*.py")]
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if spelled.search(line) and path.name != "errors.py" and "startswith" not in line]
    assert found == []


def test_a_broken_hub_base_tokenizer_is_not_called_a_folder(tiny_world, tmp_path):
    import dataclasses

    from lazymoe.config import load_config
    from lazymoe.errors import ModelMismatchError
    from lazymoe.io.sources import ModelRef, describe
    from lazymoe.moe.checks import check_tokenizer

    snapshot_dir = tmp_path / "snapshot"
    shutil.copytree(tiny_world["base"], snapshot_dir)
    (snapshot_dir / "tokenizer.json").write_text("{not json", encoding="utf-8")
    config = load_config(moe_config("alice/base", [tiny_world["chat"], tiny_world["code"]], gate_mode="random"))
    local = describe(ModelRef.parse(str(snapshot_dir)))
    for base, kind in ((dataclasses.replace(local, ref=ModelRef.parse("alice/base")), "repo"), (local, "folder")):
        with pytest.raises(ModelMismatchError) as caught:
            check_tokenizer(config, base)
        assert str(caught.value).endswith(f"The MoE reuses the base tokenizer, so the base {kind}'s tokenizer files "
                                          "must load: repair them, or use a base whose tokenizer loads.")
