"""config -> plan -> gates -> stream -> finished folder. The one entry point every front end calls.

The output is assembled in a hidden sibling folder and renamed into place only when complete, so an
interrupted or failed merge never leaves something that looks like a model; inputs are only read.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from . import checks
from . import plan as planning
from .card import write_card
from .config import CONFIG_FILENAME, MoEConfig, load_config
from .errors import InsufficientResourcesError, OutputExistsError
from .report import human_bytes
from .sources import TOKENIZER_FILES, ModelRef, WeightStore, describe

logger = logging.getLogger(__name__)


def make_plan(
    config,
    *,
    max_shard_bytes: int | str = planning.DEFAULT_MAX_SHARD_BYTES,
    layout: str = "classic",
    low_disk: bool = False,
    progress: bool = True,
) -> planning.MergePlan:
    """Validate the config and the models (headers only) and return the plan. Reads no weights."""
    config = load_config(config)
    max_shard_bytes = planning.parse_bytes(max_shard_bytes)
    refs = config.model_refs()
    models = {}
    for ref in tqdm(refs, desc="Reading model headers", disable=not progress or len(refs) < 2):
        models[ref] = describe(ModelRef.parse(ref))
    warnings = checks.check_models(config, models)
    if low_disk and config.gate_mode in ("expert_classifier", "trained"):
        warnings.append(
            f"low-disk mode: gate_mode {config.gate_mode} needs every expert at once (each writes calibration "
            "text), which low-disk mode never has; the routers are fitted as gate_mode classifier instead."
        )
    elif low_disk and config.gate_mode in ("centroid", "classifier"):
        warnings.append(
            f"low-disk mode: gate_mode {config.gate_mode} fits each router with the base's MLPs upstream instead "
            "of the experts' (no expert is downloaded yet when routers are fitted); routing is a few points less "
            "accurate than without low-disk mode."
        )
    checks.check_tokenizer(config, models[config.base_model])
    return planning.build_plan(config, models, max_shard_bytes=max_shard_bytes, layout=layout, warnings=warnings,
                               low_disk=low_disk)


def _check_output(output_dir: Path, plan: planning.MergePlan, overwrite: bool) -> None:
    out = output_dir.resolve()
    for ref, info in plan.models.items():
        src = info.folder.resolve() if info.folder else None
        if src and (out == src or src in out.parents or out in src.parents):
            raise OutputExistsError(
                f"The output folder {output_dir} overlaps the input model {ref}; choose a separate folder "
                "(inputs are never modified)."
            )
    if output_dir.exists():
        if not output_dir.is_dir():
            raise OutputExistsError(f"{output_dir} exists and is a file; choose another output folder.")
        if any(output_dir.iterdir()):
            ours = (output_dir / CONFIG_FILENAME).is_file() and (output_dir / "config.json").is_file()
            if not (overwrite and ours):
                hint = ("pass overwrite=True / --overwrite to replace it" if ours else
                        "it was not made by lazymoe, so it is never replaced; choose an empty or new folder")
                raise OutputExistsError(f"{output_dir} already exists and is not empty: {hint}.")


def _remove_stale_work(parent: Path, name: str) -> int:
    """Delete hidden work folders that a killed merge into ``name`` left behind (Colab's OOM killer and
    stopped cells skip every cleanup); returns the bytes freed. Folders of a merge still running are kept."""
    freed = 0
    for kind in ("partial", "old"):
        for folder in parent.glob(f".{glob.escape(name)}.lazymoe-{kind}-*"):
            pid = folder.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("removed %s, left by an interrupted merge", folder)
    return freed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _finalise(tmp: Path, output_dir: Path) -> None:
    old = None
    if output_dir.exists() and any(output_dir.iterdir()):
        old = output_dir.with_name(f".{output_dir.name}.lazymoe-old-{os.getpid()}")
        os.replace(output_dir, old)
    elif output_dir.exists():
        output_dir.rmdir()
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge(
    config: MoEConfig | dict | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    max_shard_bytes: int | str = planning.DEFAULT_MAX_SHARD_BYTES,
    layout: str = "classic",
    device: str | None = None,
    low_disk: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    plan: planning.MergePlan | None = None,
) -> Path:
    """Build the MoE described by ``config`` into ``output_dir`` and return its path."""
    from transformers import AutoTokenizer

    from .gates import FITTED_MODES, HIDDEN_MODES, compute_gates, degenerate_layers, pick_device
    from .router_train import WRITTEN_MODES
    from .writer import write_shards

    output_dir = Path(output_dir)
    if plan is None:
        plan = make_plan(config, max_shard_bytes=max_shard_bytes, layout=layout, low_disk=low_disk, progress=progress)
    config = plan.config.with_seed()
    if config.gate_mode in HIDDEN_MODES + FITTED_MODES + WRITTEN_MODES:
        pick_device(device)  # a bad --device fails now, not after the downloads
    _check_output(output_dir, plan, overwrite)
    parent = output_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(parent, output_dir.name)
    free = planning.free_disk_bytes(parent)
    if free < plan.disk_bytes:
        raise InsufficientResourcesError(
            f"The merge needs about {human_bytes(plan.disk_bytes)} of free disk at {parent} "
            f"(output {human_bytes(plan.output_bytes)} + downloads {human_bytes(plan.peak_download_bytes)}) but only "
            f"{human_bytes(free)} is free. Free some space, choose another output folder"
            f"{'' if plan.low_disk else ', or use low-disk mode (--low-disk)'}."
        )
    # our own copy: warnings found while merging must not leak into a plan the caller keeps
    plan = dataclasses.replace(plan, config=config, warnings=list(plan.warnings))
    for w in plan.warnings:
        logger.warning(w)

    # weights become local on first use (no-op for local folders); the router pass needs the base's
    store = WeightStore(plan.models, release=plan.low_disk)
    base = store.local(config.base_model)
    plan = dataclasses.replace(plan, models={**plan.models, config.base_model: base})
    tokenizer = AutoTokenizer.from_pretrained(str(base.folder))
    # fitted modes run the experts' MLPs while fitting; in low-disk mode no expert is local yet, so they
    # fit on the base's MLP outputs upstream instead (an approximation that needs no expert weights)
    gates = compute_gates(plan, tokenizer, device=device, progress=progress, resolve=store.resolve,
                          upstream="base" if plan.low_disk else "moe", folder_of=lambda ref: store.local(ref).folder)
    degenerate = degenerate_layers(gates)
    if degenerate:
        plan.warnings.append(
            f"Router rows are nearly parallel in {len(degenerate)} of {plan.num_layers} layers "
            f"(first: {degenerate[0]}): your prompts may be too similar, and some experts will get little traffic."
        )
        logger.warning(plan.warnings[-1])

    tmp = parent / f".{output_dir.name}.lazymoe-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_shards(plan, gates, tmp, store, progress=progress)
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
        for name in ("generation_config.json", *TOKENIZER_FILES):
            src = base.folder / name
            if src.is_file():
                shutil.copyfile(src, tmp / name)  # byte for byte: the tokenizer is the base's, unchanged
        (tmp / CONFIG_FILENAME).write_text(config.to_yaml(), encoding="utf-8")
        write_card(plan, tmp, model_name=output_dir.name)
        _finalise(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote %s (%s)", output_dir, human_bytes(plan.output_bytes))
    return output_dir
