"""The notebook steps (lazymoe.notebook.ui.Builder) on tiny real checkpoints, without a kernel: what each step shows."""

from __future__ import annotations

import hashlib
import json
import weakref

import pytest

pytest.importorskip("ipywidgets")

from helpers import moe_config  # noqa: E402

from lazymoe.notebook import ui  # noqa: E402
from lazymoe.config import load_config  # noqa: E402
from lazymoe.notebook.ui import Builder, StepFailed  # noqa: E402
from lazymoe.notebook.form import MoEForm  # noqa: E402


class Screen(list):
    """What a step displayed, as the HTML the notebook would render."""

    def html(self) -> str:
        return "\n".join(d for item in self if isinstance(d := getattr(item, "data", None), str))

    def images(self) -> list[bytes]:
        return [d for item in self if isinstance(d := getattr(item, "data", None), bytes)]


@pytest.fixture
def builder(tiny_world, tmp_path):
    """A form over the tiny world's base and three experts, output under tmp_path/tiny-moe."""
    import yaml

    config = moe_config(tiny_world["base"], [tiny_world[n] for n in ("chat", "code", "math")])
    preset = yaml.safe_dump({**config, "license": "mit", "notebook": {"model_name": "tiny-moe"}})
    screen = Screen()
    b = Builder(MoEForm(preset), workdir=tmp_path, show=screen.append)
    b.screen, b.preset = screen, preset
    return b


@pytest.fixture(autouse=True)
def _fresh_builders():
    Builder._instances.clear()
    yield
    Builder._instances.clear()


def test_plan_merge_and_try_show_what_happened(builder, tmp_path):
    plan = builder.plan()
    shown = builder.screen.html()
    assert plan.config.num_experts == 3
    assert "lazymoe-resources" in shown and "Disk: merge" in shown and "This runtime has" in shown
    assert "lazymoe-error" not in shown

    builder.screen.clear()
    out = builder.merge()
    assert out == tmp_path / "tiny-moe" and builder.model_dir == out
    assert f"Merged model written to {out}" in builder.screen.html()
    assert load_config(out / "lazymoe_config.yml") == builder.form.to_config().model_copy(
        update={"seed": load_config(out / "lazymoe_config.yml").seed})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    assert "license: mit" in (out / "README.md").read_text(), "the card carries the form's licence"

    builder.screen.clear()
    results = builder.try_model(max_new_tokens=4)
    from lazymoe.gguf.llama import expert_prompts

    assert [r["prompt"] for r in results] == [p for _, p in expert_prompts(builder.form.to_config())]
    for r in results:
        assert len(r["share"]) == 3 and abs(sum(r["share"]) - 1) < 1e-5 and isinstance(r["text"], str)
    assert "Routing share per expert" in builder.screen.html()


def test_merge_reuses_the_plan_only_while_the_form_is_unchanged(builder, monkeypatch):
    import sys

    merging = sys.modules["lazymoe.pipeline.merge"]
    seen = []
    real = merging.merge
    monkeypatch.setattr(merging, "merge", lambda *a, **k: seen.append(k["plan"]) or real(*a, **k))
    plan = builder.plan()
    builder.merge()
    builder.form.rows[0].positive.value = "a different first prompt"
    builder.merge()
    assert seen[0] is plan and seen[1] is None


def test_low_disk_mode_reaches_the_plan(builder):
    assert builder.plan().low_disk is False
    builder.form.low_disk.value = True
    assert builder.plan().low_disk is True


def test_optional_steps_say_they_are_off(builder):
    assert builder.push() is None and builder.gguf() is None and builder.chat() is None
    shown = builder.screen.html()
    assert "Upload is off" in shown and "GGUF is off" in shown and "nothing to chat with" in shown


def test_a_step_that_fails_shows_one_red_line_and_stops_run_all(builder, tmp_path):
    builder.form.base_model.value = str(tmp_path / "no-such-model")
    with pytest.raises(StepFailed) as caught:
        builder.plan()
    shown = builder.screen.html()
    assert "lazymoe-error" in shown and "no-such-model" in shown and "Traceback" not in shown
    (line,) = caught.value._render_traceback_()  # what IPython prints instead of a traceback
    assert "Plan" in line and "red message above" in line


def test_steps_after_merge_act_on_the_model_the_form_names(builder):
    with pytest.raises(StepFailed):
        builder.try_model()
    assert "run the Merge step first" in builder.screen.html()
    builder.merge()
    builder.form.model_name.value = "renamed"  # not merged under this name: nothing to try or upload
    builder.screen.clear()
    with pytest.raises(StepFailed):
        builder.try_model()
    assert f"There is no merged model at {builder.workdir / 'renamed'} yet" in builder.screen.html()


def test_an_invalid_form_stops_the_step_with_the_form_message(builder):
    builder.form.experts_per_token.value = 7
    with pytest.raises(StepFailed, match="experts_per_token is 7"):
        builder.merge()
    assert not (builder.workdir / "tiny-moe").exists()


def test_build_button_runs_every_step(builder, tmp_path):
    builder.form.build_button.click()
    assert (tmp_path / "tiny-moe" / "config.json").is_file()
    shown = builder.screen.html()
    for phrase in ("lazymoe-resources", "Merged model written", "Routing of tiny-moe", "Routing share", "Upload is off",
                   "GGUF is off"):
        assert phrase in shown
    routing_png, eval_png = builder.screen.images()
    assert routing_png.startswith(b"\x89PNG") and routing_png == (tmp_path / "tiny-moe" / "routing.png").read_bytes()
    # shown at their own size: a notebook that shrinks them to the cell's width makes their numbers unreadable
    assert [item.unconfined for item in builder.screen if isinstance(item, ui.Image)] == [True, True]
    assert eval_png == (tmp_path / "tiny-moe" / "eval.png").read_bytes()
    for phrase in ("Gain kept", "lazymoe-answers"):  # steps 6b and 6c
        assert phrase in shown
    card = (tmp_path / "tiny-moe" / "README.md").read_text()
    assert "](routing.png)" in card and "](eval.png)" in card and "## Questions, side by side" in card


def test_build_button_with_a_bad_form_only_shows_the_message(builder, tmp_path):
    builder.form.model_name.value = "bad name"
    builder.form.build_button.click()
    assert builder.form.last_message[0] == "error" and not builder.screen
    assert not (tmp_path / "bad name").exists()


def test_rerunning_the_form_cell_keeps_the_edits():
    text = "base_model: a/b\nexperts:\n- {source_model: c/d, positive_prompts: [x]}\n- {source_model: e/f, positive_prompts: [y]}\n"
    first = Builder.from_preset(text, show=lambda _: None)
    first.form.model_name.value = "edited"
    again = Builder.from_preset(text, show=lambda _: None)
    assert again is first and again.form.settings().model_name == "edited"
    assert again.form.last_message == ("info", "Your edits were kept. “Reset to preset” starts over.")
    other = Builder.from_preset(text + "gate_mode: cheap_embed\n", show=lambda _: None)
    assert other is not first and other.form.to_config().gate_mode == "cheap_embed"


def test_an_unreadable_preset_is_a_red_message_not_a_traceback():
    screen = Screen()
    with pytest.raises(StepFailed):
        Builder.from_preset("base_model: [broken\n", show=screen.append)
    assert "The PRESET in this cell cannot be read: The preset is not valid YAML at line 2" in screen.html()


def test_a_preset_with_fixable_problems_still_opens_the_form():
    builder = Builder.from_preset("base_model: a/b\nexperts: []\n", show=lambda _: None)
    assert builder.form.last_message[0] == "error" and "at least 2 experts" in builder.form.last_message[1]


def test_push_uploads_with_the_typed_token_and_never_shows_it(builder, hub):
    from hubserver import ALICE_WRITE_TOKEN

    builder.merge()
    builder.form.upload.value = True
    builder.form.token_box.value = ALICE_WRITE_TOKEN
    pushed = builder.push()
    assert (pushed.repo_id, pushed.url) == ("alice/tiny-moe", f"{hub.url}/alice/tiny-moe")
    files = hub.files("alice/tiny-moe")
    assert {"config.json", "lazymoe_config.yml", "model.safetensors"} <= set(files)
    assert ALICE_WRITE_TOKEN not in builder.screen.html()
    assert ALICE_WRITE_TOKEN not in json.dumps(builder.form.widget.get_state(), default=str)


def test_with_upload_ticked_the_merge_step_uploads_while_merging_in_one_commit(builder, hub, monkeypatch):
    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.publish.hub import StreamingPush

    handed = []
    add = StreamingPush.add_shard
    monkeypatch.setattr(StreamingPush, "add_shard", lambda self, path: (handed.append(path.name), add(self, path)))
    builder.form.upload.value = True
    builder.form.token_box.value = ALICE_WRITE_TOKEN
    builder.form.max_shard.value = "200KB"
    out = builder.merge()
    assert len(handed) > 1 and len(hub.requests_of("commit", status=200)) == 1, "each shard went up as written"
    files = hub.files("alice/tiny-moe")
    assert set(handed) <= set(files) and all(files[n].data == (out / n).read_bytes() for n in handed)
    assert builder.repo_id == "alice/tiny-moe"
    assert f"Merged and uploaded to {hub.url}/alice/tiny-moe" in builder.screen.html()
    builder.route()  # later steps read the kept shards; the Upload step sends what they changed
    hub.reset_counters()
    pushed = builder.push()
    assert pushed.repo_id == "alice/tiny-moe" and "routing.png" in hub.files("alice/tiny-moe")
    sent = {r.path.rsplit("/", 1)[-1] for r in hub.requests_of("lfs-upload")}
    assert not sent & {hashlib.sha256((out / n).read_bytes()).hexdigest() for n in handed}, "no shard is sent again"
    assert ALICE_WRITE_TOKEN not in builder.screen.html()


def test_where_the_disk_cannot_hold_the_output_an_upload_keeps_no_shard(builder, hub, monkeypatch, tmp_path):
    import dataclasses

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.runtime.machine import probe

    builder.form.upload.value = True
    builder.form.token_box.value = ALICE_WRITE_TOKEN
    builder.form.max_shard.value = "100KB"
    plan = builder.plan()
    small = dataclasses.replace(probe(tmp_path), disk_free=plan.streamed_disk_bytes() + 1)  # < plan.disk_bytes
    monkeypatch.setattr(ui, "probe", lambda path=".": small)
    builder.plan()
    shown = builder.screen.html()
    assert "uploads each shard as it is written and deletes it" in shown and "fits, each shard deleted" in shown
    out = builder.merge()
    assert list(out.glob("*.safetensors")) == [] and "each shard was deleted once uploaded" in builder.screen.html()
    assert (out / ".lazymoe-hub.json").is_file() and ".lazymoe-hub.json" not in builder.screen.html(), \
        "the file table shows the model's files, not lazymoe's own records"
    assert builder.route() is None and "on the Hub only" in builder.screen.html(), "skipped, and Run all goes on"
    assert builder.push() is builder.pushed and len(hub.requests_of("commit", status=200)) == 1


def test_after_a_kernel_restart_the_steps_that_read_hub_only_weights_are_skipped_naming_the_repo(
        builder, hub, monkeypatch, tmp_path):
    import dataclasses
    import functools

    from hubserver import ALICE_WRITE_TOKEN

    from lazymoe.runtime.machine import probe

    def tick(b):
        b.form.upload.value = b.form.gguf.value = True
        b.form.token_box.value = ALICE_WRITE_TOKEN
        b.form.max_shard.value = "100KB"

    tick(builder)
    plan = builder.plan()
    small = dataclasses.replace(probe(tmp_path), disk_free=plan.streamed_disk_bytes() + 1)  # < plan.disk_bytes
    monkeypatch.setattr(ui, "probe", lambda path=".": small)
    out = builder.merge()
    assert list(out.glob("*.safetensors")) == []
    pushed = builder.pushed
    assert pushed is not None and pushed.files > 1 and pushed.commit == hub.repos["alice/tiny-moe"].branches["main"]

    Builder._instances.clear()  # a new kernel: nothing of the session that merged is left but the folder
    screen = Screen()
    again = Builder(MoEForm(builder.preset), workdir=tmp_path, show=screen.append)
    tick(again)
    url = f"{hub.url}/alice/tiny-moe"
    note = (f"The merged weights are on the Hub only ({url}): each shard was deleted once uploaded, as this disk "
            "cannot hold them all. This step reads them here, so it is skipped.")
    benchmarks = functools.partial(again.benchmarks, run=True)
    for step in (again.route, again.try_model, again.evaluate, again.ask, benchmarks, again.gguf, again.chat):
        screen.clear()
        assert step() is None and note in screen.html() and "lazymoe-error" not in screen.html(), step
    screen.clear()
    # what the Upload step returns is the merging session's report, read back from the folder's record
    assert again.push() == pushed and f"Uploaded while merging: {url} (the weights are on the Hub only)." in screen.html()
    assert again.repo_id == "alice/tiny-moe" and len(hub.requests_of("commit", status=200)) == 1, "nothing sent again"

    # a folder merged before the record kept the upload's report: the same notice, and nothing to return
    import json

    record = out / ".lazymoe-hub.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k in ("repo_id", "endpoint", "commit")}))
    Builder._instances.clear()
    screen.clear()
    older = Builder(MoEForm(builder.preset), workdir=tmp_path, show=screen.append)
    tick(older)
    assert older.push() is None and f"Uploaded while merging: {url} (the weights are on the Hub only)." in screen.html()
    assert len(hub.requests_of("commit", status=200)) == 1


def test_a_merged_folder_whose_shards_were_deleted_by_hand_is_one_red_line_in_each_step(builder, tmp_path):
    out = builder.merge()
    for shard in out.glob("*.safetensors"):
        shard.unlink()
    for step in (builder.route, builder.try_model, builder.evaluate):
        builder.screen.clear()
        with pytest.raises(StepFailed):
            step()
        assert f"{out} lacks its weight files (model" in builder.screen.html() and "Merge again (tick" in \
            builder.screen.html(), step.__name__


def test_push_without_any_token_says_how_to_get_one(builder, hub):
    builder.merge()
    builder.form.upload.value = True
    with pytest.raises(StepFailed):
        builder.push()
    assert "No Hugging Face token found" in builder.screen.html()


def test_prepare_demo_builds_once(tmp_path):
    screen = Screen()
    folder = ui.prepare_demo(tmp_path / "demo", show=screen.append)
    assert {p.name for p in folder.iterdir()} >= {"base", "chat", "code", "math", "stories"}
    assert "Built the demo models" in screen.html()
    stamp = (folder / "base" / "model.safetensors").stat().st_mtime_ns
    ui.prepare_demo(tmp_path / "demo", show=screen.append)
    assert "already in" in screen.html() and (folder / "base" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.llama
def test_gguf_step_converts_uploads_as_name_gguf_and_chats(builder, hub):
    pytest.importorskip("llama_cpp")
    from hubserver import ALICE_WRITE_TOKEN

    builder.merge()
    form = builder.form
    form.gguf.value, form.quants.value = True, ("Q8_0",)
    form.upload.value, form.token_box.value = True, ALICE_WRITE_TOKEN
    files = builder.gguf()  # uploads the model first (for its repo id), then the GGUF folder
    assert [p.name for p in files] == ["tiny-moe.F16.gguf", "tiny-moe.Q8_0.gguf"]
    assert builder.repo_id == "alice/tiny-moe"
    stored = hub.files("alice/tiny-moe-GGUF")
    assert {"tiny-moe.F16.gguf", "tiny-moe.Q8_0.gguf", "README.md"} <= set(stored)
    gguf_card = (files[0].parent / "README.md").read_text()
    assert "base_model_relation: quantized" in gguf_card and "alice/tiny-moe" in gguf_card
    assert "alice/tiny-moe-GGUF" in (builder.model_dir / "README.md").read_text(), "the local card links the GGUF repo"

    answers = builder.chat(n_threads=1, max_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert "Answers from tiny-moe.Q8_0.gguf" in builder.screen.html()
    later = Builder(builder.form, workdir=builder.workdir, show=lambda _: None)  # a new session finds the files
    assert later.chat(n_threads=1, max_tokens=2) is not None and later.gguf_files == files
    assert ALICE_WRITE_TOKEN not in builder.screen.html()

    # merged again (the same name, another seed): a new session does not chat with the earlier model's files
    form.upload.value = False
    form.overwrite.value, form.seed.value = True, "99"
    builder.merge()
    screen = Screen()
    fresh = Builder(builder.form, workdir=builder.workdir, show=screen.append)
    with pytest.raises(StepFailed):
        fresh.chat(n_threads=1, max_tokens=2)
    assert "There are no GGUF files of this model yet: run the GGUF step first." in screen.html()
    assert all(p.is_file() for p in files), "the earlier files stay until the GGUF step replaces them"


def test_a_failed_step_hides_the_progress_bar_it_left_open():
    """A loop left by an exception keeps its bar open (grey, "0/4") until it is garbage-collected; the failed
    step closes it and hides it, so only the red message is left."""
    from tqdm.notebook import tqdm as notebook_tqdm

    from lazymoe.errors import ConfigError

    bars, shown = [], []

    class Step:
        def _show(self, obj):
            shown.append(obj)

        @ui._step("Merge")
        def run(self):
            bars.append(notebook_tqdm(total=4, desc="Router: fitting"))  # never closed: grey at 0/4
            bars.append(notebook_tqdm(total=2, desc="finished"))
            bars[-1].update(2)
            bars[-1].close()
            self.headers()

        @ui._step("Plan")  # a step inside a step (the Build button runs them all)
        def headers(self):
            bar = notebook_tqdm(range(5), desc="Reading model headers")
            bars.append(bar)
            # what tqdm's monitor thread does with the registry while a step watches it
            assert bar in ui.std_tqdm._instances.copy() and earlier in ui.std_tqdm._instances.copy()
            for i in bar:  # the exception closes this one at once, red at 3/5
                if i == 3:
                    raise ConfigError("the red message")

    earlier = notebook_tqdm(total=3, desc="a bar from before the step")  # not the step's: left as it is
    with pytest.raises(StepFailed):
        Step().run()
    stale, finished, stopped = bars
    assert stopped.n == 3 and stopped.disable  # closed by the exception itself, unfinished
    for bar in (stale, stopped):
        assert bar.disable and bar.container.layout.display == "none"  # closed and hidden
    assert finished.container.layout.display != "none"  # a bar that ended at 100% stays, green
    assert not earlier.disable and earlier.container.layout.display != "none"
    assert "the red message" in shown[-1].data
    assert set(ui.std_tqdm._instances) == {earlier} and type(ui.std_tqdm._instances) is weakref.WeakSet
    earlier.close()
