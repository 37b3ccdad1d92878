"""The notebook's logic: one call per cell, each reading the form as it is now.

    from lazymoe.notebook import ui
    ui.setup()                                  # 1. what this runtime has
    moe = ui.Builder.from_preset(PRESET_YAML)   # 2. the form (re-running keeps the user's edits)
    moe.show()
    moe.plan(); moe.merge(); moe.route(); moe.try_model()   # 3-6
    moe.evaluate(); moe.ask()                   # 6b-6c: skills kept, your questions side by side
    moe.push(); moe.gguf(); moe.chat()          # 7-9, each skipped unless ticked in the form

A step that fails because of something the user can fix shows one red line and raises :class:`StepFailed`,
whose traceback IPython renders as a single line: *Run all* stops at the real cause instead of carrying on
into a misleading error, and nobody has to read a traceback. Bugs keep their full traceback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from IPython.display import HTML, Image, display
from tqdm.std import tqdm as std_tqdm

from .. import demo
from .._version import __version__
from ..config import MoEConfig, load_config
from ..errors import LazyMoEError, OutputNotWritableError, StepFailed, WeightsOnHubError, worded
from ..gguf.files import current_gguf_files, preferred_gguf
from ..gguf.install import LLAMA_CPP_PYTHON_VERSION
from ..gguf.llama import chat as gguf_chat
from ..gguf.llama import expert_prompts
from ..io.folder import (CONFIG_FILENAME, LAZYMOE_RECORDS, is_lazymoe_output, missing_weights, read_hub_record,
                         require_weights)
from ..options import DEFAULT_ANSWER_TOKENS, NotebookSettings
from ..pipeline import merge as merging
from ..pipeline.preflight import blocking, check_ahead
from ..pipeline.release import ReleaseResult, release
from ..pipeline.route import write_routing_picture
from ..publish.card import CARD_FILENAME, ROUTING_IMAGE, card_kept_because, detected_extras, rerender_card
from ..evaluate.benchmarks import check_benchmark_options, run_benchmarks, write_benchmarks
from ..evaluate.questions import Question, answer_questions, questions_from_config, write_answers
from ..evaluate.skill import write_evaluation
from ..publish.eval_report import EVAL_IMAGE, benchmark_table
from ..publish.hub import PushResult
from ..units import human_bytes
from .eval_views import answers_html, retention_html
from .form import MoEForm
from .recipe import DRIVE_MOUNT, RecipeFile, locate, recipe_folder, restore, saved_when
from .recipe import dump as dump_recipe
from ..colab import in_colab
from ..runtime.fit import resource_needs, shortages, streams
from ..runtime.install import install_llama_cpp, install_lm_eval
from ..runtime.load import choose_loading, free_memory, load_merged, routing_and_generation, stored_dtype
from ..runtime.machine import probe
from .html import Raw, checks_html, error_html, notice_html, plan_html, runtime_html, table_html
from .words import form_words

__all__ = ["Builder", "StepFailed", "setup", "prepare_demo"]


def _display(obj: Any) -> None:
    display(obj)


def _html(markup: str) -> HTML:
    return HTML(markup)


def setup(path: str | Path = ".", *, installed: bool = False, show: Callable[[Any], None] = _display):
    """Report where lazymoe came from and what this runtime has (GPU, RAM, disk)."""
    runtime = probe(path)
    show(_html(runtime_html(runtime, lazymoe_version=__version__,
                            lazymoe_path=str(Path(__file__).resolve().parents[1]), installed=installed)))
    return runtime


def prepare_demo(folder: str | Path = "lazymoe-demo", *, show: Callable[[Any], None] = _display) -> Path:
    """Build the tiny offline demo models into ``folder`` (skipped when they are already there)."""
    folder = Path(folder)
    parts = ["base", *demo.DEMO_EXPERTS]
    if demo.finished_demo(folder) and all((folder / p / "config.json").is_file() for p in parts):
        show(_html(notice_html(f"The demo models are already in {folder}/: {', '.join(parts)}.", "ok")))
        return folder
    try:
        demo.build_demo(folder, overwrite=True)  # the step rebuilds its own files only; anything else is refused
    except LazyMoEError as err:
        show(_html(error_html(worded(err, form_words))))
        raise StepFailed("Build the demo models", str(err)) from None
    rows = [(p, human_bytes(sum(f.stat().st_size for f in (folder / p).iterdir()))) for p in parts]
    built = f"Built the demo models in {folder}/ (tiny random weights: answers will be gibberish)."
    show(_html(notice_html(built, "ok") + table_html(rows, ("Model", "Size"))))
    return folder


class _Watched(weakref.WeakSet):
    """tqdm's registry of live bars (``tqdm._instances``), also noting each bar added to it in ``started``
    (and in the ``started`` of the watches it sits inside: a step run by another step)."""

    def __init__(self, live=(), started: weakref.WeakSet | None = None) -> None:
        self.started_sets: list[weakref.WeakSet] = []  # the live bars copied in were not started in the block
        super().__init__(live)
        # ``copy()`` (tqdm's monitor thread calls it) builds one from a watch alone: it keeps that watch's sets
        self.started_sets = [*getattr(live, "started_sets", []), *([started] if started is not None else [])]

    def add(self, item) -> None:
        for started in self.started_sets:
            started.add(item)
        super().add(item)


@contextlib.contextmanager
def _bars_started() -> Iterator[weakref.WeakSet]:
    """Every progress bar created inside the block. tqdm drops a bar from its registry when it closes, and a
    loop left by an exception closes its bar at once (red, unfinished), so the registry is watched while the
    block runs rather than compared before and after."""
    started: weakref.WeakSet = weakref.WeakSet()
    with std_tqdm.get_lock():
        previous = std_tqdm._instances
        std_tqdm._instances = _Watched(previous, started)
    try:
        yield started
    finally:
        with std_tqdm.get_lock():  # back to the registry it replaced, holding the bars live now
            live = set(std_tqdm._instances)
            for bar in [b for b in previous if b not in live]:
                previous.discard(bar)
            for bar in live - set(previous):
                previous.add(bar)
            std_tqdm._instances = previous


def close_failed_bars(bars) -> None:
    """Close the unfinished bars a failed step started and hide their widgets: a bar stopped at "0/4" (grey,
    never closed) or "3/5" (red) above the step's red message says nothing the message does not."""
    for bar in list(bars):
        if bar.total and bar.n >= bar.total:
            continue  # it finished (green, 100%): what it did still happened
        bar.close()
        container = getattr(bar, "container", None)  # tqdm.notebook's widget row (absent for text bars)
        if container is not None:
            container.layout.display = "none"


class _Skipped(Exception):
    """A step that cannot run here and says why (an info line; *Run all* goes on)."""


def _step(title: str):
    """Run a step: our errors become one red line plus :class:`StepFailed`; anything else propagates."""

    def wrap(method):
        @functools.wraps(method)
        def run(self: Builder, *args, **kwargs):
            with _bars_started() as bars:
                try:
                    return method(self, *args, **kwargs)
                except _Skipped as skipped:
                    self._notice(str(skipped), "info")
                    return None
                except StepFailed:
                    close_failed_bars(bars)
                    raise
                except LazyMoEError as err:
                    close_failed_bars(bars)
                    self._show(_html(error_html(worded(err, form_words))))  # the form's words for any setting
                    raise StepFailed(title, str(err)) from None

        return run

    return wrap


class Builder:
    """The form plus the steps that act on it. One per preset per kernel (see :meth:`from_preset`)."""

    _instances: dict[str, Builder] = {}

    def __init__(self, form: MoEForm, *, workdir: str | Path | None = None, show: Callable[[Any], None] = _display):
        self.form = form
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        self._show = show
        self._plan = None
        self._plan_key: tuple | None = None
        self.model_dir: Path | None = None
        self.repo_id: str | None = None  # namespace/name once uploaded
        self.pushed: PushResult | None = None  # the upload the Merge step made while merging
        self.gguf_files: list[Path] = []
        self.recipe_file: RecipeFile | None = None  # where the form's edits are saved (from_preset's save_to)
        form.on_build(self._build_from_button)

    @classmethod
    def from_preset(cls, preset_text: str, *, save_to: str | Path | None = None, **kwargs) -> Builder:
        """The form for this preset; re-running the cell returns the same one, so edits survive *Run all*.

        ``save_to``: ``"here"`` (next to the notebook), ``"drive"`` (Google Drive, Colab only) or a folder.
        Every edit is then saved there at once, and restored when the cell runs in a new kernel or after
        the PRESET text was edited (field by field, the later edit wins: see :mod:`lazymoe.notebook.recipe`).
        """
        key = hashlib.sha256(f"{preset_text}\0{save_to}".encode()).hexdigest()
        builder = cls._instances.get(key)
        if builder is not None:
            where = f" (saved in {builder.recipe_file.path})" if builder.recipe_file else ""
            builder.form.show_notice(f"Your edits were kept{where}. “Reset to preset” starts over.", "info")
            return builder
        show = kwargs.get("show", _display)
        try:
            form = MoEForm(preset_text)
            folder = recipe_folder(save_to, in_colab=in_colab()) if save_to is not None else None
        except LazyMoEError as err:  # a preset that is not even a mapping: nothing to show a form for
            show(_html(error_html(f"The PRESET in this cell cannot be read: {err}")))
            raise StepFailed("Your MoE", str(err)) from None
        builder = cls._instances[key] = cls(form, **kwargs)
        if folder is not None:
            notebook = form._preset.notebook if form._preset else {}
            builder._keep_edits(locate(folder, notebook.get("title"), notebook.get("model_name") or "recipe"),
                                preset_text)
        return builder

    def _keep_edits(self, file: RecipeFile, preset_text: str) -> None:
        """Restore the edits saved in ``file`` (if any), then save every further edit there."""
        form = self.form
        self.recipe_file = file
        saved = file.load()
        message = None
        if saved is not None:
            try:
                restored = restore(saved.text, saved.preset_text, preset_text)
            except LazyMoEError as err:
                copy = file.keep_copy("unreadable")
                form.show_error(f"The saved edits in {file.path} could not be read ({err}); the form shows the "
                                f"preset. The file was kept as {copy}.")
            else:
                copy = file.keep_copy("before-preset-edit") if restored.replaced_edits else None
                valid = form.import_yaml(dump_recipe(restored.recipe), quiet=True, reset=True)
                message = f"Restored your edits from {file.path} (saved {saved_when(saved.saved_at)})."
                if restored.from_preset:
                    message += (f" The PRESET text in this cell changed since, so these come from it: "
                                f"{', '.join(restored.from_preset)}; your other edits are kept.")
                if copy is not None:
                    message += (f" That replaced your form edits of {', '.join(restored.replaced_edits)}; the "
                                f"file as it was is kept as {copy.name}.")
                message += " “Reset to preset” starts over."
                if valid:
                    form.show_notice(message, "info")
        file.save(form.recipe_yaml(), preset_text)
        self._saved_note()
        if message and form.last_message and form.last_message[0] == "error":
            form.saved_note.value += f"<div style='color:#555'>{html.escape(message)}</div>"

        def save() -> None:
            file.save(form.recipe_yaml(), preset_text)
            self._saved_note()

        def before_reset() -> str | None:
            copy = file.keep_copy("before-reset")
            return f"Your edits before the reset are kept in {copy}." if copy else None

        form.on_change(save)
        form.on_before_reset(before_reset)

    def _saved_note(self) -> None:
        file = self.recipe_file
        volatile = (" In Colab this folder survives a runtime restart but not a disconnect: choose Google Drive in "
                    "this cell to keep edits across sessions." if in_colab() and not str(file.path).startswith(
                        str(DRIVE_MOUNT)) else "")
        self.form.saved_note.value = (
            f"<span style='color:#555'>💾 Every edit is saved to <code>{html.escape(str(file.path))}</code> "
            f"(last saved {saved_when(file.path.stat().st_mtime)}) and restored when this cell runs again."
            f"{html.escape(volatile)}</span>")

    def show(self) -> None:
        self._show(self.form.widget)

    # ------------------------------------------------------------------ shared

    def values(self) -> tuple[MoEConfig, NotebookSettings]:
        """The form's config and settings, validated (ConfigError names the field)."""
        return self.form.to_config(), self.form.settings()

    @property
    def output_dir(self) -> Path:
        return self.workdir / self.form.settings().folder_name

    def _notice(self, text: str, kind: str = "info") -> None:
        self._show(_html(notice_html(text, kind)))

    def _require_model(self) -> Path:
        """The finished model the form's name points at (merged now or in an earlier session), its weights on
        this disk (a step that reads them is skipped, with a note, when they went to the Hub only: the merge
        recorded where in the folder, so this holds after a kernel restart too)."""
        folder = self.output_dir
        if not is_lazymoe_output(folder):
            raise LazyMoEError(f"There is no merged model at {folder} yet: run the Merge step first.")
        if folder != self.model_dir:  # another model than the last one: its GGUF files and repo are unknown
            copy = read_hub_record(folder)  # a merge in an earlier session that uploaded it
            self.model_dir, self.gguf_files, self.pushed = folder, [], None
            self.repo_id = copy.repo_id if copy is not None else None
        try:
            require_weights(folder)
        except WeightsOnHubError as err:
            raise _Skipped(f"The merged weights are on the Hub only ({err.url}): each shard was deleted once "
                           f"uploaded, as this disk cannot hold them all. This step reads them here, so it is skipped.") from None
        return folder

    def _key(self, config: MoEConfig, settings: NotebookSettings) -> tuple:
        """What a plan and its checks depend on: a plan made for other values (or before a token was
        typed) is never reused by the merge, which then checks again."""
        return config.to_yaml(), settings, self.form.token is not None

    # ------------------------------------------------------------------ 3. plan

    @_step("Plan")
    def plan(self):
        """Check the models from their headers and show sizes against this runtime's disk, RAM and GPU."""
        config, settings = self.values()
        try:
            self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputNotWritableError(
                f"Cannot create the work folder {self.output_dir.parent} ({err.strerror}); choose one you can write to."
            ) from None
        runtime = probe(self.output_dir.parent)
        ahead = self._check_ahead(settings, runtime)  # token, repo, llama.cpp: seconds, before any model is read
        try:
            plan = merging.make_plan(config, max_shard_bytes=settings.max_shard_bytes, low_disk=settings.low_disk)
        except LazyMoEError:
            self._show(_html(checks_html(ahead)))  # every problem at once, not only the models'
            raise
        self._plan, self._plan_key = plan, self._key(config, settings)
        quants = settings.quants if settings.gguf else ()
        self._show(_html(plan_html(plan, runtime, gguf_quants=quants, ahead=ahead, upload=settings.upload)))
        short = shortages(resource_needs(plan, runtime, gguf_quants=quants,
                                         streamed=streams(plan, runtime, settings.upload)))
        problems = [f"{n.what}: too little" for n in short] + [f"{c.step}: {worded(c.message, form_words)}"
                                                               for c in blocking(ahead)]
        if problems:
            self._plan_key = None  # a blocked plan never lets the merge start
            raise StepFailed("Plan", "; ".join(problems))
        return plan

    def _check_ahead(self, settings: NotebookSettings, runtime) -> list:
        """What the ticked Upload and GGUF steps need (preflight.check_ahead); the GGUF disk row is in the
        resource table, so it is left out here."""
        return check_ahead(push_repo=settings.model_name if settings.upload else None, private=settings.private,
                           token=self.form.token, colab_secret=settings.hf_secret or "HF_TOKEN",
                           gguf_quants=settings.quants if settings.gguf else None, in_colab=runtime.in_colab,
                           has_gpu=runtime.has_gpu, gguf_disk=False)

    # ------------------------------------------------------------------ 4. merge

    @_step("Merge")
    def merge(self) -> Path:
        """Build the MoE into ``workdir/<model name>``; progress bars show each phase. With Upload ticked, each
        shard goes to the Hub while the next is written and one commit lands at the end (the Upload step then
        sends only what later steps add); where this disk cannot hold the output, each shard is deleted once
        uploaded (``runtime.fit.streams``)."""
        config, settings = self.values()
        fresh = self._plan is not None and self._plan_key == self._key(config, settings)
        runtime = probe(self.output_dir.parent)
        if not fresh:  # Plan was skipped or made for other values: the later steps' needs still come first
            ahead = self._check_ahead(settings, runtime)
            if blocking(ahead):
                self._show(_html(checks_html(ahead)))
                raise StepFailed("Merge", "; ".join(f"{c.step}: {worded(c.message, form_words)}"
                                                    for c in blocking(ahead)))
        options = dict(max_shard_bytes=settings.max_shard_bytes, low_disk=settings.low_disk,
                       overwrite=settings.overwrite, progress=True)
        if not settings.upload:
            out = merging.merge(config, self.output_dir, plan=self._plan if fresh else None, **options)
            self.model_dir, self.gguf_files, self.repo_id, self.pushed = out, [], None, None
            done = f"Merged model written to {out}"
        else:
            plan = self._plan if fresh else merging.make_plan(config, max_shard_bytes=settings.max_shard_bytes,
                                                              low_disk=settings.low_disk)
            keep = not streams(plan, runtime, upload=True)
            out, pushed = merging.merge_and_push(config, self.output_dir, settings.model_name, keep=keep,
                                                 private=settings.private, token=self.form.token,
                                                 colab_secret=settings.hf_secret or "HF_TOKEN", plan=plan, **options)
            self.model_dir, self.gguf_files, self.repo_id, self.pushed = out, [], pushed.repo_id, pushed
            done = (f"Merged and uploaded to {pushed.url} in one commit" + (
                f"; {out} holds the small files only (each shard was deleted once uploaded)" if not keep else
                f", and written to {out}"))
        files = sorted(p for p in out.iterdir() if p.is_file() and p.name not in LAZYMOE_RECORDS)  # the user's view
        rows = [(p.name, human_bytes(p.stat().st_size)) for p in files]
        self._show(_html(notice_html(done, "ok") + table_html(rows, ("File", "Size"))))
        return out

    @_step("Routing")
    def route(self):
        """Route each expert's prompts through the merged model, show the picture, embed it in the card."""
        folder = self._require_model()
        report = write_routing_picture(folder, progress=True, update_card=False)
        self._card(folder, repo_id=self.repo_id, **detected_extras(folder))  # the picture in the card
        table, *_ = report.summary().split("\nwarning: ")
        self._show(_html(f"<pre>{html.escape(table)}</pre>"))
        for message in report.warnings:
            self._notice(message, "warn")
        # at its own size (a scroll bar where the page is narrower): shrunk to fit, its numbers cannot be read
        self._show(Image(filename=str(folder / ROUTING_IMAGE), unconfined=True))
        return report

    # ------------------------------------------------------------------ 5. try

    @_step("Try it")
    def try_model(self, max_new_tokens: int = 24) -> list[dict] | None:
        """Generate from one prompt per expert and show which experts the router picked for it."""
        folder = self._require_model()
        config = load_config(folder / CONFIG_FILENAME)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        choice = choose_loading(size, probe(folder), dtype=stored_dtype(folder))
        if choice.device is None:
            self._notice(f"Skipped: {choice.reason}", "warn")
            return None
        self._notice(f"Loading the merged model: {choice.reason}", "info")
        model, tokenizer = load_merged(folder, choice)
        prompts = [prompt for _, prompt in expert_prompts(config)]
        try:
            results = routing_and_generation(model, tokenizer, prompts, config.experts_per_token, max_new_tokens)
        finally:
            del model
            free_memory()  # the GPU is needed next (GGUF chat), and Colab's RAM is small
        rows = []
        for i, r in enumerate(results):
            share = " ".join(f"<b>{100 * s:.0f}%</b>" if j == i else f"{100 * s:.0f}%"
                             for j, s in enumerate(r["share"]))
            rows.append((f"experts[{i}]", r["prompt"], r["text"], Raw(share)))
        self._show(_html(table_html(rows, ("Expert", "Prompt", "Generated", "Routing share per expert (own in bold)"))))
        return results

    # ------------------------------------------------------------------ 6b-6c. evaluate

    def _eval_config(self, folder: Path) -> MoEConfig:
        """The recipe whose eval_texts and eval_questions apply: the form's while it names this model's experts
        (so texts and questions edited after the merge count), else the one saved with the model."""
        saved = load_config(folder / CONFIG_FILENAME)
        try:
            config = self.form.to_config()
        except LazyMoEError:
            return saved
        same = [e.source_model for e in config.experts] == [e.source_model for e in saved.experts]
        return config if same else saved

    def _show_image(self, path: Path) -> None:
        self._show(Image(filename=str(path), unconfined=True))  # at its own size, as the routing picture

    @_step("Evaluate")
    def evaluate(self, **options):
        """Did the MoE keep its experts' skills? Loss of base, expert and MoE and routing, per expert (eval.json)."""

        folder = self._require_model()
        config = self._eval_config(folder)
        texts = {i: e.eval_texts for i, e in enumerate(config.experts) if e.eval_texts is not None}
        # a low-disk merge deleted its downloads: fetch each source again, one at a time, and delete it once measured
        options.setdefault("download", True)
        options.setdefault("release", self.form.settings().low_disk)
        report = write_evaluation(folder, texts=texts or None, progress=True, update_card=False, **options)
        self._card(folder, repo_id=self.repo_id, **detected_extras(folder))
        self._show(_html(retention_html(report)))
        self._show_image(folder / EVAL_IMAGE)
        return report

    @_step("Questions")
    def ask(self, compare: str = "moe,base", *, in_card: bool = True, max_new_tokens: int = DEFAULT_ANSWER_TOKENS) -> dict:
        """Answer the config's eval_questions with the MoE (and ``compare``: base, experts), side by side."""

        folder = self._require_model()
        config = self._eval_config(folder)
        questions = questions_from_config(config)
        if not questions:
            questions = [Question(prompt, i) for i, (_, prompt) in enumerate(expert_prompts(config))]
            self._notice("The config has no eval_questions, so each expert gets one question made from its prompts. "
                         "Add your own as eval_questions (per expert, or at the top level) in the YAML box.")
        result = answer_questions(folder, questions, compare=compare, max_new_tokens=max_new_tokens, download=True,
                                  release=self.form.settings().low_disk)
        md, _ = write_answers(folder, result, in_card=in_card)
        self._card(folder, repo_id=self.repo_id, **detected_extras(folder))
        self._show(_html(answers_html(result)))
        self._notice(f"Saved as {md.name} and answers.json in {folder}" + (" (shown in the model card)" if in_card else ""),
                     "ok")
        return result

    @_step("Benchmarks")
    def benchmarks(self, run: bool = False, tasks: str = "default", limit: int | None = 100,
                   compare: str = "moe") -> dict | None:
        """lm-evaluation-harness on the MoE (and ``compare``: base, experts), only when ``run``; results in the card."""
        if not run:
            self._notice("Benchmarks are off: tick RUN_BENCHMARKS in this cell to run lm-evaluation-harness "
                         "(a few minutes per task and model on a T4 with the default limit).")
            return None

        folder = self._require_model()
        check_benchmark_options(tasks, limit=limit, compare=compare)  # a bad LIMIT says so before the install
        install_lm_eval(probe(folder), self._notice)
        result = run_benchmarks(folder, tasks, limit=limit, compare=compare, download=True,
                                release=self.form.settings().low_disk)
        write_benchmarks(folder, result)
        self._card(folder, repo_id=self.repo_id, **detected_extras(folder))
        table = benchmark_table(result)
        self._show(_html(table_html([tuple(r) for r in table["rows"]], tuple(table["header"]))))
        for item in table["skipped"]:
            self._notice(f"Not run: {item}", "warn")
        return result

    # ------------------------------------------------------------------ 6. upload

    def _card(self, folder: Path, **options) -> None:
        """Re-render the local model card with what is known now (repo ids, GGUF files, evaluations)."""
        kept = card_kept_because(folder)
        if kept:
            self._card_kept(folder / CARD_FILENAME, kept)
        else:
            rerender_card(folder, **{k: v for k, v in options.items() if v})

    def _card_kept(self, card: Path, why: str) -> None:
        """Say that ``card`` is the user's and stays as it is (an upload sends it as it is)."""
        self._notice(f"{card} {why}, so it is kept as it is: it does not show what this step adds "
                     "(delete it and run the step again for lazymoe's card).", "warn")

    def _release(self, settings: NotebookSettings, **options) -> ReleaseResult:
        """The library's publishing step with the form's Hub settings; shows each part as it finishes."""

        def shown(step: str, value) -> None:
            if step == "model":
                self.repo_id = value.repo_id
                self._show(_html(notice_html(f"Uploaded to {value.url}", "ok")))
            elif step == "gguf_files":
                self.gguf_files = list(value)
                rows = [(p.name, human_bytes(p.stat().st_size)) for p in value if p.is_file()]
                self._show(_html(notice_html(f"GGUF files in {value[0].parent}", "ok")
                                 + table_html(rows, ("File", "Size"))))
            elif step == "gguf":
                self._notice(f"Uploaded the GGUF files to {value.url}", "ok")
            elif step == "card_kept":
                self._card_kept(value, card_kept_because(value.parent) or "is yours")

        return release(self._require_model(), private=settings.private, token=self.form.token,
                       colab_secret=settings.hf_secret or "HF_TOKEN", on_step=shown, **options)

    @_step("Upload")
    def push(self) -> PushResult | None:
        """Upload the merged model (only when ticked). push_to_hub renders the card with the repo's id. After a
        Merge step that uploaded while merging, only what changed since (the card, the routing picture) is
        sent: the Hub already holds every shard (the client skips them by hash)."""
        settings = self.form.settings()
        if not settings.upload:
            self._notice("Upload is off: tick “Upload to the Hugging Face Hub” in the form to publish the model.")
            return None
        copy = read_hub_record(self.output_dir)
        if copy is not None and missing_weights(self.output_dir):  # the Merge step uploaded it (this session or not)
            self.repo_id = copy.repo_id
            self._notice(f"Uploaded while merging: {copy.url} (the weights are on the Hub only).", "ok")
            if self.pushed is None and copy.files is not None:  # merged in an earlier session: its record's report
                self.pushed = PushResult(repo_id=copy.repo_id, url=copy.url, private=bool(copy.private),
                                         files=copy.files, bytes=copy.bytes or 0,  # the report is whole or absent
                                         commit_url=copy.commit_url, commit=copy.commit)
            return self.pushed
        return self._release(settings, repo=settings.model_name).model

    # ------------------------------------------------------------------ 7-8. GGUF

    @_step("GGUF")
    def gguf(self) -> list[Path] | None:
        """Convert to GGUF and quantise (only when ticked); upload as NAME-GGUF when the upload is ticked too."""
        settings = self.form.settings()
        if not settings.gguf:
            self._notice("GGUF is off: tick “Also make GGUF files” in the form to build llama.cpp files.")
            return None
        folder = self._require_model()
        install_llama_cpp(probe(folder), self._notice, version=LLAMA_CPP_PYTHON_VERSION)
        # the model goes up first when this session has not uploaded it yet: the GGUF repo names it
        repo = (self.repo_id or settings.model_name) if settings.upload else None
        result = self._release(settings, repo=repo, upload_model=self.repo_id is None, gguf=True,
                               quants=settings.quants)
        return result.gguf_files

    @_step("Chat")
    def chat(self, **llama_options) -> list[str] | None:
        """Ask the quantised model one question per expert with llama.cpp (options go to ``lazymoe.gguf.llama.chat``)."""
        settings = self.form.settings()
        if not settings.gguf:
            self._notice("GGUF is off, so there is nothing to chat with (the Try step already tested the model).")
            return None
        folder = self._require_model()
        if not self.gguf_files:  # made in an earlier session (convert_to_gguf's default folder), from this model
            self.gguf_files = current_gguf_files(folder)
        if not self.gguf_files:
            raise LazyMoEError("There are no GGUF files of this model yet: run the GGUF step first.")
        names, prompts = zip(*expert_prompts(folder / CONFIG_FILENAME))
        target = preferred_gguf(self.gguf_files)
        answers = gguf_chat(target, list(prompts), **llama_options)
        rows = list(zip(names, prompts, answers))
        table = table_html(rows, ("Expert", "Prompt", "Answer"))
        self._show(_html(notice_html(f"Answers from {target.name}", "ok") + table))
        return answers

    # ------------------------------------------------------------------ the Build button

    def build(self) -> None:
        """Every step in order, stopping at the first that fails (what the Build button runs)."""
        for step in (self.plan, self.merge, self.route, self.try_model, self.evaluate, self.ask, self.benchmarks,
                     self.push, self.gguf, self.chat):
            try:
                step()
            except StepFailed:
                return

    def _build_from_button(self) -> None:
        if self.form.check() is None:
            return
        self.form.messages.outputs = ()
        with self.form.messages:  # prints, progress bars and bug tracebacks land in the form, not in a void
            self.build()
