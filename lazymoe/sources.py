"""Model references (Hub id, ``id@revision`` or local folder) and what we can learn from them cheaply.

``describe()`` reads only config.json, tokenizer files and safetensors headers — on the Hub through
ranged requests — so a plan and every compatibility check happen before any weight is downloaded.
``fetch_weights()`` then downloads just what the merge reads.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError
from .safetensors_io import TensorInfo, scan_file

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
METADATA_PATTERNS = ["config.json", "generation_config.json", *TOKENIZER_FILES, "*.safetensors.index.json"]


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: exactly one of ``local_path`` or ``repo_id`` is set."""

    text: str
    local_path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        text = text.strip()
        path = Path(text).expanduser()
        if path.exists():
            if not path.is_dir():
                raise ModelNotFoundError(f"{text} is a file; a model reference must be a folder or a Hub id.")
            return cls(text, local_path=path.resolve())
        repo, _, revision = text.partition("@")
        if _HUB_ID.match(repo) and not text.startswith((".", "/", "~")):
            return cls(text, repo_id=repo, revision=revision or None)
        raise ModelNotFoundError(
            f"{text!r} is neither an existing local folder nor a Hub id like 'org/name' or 'org/name@revision'. "
            "Check the spelling, or the path relative to where you run lazymoe."
        )

    def __str__(self) -> str:
        return self.text


@dataclass
class ModelInfo:
    """Everything the planner needs about one model, read without touching weights."""

    ref: ModelRef
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    folder: Path | None = None  # local folder holding config/tokenizer (and weights once fetched)
    weight_bytes: int = 0

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))


def _scan_local(folder: Path, ref: ModelRef) -> dict[str, TensorInfo]:
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{ref}: the index lists {', '.join(missing[:3])} but the file is missing; "
                "the download is incomplete — download the model again."
            )
    if not files:
        extra = " (it has PyTorch .bin weights; convert them to safetensors first)" if any(folder.glob("*.bin")) else ""
        raise ModelNotFoundError(f"{ref}: no *.safetensors weights in {folder}{extra}.")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            tensors.update(scan_file(f))
        except (ValueError, OSError, json.JSONDecodeError) as err:
            raise ModelNotFoundError(f"{ref}: cannot read {f.name}: {err}") from None
    return tensors


def _hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def _hub_error(ref: ModelRef, err: Exception) -> ModelNotFoundError:
    name = type(err).__name__
    if name in ("RepositoryNotFoundError", "GatedRepoError"):
        why = "does not exist on the Hub, is private, or is gated: check the id, or log in with a token that can read it"
    elif name == "RevisionNotFoundError":
        why = f"has no revision {ref.revision!r}"
    elif name in ("LocalEntryNotFoundError", "ConnectionError", "OfflineModeIsEnabled"):
        folder = ref.repo_id.rsplit("/", 1)[-1]
        why = ("cannot be reached (no network, or offline mode): download it while you have a network, with "
               f"`hf download {ref.repo_id}{' --revision ' + ref.revision if ref.revision else ''} --local-dir "
               f"{folder}`, and give the folder {folder!r} instead")
    else:
        why = f"could not be read ({name}: {err})"
    return ModelNotFoundError(f"{ref.repo_id} {why}.")


def describe(ref: ModelRef) -> ModelInfo:
    """Read config and tensor headers of a model (local, or remote without downloading weights)."""
    if ref.local_path is not None:
        cfg = ref.local_path / "config.json"
        if not cfg.is_file():
            raise ModelNotFoundError(f"{ref}: no config.json in {ref.local_path}; is this a Hugging Face model folder?")
        tensors = _scan_local(ref.local_path, ref)
        return ModelInfo(ref, json.loads(cfg.read_text()), tensors, ref.local_path, sum(t.nbytes for t in tensors.values()))

    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=METADATA_PATTERNS)
        )
        meta = _hub_api().get_safetensors_metadata(ref.repo_id, revision=ref.revision)
    except Exception as err:  # huggingface_hub raises many types; translate the ones users meet
        raise _hub_error(ref, err) from err
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{ref.repo_id} has no config.json; is it a transformers model repo?")
    tensors: dict[str, TensorInfo] = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, tmeta in file_meta.tensors.items():
            start, end = tmeta.data_offsets
            # offsets are resolved against the real file after download (fetch_weights)
            tensors[name] = TensorInfo(name, tmeta.dtype, tuple(tmeta.shape), folder / filename, -1, end - start)
    return ModelInfo(ref, json.loads((folder / "config.json").read_text()), tensors, folder,
                     sum(t.nbytes for t in tensors.values()))


def fetch_weights(info: ModelInfo) -> ModelInfo:
    """Make every weight file local and return the info with real file offsets."""
    if info.ref.local_path is not None:
        return info
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                info.ref.repo_id,
                revision=info.ref.revision,
                allow_patterns=[*METADATA_PATTERNS, "*.safetensors"],
            )
        )
    except Exception as err:
        raise _hub_error(info.ref, err) from err
    tensors = _scan_local(folder, info.ref)
    return ModelInfo(info.ref, info.config, tensors, folder, sum(t.nbytes for t in tensors.values()))


class WeightStore:
    """Local weights on demand: fetches a model the first time one of its tensors is needed and, with
    ``release``, deletes the weight files *it downloaded* once the model's last tensor is written.

    Files that were already in the Hugging Face cache, and local folders, are never deleted.
    """

    def __init__(self, models: dict[str, ModelInfo], *, release: bool = False):
        self._remote = dict(models)
        self._local: dict[str, ModelInfo] = {}
        self._downloaded: dict[str, list[Path]] = {}
        self.release_enabled = release

    def local(self, ref: str) -> ModelInfo:
        if ref not in self._local:
            info = self._remote[ref]
            remote = info.ref.repo_id is not None  # a local folder is the user's: never a candidate for deletion
            before = _cached_files(info) if remote else set()
            fetched = fetch_weights(info)
            self._local[ref] = fetched
            if remote:
                self._downloaded[ref] = sorted({t.file for t in fetched.tensors.values()} - before)
        return self._local[ref]

    def resolve(self, ref: str, name: str) -> TensorInfo:
        return self.local(ref).tensors[name]

    def release(self, ref: str) -> int:
        """Delete what we downloaded for ``ref``; returns the bytes freed."""
        if not self.release_enabled:
            return 0
        freed = 0
        for link in self._downloaded.pop(ref, []):
            blob = link.resolve()
            if blob.is_file():
                freed += blob.stat().st_size
                blob.unlink()
            link.unlink(missing_ok=True)
            logger.info("deleted downloaded %s to save disk", link.name)
        self._local.pop(ref, None)
        return freed


def _cached_files(info: ModelInfo) -> set[Path]:
    """Weight files of a Hub model that are already complete in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    out = set()
    for filename in {t.file.name for t in info.tensors.values()}:
        hit = try_to_load_from_cache(info.ref.repo_id, filename, revision=info.ref.revision)
        if isinstance(hit, str):
            out.add(Path(hit))
    return out
