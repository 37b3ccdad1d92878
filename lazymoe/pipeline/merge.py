"""config -> plan -> gates and shards -> finished folder. The one entry point every front end calls.

The router pass runs in a thread of its own while the writer writes every shard but the last (which holds
the routers), where the gate mode allows it (``MergePlan.router_overlaps``). The output is assembled in a
hidden sibling folder and renamed into place only when complete, so an interrupted or failed merge never
leaves something that looks like a model; inputs are only read.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from ..config import MoEConfig, load_config
from ..errors import InsufficientResourcesError, LazyMoEError, OutputExistsError, Setting, Text, WriteError
from ..io.folder import CONFIG_FILENAME, HubCopy, free_disk_bytes, write_hub_record
from ..io.outdir import DISK_FULL, DISK_MARGIN_BYTES, OutputTarget, disk_full_error
from ..io.fetch import RangedWeights, Read, check_range_cache
from ..io.sources import TOKENIZER_FILES, ModelRef, describe
from ..lazy import np
from ..moe import checks
from ..moe import plan as planning
from ..moe.plan import STREAMED_SHARDS_ON_DISK
from ..moe.writer import write_shards
from ..options import MergeOptions
from ..publish.card import plan_card, write_card
from ..publish.hub import PushResult, StreamingPush, check_push_target
from ..publish.resume import PushState
from ..router.device import pick_device
from ..router.gates import compute_gates, degenerate_layers
from ..router.modes import FITTED_MODES, HIDDEN_MODES, WRITTEN_MODES
from ..units import human_bytes, parse_bytes

logger = logging.getLogger(__name__)
_DEFAULTS = MergeOptions()  # the defaults every front end shares


def make_plan(
    config,
    *,
    max_shard_bytes: int | str = _DEFAULTS.max_shard_bytes,
    layout: str = _DEFAULTS.layout,
    low_disk: bool = _DEFAULTS.low_disk,
    progress: bool = True,
) -> planning.MergePlan:
    """Validate the config and the models (headers only) and return the plan. Reads no weights."""
    return _make_plan(config, max_shard_bytes=max_shard_bytes, layout=layout, low_disk=low_disk, progress=progress)


def _make_plan(config, *, max_shard_bytes, layout, low_disk, progress, tokenizer: bool = True) -> planning.MergePlan:
    """``make_plan``; ``tokenizer=False`` leaves the tokenizer check to the caller (``_tokenizer_checked``)."""
    config = load_config(config)
    max_shard_bytes = parse_bytes(max_shard_bytes)
    refs = config.model_refs()
    models = {}
    # a model's config and headers are a few small requests (latency, not bandwidth): read every model at once
    with ThreadPoolExecutor(max_workers=min(8, len(refs)), thread_name_prefix="lazymoe-describe") as pool:
        # the experts' tokenizers are never read (the MoE keeps the base's): not fetched
        futures = [pool.submit(describe, ModelRef.parse(ref), tokenizer=ref == config.base_model) for ref in refs]
        with tqdm(total=len(refs), desc="Reading model headers", disable=not progress or len(refs) < 2) as bar:
            for ref, future in zip(refs, futures):
                models[ref] = future.result()  # the first model's error first, as one after another would
                bar.update()
    warnings = checks.check_models(config, models)
    output = checks.choose_output(config, models)
    base = models[config.base_model]
    if output[0].key == "qwen2_moe" and base.folder is not None and (base.folder / "tokenizer.model").is_file():
        warnings.append(
            f"The base's tokenizer is SentencePiece (tokenizer.model): transformers runs this {output[0].name} model, "
            "but llama.cpp's converter reads a Qwen MoE tokenizer as BPE only and will refuse it, so no GGUF can be "
            "made. Build Mixtral (remove 'architecture' and shared_experts) if you need GGUF."
        )
    shared = config.shared_expert
    if shared is not None and shared.positive_prompts and config.gate_mode in FITTED_MODES + WRITTEN_MODES:
        warnings.append(
            f"gate_mode {config.gate_mode} fits the routed experts' routers only; the shared expert's gate is the "
            "constant 1/2 and its prompts are not used (use a reference gate mode to gate it by its prompts)."
        )
    if low_disk and config.gate_mode in WRITTEN_MODES:
        warnings.append(
            f"low-disk mode: gate_mode {config.gate_mode} needs every expert at once (each writes calibration "
            "text), which low-disk mode never has; the routers are fitted as gate_mode classifier instead."
        )
    elif low_disk and config.gate_mode in FITTED_MODES:
        warnings.append(
            f"low-disk mode: gate_mode {config.gate_mode} fits each router with the base's MLPs upstream instead "
            "of the experts' (no expert is downloaded yet when routers are fitted); routing is a few points less "
            "accurate than without low-disk mode."
        )
    if config.gate_mode in WRITTEN_MODES:  # a calibration file that is missing or empty stops here, before any download
        for i, expert in enumerate(config.experts):
            expert.calibration_texts(f"experts[{i}].calibration_text")
    elif any(e.calibration_text for e in config.experts):
        warnings.append(f"calibration_text is read by gate modes {' and '.join(WRITTEN_MODES)} only; gate_mode "
                        f"{config.gate_mode} does not use it.")
    if tokenizer:
        checks.check_tokenizer(config, models[config.base_model])
    return planning.build_plan(config, models, max_shard_bytes=max_shard_bytes, layout=layout, warnings=warnings,
                               low_disk=low_disk, output=output)


class _OnThread:
    """``run()`` on a daemon thread of its own. ``result()`` waits for it (Ctrl-C still works) and returns its
    value or raises its error in the caller's thread; ``error`` is that error as soon as it happens."""

    def __init__(self, run: Callable, name: str) -> None:
        self.value, self.error = None, None
        self._thread = threading.Thread(target=self._main, args=(run,), name=name, daemon=True)
        self._thread.start()

    def _main(self, run: Callable) -> None:
        try:
            self.value = run()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread by result()
            self.error = err

    def result(self):
        while self._thread.is_alive():
            self._thread.join(0.2)  # a timeout keeps Ctrl-C working while we wait
        if self.error is not None:
            raise self.error
        return self.value

    def join(self) -> None:
        self._thread.join()


def _tokenizer_checked(config: MoEConfig, base) -> _OnThread:
    """Where the tokenizer's files could not decide the check (``checks.check_tokenizer_files``: transformers 4,
    a chat template, a prompt near the context), the full check on a thread of its own: it loads the tokenizer,
    which imports most of transformers (2-3 s on 2 CPU cores, about as long as copying a few GB). A merge from
    local folders copies its first tensors meanwhile and waits for it (``result()``, which re-raises the
    check's error) before it tokenises, touches the Hub repo or makes the output final, so a bad tokenizer
    still leaves no output behind; the writer stops at its next tensor once the check fails. A merge from the
    Hub fetches ranges meanwhile (a few seconds of weights, kept in the range cache for the next run), but
    downloads no model whole before the check has passed."""
    return _OnThread(lambda: checks.check_tokenizer(config, base), "lazymoe-tokenizer")


def _tokenizer_loaded(config: MoEConfig, base) -> _OnThread:
    """The check was decided already (by the tokenizer's files, or by a plan made earlier): only load the
    tokenizer, on its own thread, for a mode that tokenises its prompts (the others never need it, nor
    transformers' import); a load that fails anyway says so in the check's one line."""
    return _OnThread(lambda: checks.load_tokenizer(config, base) if config.uses_prompts else None,
                     "lazymoe-tokenizer")


def _check_overlap(output_dir: Path, plan: planning.MergePlan) -> None:
    out = output_dir.resolve()
    for ref, info in plan.models.items():
        src = info.folder.resolve() if info.folder else None
        if src and (out == src or src in out.parents or out in src.parents):
            raise OutputExistsError(
                f"The output folder {output_dir} overlaps the input model {ref}; choose a separate folder "
                "(inputs are never modified)."
            )


def check_output_dir(output_dir: str | os.PathLike, plan: planning.MergePlan, *, overwrite: bool = False) -> None:
    """What :func:`merge` would refuse about ``output_dir`` (an input's folder, a link, a file, a folder lazymoe
    did not make or that holds the user's own files, an earlier output without ``overwrite``), checked now
    without locking or creating anything: ``lazymoe plan --output-dir``."""
    _check_overlap(Path(output_dir), plan)
    OutputTarget(output_dir).approve(overwrite)


def merge(
    config: MoEConfig | dict | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | str = _DEFAULTS.max_shard_bytes,
    layout: str = _DEFAULTS.layout,
    device: str | None = None,
    low_disk: bool = _DEFAULTS.low_disk,
    overwrite: bool = _DEFAULTS.overwrite,
    progress: bool = True,
    plan: planning.MergePlan | None = None,
) -> Path:
    """Build the MoE described by ``config`` into ``output_dir`` and return its path."""
    return _merge(config, output_dir, max_shard_bytes=max_shard_bytes, layout=layout, device=device,
                  low_disk=low_disk, overwrite=overwrite, progress=progress, plan=plan)[0]



def merge_and_push(
    config: MoEConfig | dict | str | os.PathLike,
    output_dir: str | os.PathLike,
    repo: str,
    *,
    keep: bool = True,
    private: bool = False,
    token: str | None = None,
    colab_secret: str = "HF_TOKEN",
    max_shard_bytes: int | str = _DEFAULTS.max_shard_bytes,
    layout: str = _DEFAULTS.layout,
    device: str | None = None,
    low_disk: bool = _DEFAULTS.low_disk,
    overwrite: bool = _DEFAULTS.overwrite,
    progress: bool = True,
    plan: planning.MergePlan | None = None,
) -> tuple[Path, PushResult]:
    """``merge`` into ``output_dir`` while uploading to ``repo``: each shard goes to the Hub as soon as it is
    written, and one commit (shards, config, tokenizer, card naming ``repo``) lands once the last shard is
    up, so the repo never shows half a model. ``keep=False`` deletes each shard once uploaded: the disk then
    holds at most three shards (plus what the router pass and the fetch window need), and ``output_dir`` keeps
    the small files only. A re-run after an interruption sends no shard the Hub already received; with
    ``keep=False`` it neither fetches their sources nor builds them, and reuses the recorded router rows
    (``publish.resume``), so it converges to the same commit.

    The push target (token, permissions, name) is checked before anything is fetched or written.
    """
    target = check_push_target(repo, private=private, token=token, colab_secret=colab_secret)
    return _merge(config, output_dir, max_shard_bytes=max_shard_bytes, layout=layout, device=device,
                  low_disk=low_disk, overwrite=overwrite, progress=progress, plan=plan,
                  pusher=StreamingPush(target, private=private, keep=keep, progress=progress))


def _merge(config, output_dir, *, max_shard_bytes, layout, device, low_disk, overwrite, progress, plan,
           pusher: StreamingPush | None = None) -> tuple[Path, PushResult | None]:
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir).strip():
        raise OutputExistsError(f"The output folder must be a path, got {output_dir!r}.")
    output_dir = Path(output_dir)
    tokenizer, pending = None, None  # a plan made earlier checked the tokenizer then
    if plan is None:
        plan = _make_plan(config, max_shard_bytes=max_shard_bytes, layout=layout, low_disk=low_disk,
                          progress=progress, tokenizer=False)
        # the tokenizer's files decide the check in milliseconds, nearly always; where they cannot, the full
        # check (seconds) runs while the first weights are fetched or copied, and the Hub waits for it
        if checks.check_tokenizer_files(plan.config, plan.base):
            tokenizer = _tokenizer_loaded(plan.config, plan.base)
        else:
            tokenizer = _tokenizer_checked(plan.config, plan.base)
            pending = tokenizer.result
            if plan.download_bytes and plan.whole_models:  # models downloaded whole (GBs) wait for it too
                tokenizer.result()
    config = plan.config.with_seed(from_recipe=pusher is not None)
    if device not in (None, "auto") and config.gate_mode in HIDDEN_MODES + FITTED_MODES + WRITTEN_MODES:
        pick_device(device)  # a bad --device fails now, not after the downloads (auto cannot fail: no torch yet)
    _check_overlap(output_dir, plan)
    with OutputTarget(output_dir) as target:  # locked from here: no other merge can write this folder
        target.approve(overwrite)
        free = free_disk_bytes(target.parent)
        streamed = pusher is not None and not pusher.keep
        disk = plan.streamed_disk_bytes() if streamed else plan.disk_bytes
        if free < disk:
            what = (f"at most {STREAMED_SHARDS_ON_DISK} shards at a time, the downloads deleted once written" if streamed
                    else f"output {human_bytes(plan.output_bytes)} + downloads {human_bytes(plan.peak_download_bytes)}")
            raise InsufficientResourcesError(Text.join([
                f"The merge needs about {human_bytes(disk)} of free disk at {target.parent} ({what} + "
                f"{human_bytes(DISK_MARGIN_BYTES)} margin) but only {human_bytes(free)} is free. Free some space "
                "or choose another output folder", "" if streamed else _low_disk_hint(plan), "."]))
        try:
            return _merge_into(target, plan, config, device=device, progress=progress, pusher=pusher,
                               tokenizer=tokenizer, pending=pending)
        finally:
            if pusher is not None:
                pusher.abort()  # a no-op once finished; after a failure, stops the uploads (nothing committed)


def _low_disk_hint(plan: planning.MergePlan) -> str | Text:
    """Suggest low-disk mode only where it would need less disk."""
    if plan.low_disk or dataclasses.replace(plan, low_disk=True).peak_download_bytes >= plan.peak_download_bytes:
        return ""
    low_disk = Setting("low_disk", True)
    return Text(f", or {low_disk.placeholder} (low-disk mode)", (low_disk,))


def _merge_into(target: OutputTarget, plan: planning.MergePlan, config: MoEConfig, *, device, progress,
                pusher: StreamingPush | None, tokenizer: _OnThread | None = None,
                pending: Callable[[], object] | None = None) -> tuple[Path, PushResult | None]:
    # our own copy: warnings found while merging must not leak into a plan the caller keeps
    plan = dataclasses.replace(plan, config=config, warnings=list(plan.warnings))
    for w in plan.warnings:
        logger.warning(w)

    # Hub weights: the tensors the merge reads are fetched by ranges ahead of their readers (the writer
    # and the router pass, on one stream in layer order; a router pass that runs first, first), models the
    # router pass loads whole as whole files; local folders are read in place (deleted once written in
    # low-disk mode, or when the shards themselves are deleted once uploaded)
    skip, saved = frozenset(), None
    if any(m.ref.repo_id is not None and ref not in plan.whole_models for ref, m in plan.models.items()):
        check_range_cache()  # ranges will be fetched: a cache that cannot take them stops us before the Hub repo
    if pusher is not None:  # a re-run of an interrupted push picks up what it recorded (publish.resume)
        state = PushState(pusher.target.endpoint, pusher.target.repo_id, plan.fingerprint())
        saved = _saved_gates(state, plan)
        # nothing touches the Hub repo before every check has passed: a ``pending`` tokenizer check may still run
        # while the first weights are fetched and the first shard is written
        pusher.start(state, after=pending)
        if not pusher.keep and state.shards:  # kept shards must be on disk: only a --no-keep push can skip some
            skip = pusher.resume([s.filename for s in plan.shards[:-1]])  # the routers' shard is always built
    reads = plan.reads(skip_shards=frozenset(i for i, s in enumerate(plan.shards) if s.filename in skip),
                       router=saved is None)
    release = plan.low_disk or (pusher is not None and not pusher.keep)
    whole = plan.whole_models if saved is None else frozenset()  # recorded rows: no pass loads a whole model
    store = RangedWeights(plan.models, [Read(*r) for r in reads], whole=whole,
                          release=release, window=plan.fetch_window, progress=progress)
    router = _RouterPass(threaded=plan.router_overlaps and saved is None, saved=saved)
    try:
        return _merge_with(store, router, target, plan, config, device=device, progress=progress, pusher=pusher,
                           skip=skip, tokenizer=tokenizer)
    finally:
        router.stop()  # a failure or Ctrl-C: the pass stops at its next tensor (closing the store wakes it)
        store.close()
        router.join()


class _RouterPass:
    """The router pass (``compute_gates``), in a thread of its own when it overlaps the writer, else run at
    once. ``gates()`` waits for its rows and raises its error; ``check()`` raises its error as soon as it
    fails (the writer stops there); after ``stop()`` its next tensor lookup raises, so ``join()`` returns
    soon after a failed or interrupted merge, and nothing of it runs once the merge is over."""

    def __init__(self, *, threaded: bool, saved=None):
        self.threaded = threaded
        self.saved = saved  # rows an interrupted push recorded: no pass at all
        self._stopping = threading.Event()
        self._task: _OnThread | None = None
        self._gates = None

    def guard(self, resolve: Callable) -> Callable:
        """``resolve`` for the pass: refuses once the merge stops."""
        def guarded(ref: str, name: str):
            if self._stopping.is_set():
                raise _Stopped()
            return resolve(ref, name)
        return guarded

    def start(self, run: Callable) -> None:
        if self.saved is not None:
            self._gates = self.saved
        elif not self.threaded:
            self._gates = run()
        else:
            self._task = _OnThread(run, "lazymoe-router")

    def check(self) -> None:
        if self._task is not None and self._task.error is not None:
            raise self._task.error

    def gates(self):
        return self._task.result() if self._task is not None else self._gates

    def stop(self) -> None:
        self._stopping.set()

    def join(self) -> None:
        if self._task is not None:
            self._task.join()


class _Stopped(Exception):
    """The merge stopped while the router pass ran (never shown: the merge's own error is)."""


def _saved_gates(state: PushState, plan: planning.MergePlan):
    """The router rows an interrupted push of this very merge recorded, or None."""
    found = state.gates()
    shape = (plan.num_layers, plan.gate_rows, int(plan.out_config["hidden_size"]))
    if found is None or found[1] != shape:
        return None
    logger.info("Resuming: the router rows come from the interrupted run (no router pass)")
    return np.frombuffer(found[0], dtype="<f4").reshape(shape)


def _merge_with(store: RangedWeights, router: _RouterPass, target: OutputTarget, plan: planning.MergePlan,
                config: MoEConfig, *, device, progress, pusher: StreamingPush | None,
                skip: frozenset[str] = frozenset(),
                tokenizer: _OnThread | None = None) -> tuple[Path, PushResult | None]:
    output_dir = target.path
    resolve = router.guard(store.resolve)
    # overlapping: each base tensor is located when the pass reaches it, so it waits for one layer at a time
    base = store.local(config.base_model, wait=not router.threaded, resolve=resolve)
    if tokenizer is None:  # a plan made earlier
        tokenizer = _tokenizer_loaded(config, base)
    router_plan = dataclasses.replace(plan, models={**plan.models, config.base_model: base})

    def router_pass():
        # the modes without prompts never tokenise: their pass runs while the check finishes
        words = tokenizer.result() if config.uses_prompts else None
        # fitted modes run the experts' MLPs while fitting; in low-disk mode no expert is local yet, so they
        # fit on the base's MLP outputs upstream instead (an approximation that needs no expert weights)
        gates = compute_gates(router_plan, words, device=device, progress=progress, resolve=resolve,
                              upstream="base" if plan.low_disk else "moe",
                              folder_of=lambda ref: store.local(ref).folder)
        store.router_done()
        if pusher is not None:  # a re-run after an interruption needs no router pass
            pusher.state.save_gates(gates.astype("<f4").tobytes(), tuple(gates.shape))
        logger.debug("router pass done")
        return gates

    done: list = []

    def gates():  # the writer asks when it reaches the routers' shard
        if not done:
            rows = router.gates()
            degenerate = degenerate_layers(rows[:, : config.num_experts])
            if degenerate:
                plan.warnings.append(
                    f"Router rows are nearly parallel in {len(degenerate)} of {plan.num_layers} layers (first: "
                    f"{degenerate[0]}): your prompts may be too similar, and some experts will get little traffic."
                )
                logger.warning(plan.warnings[-1])
            done.append(rows)
        return done[0]

    def check():  # before each tensor: a failed router pass or tokenizer check stops the writer there
        router.check()
        if tokenizer.error is not None:
            raise tokenizer.error

    tmp = target.work_folder()
    router.start(router_pass)
    try:
        write_shards(plan, gates, tmp, store, progress=progress, on_shard=pusher.add_shard if pusher else None,
                     check=check, skip=skip)
        gates()  # the pass is over (and its warning in the card) before anything is committed
        tokenizer.result()  # a tokenizer that fails its check fails the merge before the output is final
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
        for name in ("generation_config.json", *TOKENIZER_FILES):
            src = base.folder / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)  # byte for byte: the tokenizer is the base's, unchanged
        (tmp / CONFIG_FILENAME).write_text(config.to_yaml(), encoding="utf-8")
        write_card(plan, tmp, model_name=output_dir.name)
    except OSError as err:
        if err.errno in DISK_FULL:  # the free-space check passed, but something else filled the disk since
            raise disk_full_error(err, target.parent, human_bytes(plan.disk_bytes)) from None
        if isinstance(err, LazyMoEError):
            raise
        raise WriteError(_write_failure(output_dir, err)) from err
    pushed = None
    if pusher is not None:  # the one commit, before the folder is final: a failed commit leaves no output to --overwrite
        card = plan_card(plan, tmp, model_name=output_dir.name, repo_id=pusher.target.repo_id)
        pushed = pusher.finish(tmp, card, commit_message=f"Upload {output_dir.name} with lazymoe")
        if not pusher.keep:  # the commit landed: the folder says where its weights are (after the upload: never sent)
            write_hub_record(tmp, HubCopy(pushed.repo_id, pusher.target.endpoint, pushed.commit, pushed.private,
                                          pushed.files, pushed.bytes, pushed.commit_url))
    target.commit()
    if pusher is not None and not pusher.keep:
        logger.info("Wrote %s without its shards: the weights are on the Hub only (%s)", output_dir, pushed.url)
    else:
        logger.info("Wrote %s (%s)", output_dir, human_bytes(plan.output_bytes))
    return output_dir, pushed


def _write_failure(output_dir: Path, err: OSError) -> str:
    """What went wrong while writing (other than a full disk), and what to do."""
    what = f"Writing the merged model to {output_dir} failed ({err.strerror or err})"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: no permission to write there. Choose a folder you can write to, then merge again."
    return f"{what}. Nothing half-written was kept; check the disk and the folder, then merge again."
