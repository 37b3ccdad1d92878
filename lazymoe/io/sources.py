"""Model references (Hub id, ``id@revision`` or local folder) and what we can learn from them cheaply.

``describe()`` reads only config.json, the base's tokenizer files and safetensors headers — on the Hub through
ranged requests — so a plan and every compatibility check happen before any weight is downloaded.
``fetch_weights()`` downloads whole weight files (the modes whose experts run as whole models need them);
``io.fetch`` fetches just the tensors a merge reads.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

from ..errors import ModelFormatError, ModelNotFoundError
from ..lazy import hf_hub
from .folder import TOKENIZER_FILES, read_json, require_weights
from .hub_ids import MAX_HUB_NAME_CHARS
from .ranges import header_bytes_guess, remote_tensors
from .safetensors import TensorInfo, scan_file
from .token import TOKEN_ENV_NAMES, check_token, env_tokens, redact

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# a revision is a branch, tag or commit: git's ref-name rules (no space, control character, ~^:?*[\\, "..",
# "@{", leading or trailing "/" or "."), a length the Hub accepts, and nothing a Markdown link or URL could
# be broken out with (the card links to it)
_REVISION = re.compile(r"^(?!.*\.\.)(?!.*@\{)(?!.*//)(?![/.])[A-Za-z0-9._/+-]{1,255}(?<![/.])(?<!\.lock)$")
#: config.json fields the planner reads as positive integers, when present
_CONFIG_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
#: what a merge reads of a Hub expert before any weight: the config, and the index naming its weight files
WEIGHT_METADATA_PATTERNS = ["config.json", "*.safetensors.index.json"]
#: ... and of the base, whose generation config and tokenizer the MoE keeps
METADATA_PATTERNS = [*WEIGHT_METADATA_PATTERNS, "generation_config.json", *TOKENIZER_FILES]


@dataclass(frozen=True)
class ModelRef:
    """A parsed reference: exactly one of ``local_path`` or ``repo_id`` is set."""

    text: str
    local_path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        if not isinstance(text, str):
            raise ModelNotFoundError(f"A model reference must be text (a Hub id or a folder), got {text!r}.")
        text = text.strip()
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise ModelNotFoundError(
                f"{text!r} contains a control character (a pasted newline or tab?); write the Hub id or folder alone."
            )
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~someone/m": no such user, so no home folder to expand
            raise ModelNotFoundError(
                f"{text!r} starts with ~ but there is no such user's home folder; write the full path of the folder."
            ) from None
        try:
            exists = path.exists()
        except OSError as err:  # ENAMETOOLONG, EACCES on a parent...
            raise ModelNotFoundError(f"{text[:80]!r}... cannot be a model folder ({err.strerror}).") from None
        if exists:
            if not path.is_dir():
                raise ModelNotFoundError(f"{text} is a file; a model reference must be a folder or a Hub id.")
            return cls(text, local_path=path.resolve())
        repo, _, revision = text.partition("@")
        short = max(map(len, repo.split("/"))) <= MAX_HUB_NAME_CHARS
        if _HUB_ID.match(repo) and short and not text.startswith((".", "/", "~")):
            if revision and not _REVISION.match(revision):
                raise ModelNotFoundError(
                    f"{text!r}: {revision!r} is not a revision the Hub accepts; after '@' give a branch, tag or "
                    "commit hash (letters, digits and . _ - / +), like org/name@main."
                )
            return cls(text, repo_id=repo, revision=revision or None)
        raise ModelNotFoundError(
            f"{text!r} is neither an existing local folder nor a Hub id like 'org/name' or 'org/name@revision'. "
            "Check the spelling, or the path relative to where you run lazymoe."
        )

    def __str__(self) -> str:
        return self.text


@dataclass
class ModelInfo:
    """Everything the planner needs about one model, read without touching weights.

    For a Hub model, ``folder`` is its snapshot at one commit (config and tokenizer files) and each tensor's
    ``file`` is where the weight file lies once downloaded; ``offset`` is its real place in that file."""

    ref: ModelRef
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    folder: Path | None = None  # local folder holding config/tokenizer (and weights once fetched)
    weight_bytes: int = 0

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def commit(self) -> str | None:
        """The commit hash a Hub model was read at (its snapshot folder's name); None for a local folder."""
        return self.folder.name if self.ref.repo_id is not None and self.folder is not None else None


def read_model_config(path: Path, ref: ModelRef | str) -> dict:
    """config.json, with the fields the planner does arithmetic on checked for type."""
    cfg = read_json(path, "config.json", ref)
    for key in _CONFIG_INTS:
        value = cfg.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ModelFormatError(
                f"{ref}: config.json has {key}={value!r}; it must be a positive whole number. "
                "Fix config.json or download the model again."
            )
    if not isinstance(cfg.get("model_type", ""), str):
        raise ModelFormatError(f"{ref}: config.json has model_type={cfg['model_type']!r}; it must be text.")
    return cfg


def _weight_map(folder: Path, ref: ModelRef) -> dict[str, str] | None:
    """The index's tensor -> file map (checked: every file a plain name beside the index), or None without one."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = read_json(index, index.name, ref).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFormatError(f"{ref}: {index.name} has no weight_map; download the model again.")
    for name in set(weight_map.values()):
        # shards sit next to the index; a name with a folder in it ("../", "/etc/") reads outside the model
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ModelFormatError(
                f"{ref}: {index.name} maps a tensor to {name!r}, which is not a file name in the model folder; "
                "the index is damaged or hostile, download the model again."
            )
    return weight_map


def _weight_files(folder: Path, ref: ModelRef) -> list[Path]:
    weight_map = _weight_map(folder, ref)
    if weight_map is None:
        return sorted(folder.glob("*.safetensors"))
    files = sorted(folder / f for f in set(weight_map.values()))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{ref}: the index lists {', '.join(missing[:3])} but the file is missing; "
            "the download is incomplete — download the model again."
        )
    return files


def _scan_local(folder: Path, ref: ModelRef) -> dict[str, TensorInfo]:
    files = _weight_files(folder, ref)
    if not files:
        extra = " (it has PyTorch .bin weights; convert them to safetensors first)" if any(folder.glob("*.bin")) else ""
        raise ModelNotFoundError(f"{ref}: no *.safetensors weights in {folder}{extra}.")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        try:
            tensors.update(scan_file(f))
        except (ValueError, OSError) as err:
            raise ModelFormatError(f"{ref}: cannot use {f.name}: {err}. Download the model again.") from None
    return tensors


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
    elif isinstance(err, (PermissionError, NotADirectoryError, IsADirectoryError)) or (
            isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)):
        where = f" at {err.filename}" if err.filename else ""
        why = (f"could not be saved in the Hugging Face cache{where} ({err.strerror}): set HF_HOME (or "
               "HF_HUB_CACHE) to a folder you can write to, with free space, and run again")
    else:
        why = f"could not be read ({name}: {' '.join(redact(str(err), env_tokens()).split())[:300]})"
    return ModelNotFoundError(f"{ref.repo_id} {why}.")


def _check_env_tokens() -> None:
    """huggingface_hub sends HF_TOKEN with every request: a malformed one is refused before it is sent."""
    for name in TOKEN_ENV_NAMES:
        value = os.environ.get(name, "").strip()
        if value:
            check_token(value, f"your {name} environment variable")


def describe(ref: ModelRef, *, tokenizer: bool = True) -> ModelInfo:
    """Read config and tensor headers of a model (local, or remote without downloading weights).
    ``tokenizer=False``: of a Hub model, fetch no generation config or tokenizer files (an expert's; the MoE
    keeps the base's), a dozen requests fewer."""
    if ref.local_path is not None:
        cfg = ref.local_path / "config.json"
        if not cfg.is_file():
            raise ModelNotFoundError(f"{ref}: no config.json in {ref.local_path}; is this a Hugging Face model folder?")
        config = read_model_config(cfg, ref)
        require_weights(ref.local_path)  # a merged folder whose shards went to the Hub says where they are
        tensors = _scan_local(ref.local_path, ref)
        return ModelInfo(ref, config, tensors, ref.local_path, sum(t.nbytes for t in tensors.values()))

    _check_env_tokens()
    patterns = METADATA_PATTERNS if tokenizer else WEIGHT_METADATA_PATTERNS
    try:
        folder = Path(hf_hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many types; translate the ones users meet
        raise _hub_error(ref, err) from err
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{ref.repo_id} has no config.json; is it a transformers model repo?")
    commit = folder.name  # the snapshot is named after the commit: every range is read at that commit
    weight_map = _weight_map(folder, ref)
    if weight_map is not None:  # each weight file and the tensors it holds (how long its header may be)
        names: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            names.setdefault(filename, []).append(name)
        tensors = _remote_headers(ref, commit, folder, names)
    else:  # no index: model.safetensors, else the weight files the repo holds (as a local folder is read)
        try:
            tensors = _remote_headers(ref, commit, folder, {"model.safetensors": []})
        except _NotOnHub:
            try:
                listed = hf_hub.HfApi().list_repo_files(ref.repo_id, revision=commit)
            except Exception as err:
                raise _hub_error(ref, err) from err
            shards = sorted(f for f in listed if f.endswith(".safetensors") and "/" not in f)
            if not shards:
                raise ModelNotFoundError(f"{ref.repo_id} has no .safetensors weights and no "
                                         "model.safetensors.index.json: lazymoe reads safetensors weights only.") from None
            tensors = _remote_headers(ref, commit, folder, {f: [] for f in shards})
    return ModelInfo(ref, read_model_config(folder / "config.json", ref), tensors, folder,
                     sum(t.nbytes for t in tensors.values()))


class _NotOnHub(Exception):
    """A weight file the repo does not hold at the commit read."""


def _not_on_hub(err: BaseException) -> bool:
    return any(c.__name__ == "EntryNotFoundError" for c in type(err).__mro__)  # (Remote)EntryNotFoundError


def _remote_headers(ref: ModelRef, commit: str, folder: Path, names: dict[str, list[str]]) -> dict[str, TensorInfo]:
    """The tensors of the Hub files ``names`` (file -> the tensors an index puts in it, to size the header
    read; [] when unknown), read at ``commit``, the files at once."""
    tensors: dict[str, TensorInfo] = {}
    with ThreadPoolExecutor(max_workers=min(8, len(names))) as pool:
        jobs = {f: pool.submit(remote_tensors, ref.repo_id, commit, f, folder / f,
                               header_bytes_guess(names[f]) if names[f] else 0) for f in sorted(names)}
        for filename, job in jobs.items():
            try:
                tensors.update(job.result())
            except ValueError as err:
                raise ModelFormatError(f"{ref}: cannot use {filename}: {err}. Is the repo's upload complete?") from None
            except Exception as err:
                if not _not_on_hub(err):
                    raise _hub_error(ref, err) from err
                if filename == "model.safetensors" and len(names) == 1 and not names[filename]:
                    raise _NotOnHub(filename) from None  # no index: the caller looks for the files the repo has
                raise ModelNotFoundError(
                    f"{ref}: its index lists {filename}, which the repo does not hold (commit {commit[:12]}): its "
                    "upload is incomplete. Ask its owner to upload the file, or use another revision (REPO@REVISION)."
                ) from None
    return tensors


def fetch_weights(info: ModelInfo) -> ModelInfo:
    """Make every weight file local and return the info with real file offsets."""
    if info.ref.local_path is not None:
        return info
    try:
        folder = Path(
            hf_hub.snapshot_download(
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

    def done(self, step: int) -> None:
        """The ``RangedWeights`` interface: whole models are released by model (``release``), not by step."""

    def close(self) -> None:
        """Nothing to stop: whole files are downloaded when first used."""

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
    out = set()
    for filename in {t.file.name for t in info.tensors.values()}:
        hit = hf_hub.try_to_load_from_cache(info.ref.repo_id, filename, revision=info.ref.revision)
        if isinstance(hit, str):
            out.add(Path(hit))
    return out
