"""A hostile but realistic user, third round: what still broke across the CLI, Python and the library's checks.

Each test is one finding: the input, then exactly what the user gets (the one line, the exit status) and what
is left on disk. The CLI runs in-process (``cli.main``), so a traceback fails the test as an exception.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import moe_config, one_line_error, snapshot, stand_in_demo

import lazymoe
from lazymoe.cli import main
from lazymoe.errors import ConfigError, GGUFError, OutputExistsError
from lazymoe.io import outdir




# --------------------------------------------------------------------------- --overwrite never deletes the user's files


def test_overwrite_refuses_an_output_holding_files_of_the_users_own(recipe, merged, tmp_path, capsys):
    (merged / "routing.png").write_bytes(b"a picture lazymoe route drew")  # lazymoe's own: may be replaced
    (merged / "my notes.txt").write_text("what I tried", encoding="utf-8")
    (merged / "runs").mkdir()
    (merged / "runs" / "log.txt").write_text("mine", encoding="utf-8")
    before = snapshot(merged)

    line = one_line_error(capsys, ["merge", str(recipe), str(merged), "--overwrite"])
    assert line == (f"{merged} holds files that are not part of a merged model (my notes.txt, runs/); replacing the "
                    "folder would delete them. Move them out of it, or merge into another folder.")
    assert snapshot(merged) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "moe.yaml"]  # no work folder left beside it

    (merged / "my notes.txt").unlink()
    shutil.rmtree(merged / "runs")
    assert main(["-q", "merge", str(recipe), str(merged), "--overwrite"]) == 0
    assert not (merged / "routing.png").exists()  # the new output replaced the old one whole


def test_a_file_put_into_the_output_while_the_merge_runs_is_kept(recipe, merged, tmp_path, monkeypatch):
    def add_a_file(step: str) -> None:
        if step == "complete":  # the new output is finished, the old one not yet moved aside
            (merged / "draft.md").write_text("written meanwhile", encoding="utf-8")

    monkeypatch.setattr(outdir, "on_step", add_a_file)
    with pytest.raises(OutputExistsError) as caught:
        lazymoe.merge(recipe, merged, overwrite=True, progress=False)
    new = tmp_path / ".moe.lazymoe-new"
    assert str(caught.value) == (f"{merged} holds files that are not part of a merged model (draft.md); replacing the "
                                 "folder would delete them. Move them out of it, or merge into another folder. "
                                 f"The finished merge is in {new}.")
    assert (merged / "draft.md").read_text(encoding="utf-8") == "written meanwhile"
    assert (merged / "config.json").is_file() and (new / "config.json").is_file()


# --------------------------------------------------------------------------- eval: every option checked first


@pytest.mark.parametrize(("extra", "message"), [
    (["--compare", "moe,nobody"], "compare 'nobody': choose from moe, base, experts (e.g. moe,base,experts)."),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1."),
    (["--tasks", "arc_easy", "--limit", "0"], "your --limit argument must be at least 1 (documents per task)."),
    (["--tasks", "arc_easy", "--benchmark-compare", "all"], "compare 'all': choose from moe, base, experts"),
])
def test_eval_refuses_a_bad_later_option_before_measuring_anything(merged, tmp_path, capsys, monkeypatch, extra,
                                                                     message):
    import lazymoe.evaluate.skill as skill

    def measured(*args, **kwargs):
        raise AssertionError("the skills were measured before the bad option was refused")

    monkeypatch.setattr(skill, "write_evaluation", measured)
    questions = tmp_path / "questions.txt"
    questions.write_text("What is 2 + 2?\n", encoding="utf-8")
    line = one_line_error(capsys, ["eval", str(merged), "--questions", str(questions), *extra])
    assert line.startswith(message), line
    assert not (merged / "eval.json").exists()


def test_eval_without_lm_eval_says_so_before_measuring_anything(merged, capsys, monkeypatch):
    import importlib.util

    import lazymoe.evaluate.skill as skill

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-evaluation-harness is installed here")
    monkeypatch.setattr(skill, "write_evaluation", lambda *a, **k: pytest.fail("measured before the check"))
    line = one_line_error(capsys, ["eval", str(merged), "--tasks", "arc_easy"])
    assert line.startswith("lm-evaluation-harness is not installed")


@pytest.mark.parametrize("option", ["--texts", "--questions"])
def test_eval_files_that_are_not_utf8_text_or_are_folders_are_one_line(merged, tmp_path, capsys, option):
    what = "eval_texts file" if option == "--texts" else "Question file"
    latin1 = tmp_path / "notes.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    folder = tmp_path / "texts"
    folder.mkdir()
    for path, why in [(latin1, "is not UTF-8 text (byte 0xe9 at position 3); save it as UTF-8."),
                      (folder, "is a folder; give a file.")]:
        value = f"0={path}" if option == "--texts" else str(path)
        assert one_line_error(capsys, ["eval", str(merged), option, value, "--generate-tokens", "0"]) == \
            f"{what} {path} {why}"
    assert not (merged / "eval.json").exists()


# --------------------------------------------------------------------------- configs


def test_a_config_file_with_any_name_is_read_as_a_file(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("recipe.txt", "recipe", "recipe.YAML"):
        shutil.copy(recipe, tmp_path / name)
        plan = lazymoe.make_plan(name, progress=False)  # a str, as `lazymoe.make_plan("my-recipe")` is written
        assert plan.config.num_experts == 2 and plan.config.seed == 7
    with pytest.raises(ConfigError) as caught:
        lazymoe.make_plan("missing-recipe.txt", progress=False)
    assert str(caught.value) == ("Config file missing-recipe.txt does not exist; give the path of a YAML file, YAML "
                                 "text, a dict or a MoEConfig.")


def test_a_calibration_file_that_is_not_utf8_or_a_folder_is_one_line_at_plan(tiny_world, tmp_path, capsys):
    latin1 = tmp_path / "code.txt"
    latin1.write_bytes("def café(): pass\n".encode("latin-1"))
    (tmp_path / "docs.txt").mkdir()
    for item, why in [(latin1, "is not UTF-8 text (byte 0xe9 at position 7); save it as UTF-8."),
                      (tmp_path / "docs.txt", "is a folder; give a file.")]:
        cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="expert_classifier")
        cfg["experts"][1]["calibration_text"] = [str(item)]
        path = tmp_path / "moe.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        assert one_line_error(capsys, ["plan", str(path)]) == f"experts[1].calibration_text file {item} {why}"


def test_a_base_without_tokenizer_files_is_named_at_plan(tiny_world, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_world["base"], base)
    for name in os.listdir(base):
        if name.startswith(("tokenizer", "special_tokens")):
            (base / name).unlink()
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(moe_config(base, [tiny_world["chat"], tiny_world["code"]], gate_mode="random")))
    assert one_line_error(capsys, ["plan", str(path)]) == (
        f"base_model ({base}) has no tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        "tokenizer.model, ...). The MoE reuses the base tokenizer: add the tokenizer files of the model it was "
        "fine-tuned from.")


# --------------------------------------------------------------------------- route, gguf, chat


def test_route_refuses_an_empty_text(merged, capsys):
    pytest.importorskip("matplotlib")
    line = one_line_error(capsys, ["route", str(merged), "--text", "code", "--text", "  "])
    assert line == "Text 2 to route is blank: give some text (a sentence of the kind an expert should take)."
    assert not (merged / "routing.png").exists()


def test_gguf_into_a_file_is_one_line(merged, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine", encoding="utf-8")
    line = one_line_error(capsys, ["gguf", str(merged), "--quant", "none", "--outdir", str(target)])
    assert line == (f"your --outdir argument {target} is a file, not a folder for the GGUF files: give a new or empty "
                    f"folder, or leave it out to write them to {tmp_path / 'moe-GGUF'}.")
    assert target.read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-tokens", "0"], "your --max-tokens argument is 0: an answer needs at least 1 token."),
    (["--max-tokens", "-1", "-i"], "your --max-tokens argument is -1: an answer needs at least 1 token."),
    (["--n-ctx", "-5"], "your --n-ctx argument is -5: a context length is a whole number of tokens, 0 or more (0: the "
                        "model's own)."),
])
def test_chat_refuses_lengths_llama_cpp_cannot_use_before_loading(tmp_path, capsys, argv, message):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never loaded: the lengths are refused first
    assert one_line_error(capsys, ["chat", str(gguf), "--prompt", "hi", *argv]) == message


def test_a_prompt_longer_than_the_context_is_one_line(merged, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    from lazymoe.gguf.convert import convert_to_gguf
    from lazymoe.gguf.llama import chat

    (path,) = convert_to_gguf(merged, tmp_path / "gguf", outtype="f16", quants="none", threads=1, progress=False)
    with pytest.raises(GGUFError) as caught:
        chat(path, "word " * 400, n_ctx=64, max_tokens=4, n_threads=1)
    message = str(caught.value)
    assert message.startswith("llama.cpp could not answer within a 64-token context (") and "\n" not in message
    assert message.endswith("; pass n_ctx=... larger than 64, or give a shorter prompt.")


# --------------------------------------------------------------------------- Hub repo names


@pytest.mark.parametrize("name", ["moe-", "moe.", "me/moe.", "me./moe", "moe_", "m", "moe-1.5", "a_b/c-d.e"])
def test_the_repo_name_rule_is_the_hubs_at_the_edges(name):
    """A name the Hub refuses must be refused at plan time, not after the merge when the upload starts."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lazymoe.options import repo_name_problem

    try:
        validate_repo_id(name if "/" in name else f"me/{name}")
        hub_ok = True
    except HFValidationError:
        hub_ok = False
    assert (repo_name_problem(name) is None) is hub_ok


def test_merge_push_to_a_name_ending_in_a_dot_is_refused_before_any_work(recipe, tmp_path, capsys):
    line = one_line_error(capsys, ["merge", str(recipe), str(tmp_path / "out"), "--push", "MyMoE."])
    assert line == ("Cannot push to 'MyMoE.': 'MyMoE.' is not a valid repo name: use letters, digits, '-', '_' and '.' "
                    "(no spaces, no '--' or '..', not ending in '-', '.' or .git), at most 96 characters a part, "
                    "optionally as namespace/name.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yaml"]


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize(("command", "said"), [
    ("push", "interrupted: nothing was committed to the Hub; run the same command again to resume the upload"),
    ("card", "interrupted"),
])
def test_ctrl_c_says_what_it_left_for_the_command_that_ran(merged, capsys, monkeypatch, command, said):
    """Ctrl-C in a push used to say "no output folder was left behind", which is about merges."""
    import lazymoe.publish.card as card
    import lazymoe.publish.hub as hub

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "push_to_hub", interrupted)
    monkeypatch.setattr(card, "build_card", interrupted)
    argv = ["push", str(merged), "me/moe"] if command == "push" else ["card", str(merged)]
    assert main(["-q", *argv]) == 130
    assert capsys.readouterr().err == said + "\n"


# --------------------------------------------------------------------------- plan --output-dir


def test_plan_with_an_output_dir_says_what_merge_would_refuse(tiny_world, recipe, merged, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine", encoding="utf-8")
    cases = [
        (tmp_path / "notes.txt", [], f"{tmp_path / 'notes.txt'} exists and is a file; choose another output folder."),
        (tiny_world["chat"], [], f"The output folder {tiny_world['chat']} overlaps the input model "
                                 f"{tiny_world['chat']}; choose a separate folder (inputs are never modified)."),
        (tmp_path / "mine", ["--overwrite"], f"{tmp_path / 'mine'} already exists and is not empty: it was not made "
                                             "by lazymoe, so it is never replaced; choose an empty or new folder."),
        (merged, [], f"{merged} already exists and is not empty: add --overwrite to replace it."),
    ]
    for out, extra, message in cases:
        assert one_line_error(capsys, ["plan", str(recipe), "--output-dir", str(out), *extra]) == message
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, extra in [(merged, ["--overwrite"]), (tmp_path / "new", [])]:
        assert main(["-q", "plan", str(recipe), "--output-dir", str(out), *extra]) == 0
        assert "No problems found" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # plan creates nothing, not even a lock


# --------------------------------------------------------------------------- the notebook form


def test_a_calibration_text_edit_is_saved_at_once_and_a_problem_marks_its_own_field(tmp_path):
    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.ui import Builder

    preset = (Path(__file__).resolve().parent.parent / "notebooks" / "presets" / "demo-tiny.yaml").read_text()
    Builder._instances.clear()
    try:
        form = Builder.from_preset(preset, save_to=tmp_path, show=lambda _: None).form
        saved = tmp_path / "LazyMoE-Demo-4x.lazymoe.yaml"
        form.rows[0].calibration.value = "A chat about the weather, then about the news.\n\nA second paragraph."
        recipe = yaml.safe_load(saved.read_text(encoding="utf-8"))  # saved by this edit alone
        assert recipe["experts"][0]["calibration_text"] == ["A chat about the weather, then about the news.",
                                                            "A second paragraph."]

        # a message about an expert's calibration text, negative prompts or model marks that field
        row = form.rows[1]
        for field, widget in (("calibration_text", row.calibration), ("negative_prompts", row.negative),
                              ("source_model", row.source), ("positive_prompts", row.positive)):
            assert form._widget_named_in(f"experts[1].{field} is wrong") is widget
    finally:
        Builder._instances.clear()


@pytest.mark.parametrize("quote", ["'", '"', "`"])
def test_a_token_pasted_with_its_quotes_is_named_before_the_hub_is_asked(merged, capsys, quote):
    line = one_line_error(capsys, ["push", str(merged), "moe", "--token", f"{quote}hf_abcdefghijklmnopqrstuvwxyz{quote}"])
    assert line == ("The token from your --token argument is in quote marks (copied with them?), so it is not a Hugging "
                    "Face token (those are letters and digits after hf_). Copy it again from "
                    "https://huggingface.co/settings/tokens and paste only the token.")


def test_python_callers_may_give_model_folders_and_text_files_as_paths(tiny_world, tmp_path):
    texts = tmp_path / "chat.txt"
    texts.write_text("Hello there, how are you today?\n", encoding="utf-8")
    cfg = moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random", seed=1)
    cfg["base_model"] = Path(tiny_world["base"])  # pathlib objects, as a Python user writes them
    cfg["experts"][0].update(source_model=Path(tiny_world["chat"]), eval_texts=texts)
    cfg["experts"][1]["source_model"] = {"model": {"path": Path(tiny_world["code"])}}  # mergekit's long form
    out = lazymoe.merge(cfg, tmp_path / "moe", progress=False)
    recipe = yaml.safe_load((out / "lazymoe_config.yml").read_text(encoding="utf-8"))
    assert recipe["base_model"] == str(tiny_world["base"])
    assert [e["source_model"] for e in recipe["experts"]] == [str(tiny_world["chat"]), str(tiny_world["code"])]
    assert recipe["experts"][0]["eval_texts"] == str(texts)


def test_the_benchmarks_step_refuses_a_bad_limit_before_installing_anything(recipe, tmp_path, monkeypatch):
    pytest.importorskip("ipywidgets")
    import lazymoe.notebook.ui as ui
    from lazymoe.notebook.form import MoEForm

    lazymoe.merge(recipe, tmp_path / "moe", progress=False)
    shown = []
    builder = ui.Builder(MoEForm(recipe.read_text() + "notebook: {model_name: moe}\n"), workdir=tmp_path,
                         show=shown.append)
    monkeypatch.setattr(ui, "install_lm_eval", lambda *a, **k: pytest.fail("lm-eval was installed first"))
    with pytest.raises(ui.StepFailed):
        builder.benchmarks(run=True, limit=0)
    assert "LIMIT in step 6d must be at least 1 (documents per task)." in shown[-1].data


def test_finishing_a_stopped_swap_never_replaces_an_output_the_user_has_added_files_to(recipe, merged, tmp_path):
    """A merge killed between "the new output is complete" and "the old one is moved aside" leaves NAME and
    .NAME.lazymoe-new; the next merge finishes the swap, unless NAME has since got files of the user's own."""
    other = lazymoe.merge(yaml.safe_load(recipe.read_text()) | {"seed": 8}, tmp_path / "other", progress=False)
    new = tmp_path / ".moe.lazymoe-new"
    os.replace(other, new)
    (merged / "notes.md").write_text("added after the stop", encoding="utf-8")
    before = snapshot(merged)
    with outdir.OutputTarget(merged):  # what the next merge into it does first
        pass
    assert snapshot(merged) == before and (new / "config.json").is_file()
    (merged / "notes.md").unlink()
    with outdir.OutputTarget(merged):  # nothing of the user's in it now: the stopped swap is finished
        pass
    assert not new.exists() and (merged / "model.safetensors").read_bytes() != before["model.safetensors"]


# --------------------------------------------------------------------------- push


def test_push_never_uploads_hidden_files(hub, merged, caplog):
    from hubserver import ALICE_WRITE_TOKEN

    (merged / ".env").write_text("HF_TOKEN=hf_NotForTheHub0123456789", encoding="utf-8")
    (merged / ".ipynb_checkpoints").mkdir()
    (merged / ".ipynb_checkpoints" / "README-checkpoint.md").write_text("a Jupyter copy", encoding="utf-8")
    before = snapshot(merged)
    with caplog.at_level("WARNING", logger="lazymoe.publish.hub"):
        assert main(["-q", "push", str(merged), "moe", "--token", ALICE_WRITE_TOKEN]) == 0
    stored = hub.files("alice/moe")
    assert not [name for name in stored if name.startswith(".") and name != ".gitattributes"]
    shown = {name for name in before if not name.startswith(".")}
    assert shown <= set(stored) and "config.json" in stored
    assert "not uploading hidden files: .env, .ipynb_checkpoints/README-checkpoint.md\n" in caplog.text
    assert ".lazymoe-card.sha256" not in caplog.text, "lazymoe's own record is left out without a word"
    assert snapshot(merged) == before


def test_a_card_edited_by_hand_is_never_replaced_by_a_later_step(tiny_world, tmp_path, capsys, caplog):
    from lazymoe.io.folder import CARD_RECORD, foreign_entries
    from lazymoe.publish.card import card_edited, rerender_card
    from lazymoe.publish.hub import _card_for_repo

    out = lazymoe.merge(moe_config(tiny_world["base"], [tiny_world["chat"], tiny_world["code"]], gate_mode="random",
                                   seed=1), tmp_path / "moe", progress=False)
    card = out / "README.md"
    assert (out / CARD_RECORD).is_file() and not card_edited(out) and foreign_entries(out) == []
    assert rerender_card(out) == card  # lazymoe's own card: updated freely
    assert _card_for_repo(out, "me/moe") is not None

    edited = card.read_text(encoding="utf-8") + "\n## My notes\nTrained on my own data.\n"
    card.write_text(edited, encoding="utf-8")
    assert card_edited(out)
    with caplog.at_level("WARNING"):
        assert rerender_card(out, routing_image=None) is None  # what route / eval / publish do
    assert card.read_text(encoding="utf-8") == edited
    assert "was edited since lazymoe wrote it, so it is left as it is" in caplog.text
    assert _card_for_repo(out, "me/moe") is None  # a push uploads the user's card as it is
    line = one_line_error(capsys, ["card", str(out)])
    assert line == (f"{card} was edited since lazymoe wrote it; add --overwrite to replace it with lazymoe's card "
                    "(print it instead with --stdout).")
    assert card.read_text(encoding="utf-8") == edited
    assert main(["-q", "card", str(out), "--stdout"]) == 0 and "My notes" not in capsys.readouterr().out
    assert main(["-q", "card", str(out), "--overwrite"]) == 0
    assert "My notes" not in card.read_text(encoding="utf-8") and not card_edited(out)


# --------------------------------------------------------------------------- counts below their floor


@pytest.mark.parametrize(("argv", "message"), [
    (["eval", "{merged}", "--generate-tokens", "-1"],
     "your --generate-tokens argument is -1; it must be a whole number, 0 or more (0 writes no texts)."),
    (["gguf", "{merged}", "--threads", "-2"],
     "your --threads argument is -2; it must be a whole number, from 0 to 512 (0 uses every core, the default; "
     "llama.cpp runs at most 512 threads)."),
    (["chat", "{gguf}", "--prompt", "hi", "--threads", "-1"],
     "your --threads argument is -1; it must be a whole number, from 0 to 512 (0 uses half the cores, the default; "
     "llama.cpp runs at most 512 threads)."),
])
def test_a_negative_count_is_refused_naming_its_flag_and_range(merged, tmp_path, capsys, argv, message):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never loaded: the count is refused first
    before = snapshot(merged)
    assert one_line_error(capsys, [a.format(merged=merged, gguf=gguf) for a in argv]) == message
    assert snapshot(merged) == before  # no eval.json, no card change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "moe", "moe.yaml"]  # no moe-GGUF folder


def test_python_callers_get_the_same_count_check_in_their_words(merged, tmp_path):
    from lazymoe.evaluate.skill import evaluate
    from lazymoe.gguf.convert import convert_to_gguf, quantize_gguf
    from lazymoe.gguf.llama import chat

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for call, message in [
        (lambda: evaluate(merged, generate_tokens=-1),
         "your generate_tokens= argument is -1; it must be a whole number, 0 or more (0 writes no texts)."),
        (lambda: convert_to_gguf(merged, threads=-2, progress=False),
         "your threads= argument is -2; it must be a whole number, from 0 to 512 (0 uses every core, the default; "
         "llama.cpp runs at most 512 threads)."),
        (lambda: quantize_gguf(gguf, tmp_path / "m.Q8_0.gguf", "Q8_0", threads=True),
         "your threads= argument is True; it must be a whole number, from 0 to 512 (0 uses every core, the default; "
         "llama.cpp runs at most 512 threads)."),
        (lambda: chat(gguf, "hi", n_threads=-1),
         "your n_threads= argument is -1; it must be a whole number, from 0 to 512 (0 uses half the cores, the "
         "default; llama.cpp runs at most 512 threads)."),
    ]:
        with pytest.raises(ConfigError) as caught:
            call()
        assert str(caught.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "moe", "moe.yaml"]


# --------------------------------------------------------------------------- GGUF files stay out of model folders


@pytest.mark.parametrize("inside", ["", "gguf"])
def test_gguf_files_are_never_written_into_the_model_folder(merged, tmp_path, capsys, inside):
    """A push uploads every file of a model folder, and a merged folder holding anything but a merged model is
    refused by merge --overwrite: GGUF files inside it would go up with the model and pin the folder."""
    outdir = merged / inside if inside else merged
    before = snapshot(merged)
    line = one_line_error(capsys, ["gguf", str(merged), "--quant", "Q8_0", "--outdir", str(outdir)])
    assert line == (f"your --outdir argument {outdir} is inside the model folder {merged}: a push of that folder would "
                    f"upload the GGUF files with the model. Leave it out to write them to {tmp_path / 'moe-GGUF'}, or "
                    "give a folder outside any model folder.")
    assert snapshot(merged) == before and not (merged / "gguf").exists()
    assert not (tmp_path / "moe-GGUF").exists()


def test_gguf_files_are_never_written_into_another_model_folder(merged, tiny_world, tmp_path):
    from lazymoe.gguf.convert import convert_to_gguf

    other = tmp_path / "other"
    shutil.copytree(tiny_world["base"], other)
    before = snapshot(other)
    with pytest.raises(GGUFError) as caught:
        convert_to_gguf(merged, other, quants="Q8_0", progress=False)
    assert str(caught.value) == (f"your outdir= argument {other} is a model folder (it holds config.json): a push of "
                                 "that folder would upload the GGUF files with the model. Leave it out to write them "
                                 f"to {tmp_path / 'moe-GGUF'}, or give a folder outside any model folder.")
    assert snapshot(other) == before


def test_gguf_files_are_never_written_into_a_folder_inside_another_model_folder(merged, tiny_world, tmp_path):
    from lazymoe.gguf.convert import convert_to_gguf

    other = tmp_path / "other"
    shutil.copytree(tiny_world["base"], other)
    before = snapshot(other)
    with pytest.raises(GGUFError) as caught:
        convert_to_gguf(merged, other / "gguf" / "q8", quants="Q8_0", progress=False)
    assert str(caught.value) == (f"your outdir= argument {other / 'gguf' / 'q8'} is inside the model folder "
                                 f"{other.resolve()}: a push of that folder would upload the GGUF files with the "
                                 f"model. Leave it out to write them to {tmp_path / 'moe-GGUF'}, or give a folder "
                                 "outside any model folder.")
    assert snapshot(other) == before and not (other / "gguf").exists()


# --------------------------------------------------------------------------- push --gguf-of


def test_push_gguf_of_a_folder_without_gguf_files_stops_before_the_hub(hub, merged, tmp_path, capsys):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.errors import HubError
    from lazymoe.publish.hub import push_to_hub

    empty = tmp_path / "gguf"
    empty.mkdir()
    (empty / "notes.txt").write_text("no gguf here", encoding="utf-8")
    push = ["push", "--token", ALICE_WRITE_TOKEN, "--gguf-of", "alice/moe"]
    assert one_line_error(capsys, [*push, str(merged), "moe-GGUF"]) == (
        f"{merged} is a model folder, not a folder of GGUF files, so your --gguf-of argument (alice/moe) has nothing "
        f"to describe: make its GGUF files with `lazymoe gguf {merged}` (into {tmp_path / 'moe-GGUF'}) and push that "
        "folder, or push this one as a model without your --gguf-of argument.")
    assert one_line_error(capsys, [*push, str(empty), "moe-GGUF"]) == (
        f"{empty} holds no .gguf files, so there is nothing to push as the GGUF files of alice/moe: make them with "
        f"`lazymoe gguf MODEL_DIR --outdir {empty}` and push again.")
    with pytest.raises(HubError) as caught:
        push_to_hub(merged, "moe-GGUF", token=ALICE_WRITE_TOKEN, base_repo_id="alice/moe", progress=False)
    assert "so your base_repo_id= argument (alice/moe) has nothing to describe" in str(caught.value)
    assert hub.requests == []  # the Hub was never asked anything


# --------------------------------------------------------------------------- the demo's folder


def test_the_demo_never_overwrites_an_inputs_folder_it_did_not_write(tmp_path, capsys):
    inputs = tmp_path / "work" / "inputs"
    (inputs / "base").mkdir(parents=True)
    (inputs / "demo.yaml").write_text("my own recipe", encoding="utf-8")
    (inputs / "base" / "config.json").write_text('{"mine": true}', encoding="utf-8")
    before = snapshot(inputs)
    for extra in ([], ["--overwrite"]):
        assert one_line_error(capsys, ["demo", str(tmp_path / "work"), *extra]) == (
            f"{inputs} already exists and is not empty, and holds no record of a demo lazymoe built there "
            "(.lazymoe-demo.json), so nothing in it is replaced: give the demo another folder, or empty this one.")
    assert snapshot(inputs) == before
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["inputs"]


def test_a_demo_rebuild_replaces_only_the_files_the_demo_wrote(tmp_path):
    from lazymoe.demo import DEMO_RECORD, build_demo

    inputs = tmp_path / "inputs"
    recipe = build_demo(inputs, num_experts=2)
    recorded = json.loads((inputs / DEMO_RECORD).read_text(encoding="utf-8"))["files"]
    assert "demo.yaml" in recorded and "base/model.safetensors" in recorded and "tokenizer/tokenizer.model" in recorded
    with pytest.raises(OutputExistsError) as caught:
        build_demo(inputs, num_experts=2)
    assert str(caught.value) == (f"{inputs} holds a demo built earlier: pass overwrite=True to rebuild it (only the "
                                 "files the demo wrote are replaced), or give another folder.")

    original = recipe.read_text(encoding="utf-8")
    recipe.write_text(original + "# my note\n", encoding="utf-8")  # an edit is the user's
    (inputs / "chat" / "notes.txt").write_text("mine", encoding="utf-8")
    before = snapshot(inputs)
    with pytest.raises(OutputExistsError) as caught:
        build_demo(inputs, overwrite=True, num_experts=2)
    assert str(caught.value) == (f"{inputs} holds files the demo did not write, or that were changed since "
                                 "(chat/notes.txt, demo.yaml); rebuilding could replace them. Move them out of it, or "
                                 "give the demo another folder.")
    assert snapshot(inputs) == before

    recipe.write_text(original, encoding="utf-8")
    (inputs / "chat" / "notes.txt").unlink()
    build_demo(inputs, overwrite=True, num_experts=2)
    assert recipe.read_text(encoding="utf-8") == original
    assert json.loads((inputs / DEMO_RECORD).read_text(encoding="utf-8"))["files"].keys() == recorded.keys()


def test_a_demo_rebuild_removes_the_stale_gguf_files_and_nothing_else(merged, recipe, tmp_path, monkeypatch, capsys):
    """The GGUF files of the replaced demo model are stale (`lazymoe gguf` would even reuse them); they used to be
    kept whenever the folder held the recipe copy `lazymoe gguf` puts there, i.e. always."""
    work = tmp_path / "work"
    stand_in_demo(monkeypatch, recipe, merged)
    gguf_dir = work / "merged-GGUF"
    gguf_dir.mkdir(parents=True)
    for name in ("merged.F16.gguf", "merged.Q8_0.gguf", "lazymoe_config.yml", "notes.md"):
        (gguf_dir / name).write_text(name, encoding="utf-8")
    assert main(["-q", "demo", str(work)]) == 0
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["notes.md"]  # the user's note stays
    (gguf_dir / "notes.md").unlink()
    (gguf_dir / "merged.Q8_0.gguf").write_text("stale", encoding="utf-8")
    assert main(["-q", "demo", str(work), "--overwrite"]) == 0
    assert not gguf_dir.exists()

    # the GGUF card `publish` wrote goes with them; once edited by hand it is the user's, and keeps the folder
    from lazymoe.publish.gguf_card import write_gguf_card

    for edit in (False, True):
        gguf_dir.mkdir()
        (gguf_dir / "merged.Q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
        card = write_gguf_card(gguf_dir, base_repo_id="alice/merged")
        if edit:
            card.write_text("my own card\n", encoding="utf-8")
        assert main(["-q", "demo", str(work), "--overwrite"]) == 0
        if edit:
            assert sorted(p.name for p in gguf_dir.iterdir()) == [".lazymoe-card.sha256", "README.md"]
            assert card.read_text(encoding="utf-8") == "my own card\n"
        else:
            assert not gguf_dir.exists()
    capsys.readouterr()


def test_the_notebook_evaluate_step_refuses_a_negative_count_in_one_red_line(merged, recipe, tmp_path):
    pytest.importorskip("ipywidgets")
    from lazymoe.notebook.form import MoEForm
    from lazymoe.notebook.ui import Builder, StepFailed

    text = yaml.safe_dump({**yaml.safe_load(recipe.read_text(encoding="utf-8")), "notebook": {"model_name": "moe"}})
    shown = []
    builder = Builder(MoEForm(text), workdir=tmp_path, show=shown.append)
    assert builder.output_dir == merged
    before = snapshot(merged)
    with pytest.raises(StepFailed) as caught:
        builder.evaluate(generate_tokens=-1)
    message = "your generate_tokens= argument is -1; it must be a whole number, 0 or more (0 writes no texts)."
    assert str(caught.value) == f"Evaluate: {message}"
    assert message in str(shown[-1].data) and "Traceback" not in str(shown)
    assert snapshot(merged) == before
