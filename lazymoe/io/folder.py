"""What a lazymoe output folder holds, and the small file operations every stage shares.

A merged folder is recognised by its recipe (``lazymoe_config.yml``) next to ``config.json``; the merge
writes both last-but-one, just before the folder is renamed into place, so a folder with both is finished.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import ConfigError, ModelFormatError, ModelNotFoundError, Setting, Text, WeightsOnHubError

#: what the merged folder calls the recipe that built it (written by merge, read by card, gguf and the notebook)
CONFIG_FILENAME = "lazymoe_config.yml"
CARD_FILENAME = "README.md"
#: a model's tokenizer files: read from the base, copied byte for byte into the merged folder
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
#: what the later stages add to a merged folder: `lazymoe route`, then `lazymoe eval` (skills, answers, lm-eval)
ROUTING_IMAGE = "routing.png"
EVAL_JSON = "eval.json"
EVAL_IMAGE = "eval.png"
ANSWERS_MD = "answers.md"
ANSWERS_JSON = "answers.json"
BENCHMARKS_JSON = "benchmarks.json"
#: the sha256 of the README.md lazymoe last wrote (publish.card): a README.md that no longer matches it was
#: edited by hand, and lazymoe leaves it alone. Hidden, so a push never uploads it.
CARD_RECORD = ".lazymoe-card.sha256"
#: what every model card lazymoe renders says (templates/model_card.md.j2, since the first card): how a README.md
#: written before lazymoe kept CARD_RECORD is told from the user's own
CARD_SIGNATURE = "is a Mixture of Experts (MoE) built with lazymoe from"
#: where the weights of a merge that uploaded each shard and deleted it (``merge --push --no-keep``) went: the
#: repo, its Hub and the commit (:class:`HubCopy`, JSON), written once that commit landed. Hidden, so a push never
#: uploads it; it marks no folder as complete: the steps that read the weights name that repo instead of failing.
HUB_RECORD = ".lazymoe-hub.json"
#: in a NAME-GGUF folder: what each GGUF file was made from (``gguf.files``), so that a file made from an
#: earlier merge of the model is made again rather than reused
GGUF_RECORD = ".lazymoe-gguf.json"
#: the hidden files lazymoe keeps in folders it wrote (never uploaded, like every hidden file)
LAZYMOE_RECORDS = (CARD_RECORD, HUB_RECORD, GGUF_RECORD)
#: the names a merge gives its weights (moe.plan: one model.safetensors, or model-0000i-of-0000N.safetensors and their
#: index): a push replaces those of an earlier upload to the same repo, and no other file there
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
WEIGHT_INDEX = "model.safetensors.index.json"
#: every file a lazymoe output folder may hold (shell patterns); anything else in it is the user's own
OUTPUT_FILES = ("config.json", "generation_config.json", CONFIG_FILENAME, CARD_FILENAME, "model*.safetensors",
                WEIGHT_INDEX, *TOKENIZER_FILES, ROUTING_IMAGE, EVAL_JSON, EVAL_IMAGE, ANSWERS_MD,
                ANSWERS_JSON, BENCHMARKS_JSON, CARD_RECORD, HUB_RECORD, ".*.tmp-*")


def write_card_text(folder: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``folder/README.md`` and record its hash, so a later edit by hand is recognised."""
    folder = Path(folder)
    path = write_text_atomic(folder / CARD_FILENAME, text)
    write_text_atomic(folder / CARD_RECORD, hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    return path


def card_edited(folder: str | os.PathLike) -> bool:
    """Whether ``folder/README.md`` is the user's to keep: lazymoe replaces it only with an explicit
    overwrite (see :func:`card_kept_because`). A missing README.md is not (there is nothing to lose)."""
    return card_kept_because(folder) is not None


def card_kept_because(folder: str | os.PathLike) -> str | None:
    """Why ``folder/README.md`` is the user's, as a phrase after its path ("was edited since lazymoe wrote it",
    "was not written by lazymoe"), or None when lazymoe may replace it: it matches the record lazymoe keeps of
    the card it wrote (:data:`CARD_RECORD`), or, with no record, it is a model card lazymoe rendered before it
    kept one (a model folder whose README.md says :data:`CARD_SIGNATURE`). With no record, any other README.md
    is the user's, and always in a folder without config.json (a NAME-GGUF folder: ``lazymoe gguf`` writes no
    card there)."""
    folder = Path(folder)
    try:
        card = (folder / CARD_FILENAME).read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return _NOT_OURS
    try:
        recorded = (folder / CARD_RECORD).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        ours = (folder / "config.json").is_file() and CARD_SIGNATURE.encode() in card
        return None if ours else _NOT_OURS
    except (OSError, UnicodeDecodeError):
        return _EDITED
    return None if recorded == hashlib.sha256(card).hexdigest() else _EDITED


_EDITED = "was edited since lazymoe wrote it"
_NOT_OURS = "was not written by lazymoe"


def is_lazymoe_output(folder: str | os.PathLike, *, follow_links: bool = True) -> bool:
    """True for a folder a finished ``lazymoe merge`` wrote: its recipe next to config.json.

    ``follow_links=False``: a link to such a folder is not one (the output transaction never replaces or
    deletes through a link)."""
    folder = Path(folder)
    if not follow_links and folder.is_symlink():
        return False
    return folder.is_dir() and (folder / CONFIG_FILENAME).is_file() and (folder / "config.json").is_file()


def foreign_entries(folder: str | os.PathLike, ours: tuple[str, ...] = OUTPUT_FILES) -> list[str]:
    """What a lazymoe output folder holds that no lazymoe step writes (the user's notes, a subfolder...),
    sorted, folders with a trailing ``/``: replacing the folder would delete them. ``ours``: the name patterns
    lazymoe writes there (a merged model's by default)."""
    found = []
    for entry in Path(folder).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            found.append(entry.name + "/")
        elif not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in ours):
            found.append(entry.name)
    return sorted(found)


def require_lazymoe_output(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path if a finished merge wrote it and its weights are here, else :class:`ModelNotFoundError`
    saying what to give (see :func:`require_weights`)."""
    folder = Path(folder)
    if not is_lazymoe_output(folder):
        raise ModelNotFoundError(f"{folder} has no config.json and {CONFIG_FILENAME}; give the folder lazymoe merge "
                                 "wrote.")
    require_weights(folder)
    return folder


@dataclass(frozen=True)
class HubCopy:
    """The Hub repo that holds a merged folder's weights (:data:`HUB_RECORD`)."""

    repo_id: str  # namespace/name
    endpoint: str  # the Hub it is on, e.g. https://huggingface.co
    commit: str | None = None  # the commit that uploaded them
    # what the upload reported (publish.hub.PushResult), so that a later session can report it too; None in a
    # record written before these were kept
    private: bool | None = None
    files: int | None = None
    bytes: int | None = None
    commit_url: str | None = None

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"


def write_hub_record(folder: Path, copy: HubCopy) -> Path:
    """Record in ``folder`` that its weights are in ``copy`` (call once the commit holding them landed)."""
    return write_text_atomic(Path(folder) / HUB_RECORD, json.dumps(dataclasses.asdict(copy), indent=1) + "\n")


def read_hub_record(folder: Path) -> HubCopy | None:
    """Where ``folder``'s weights were uploaded to (:func:`write_hub_record`), or None: no record, or one that
    cannot be read (then nothing is known about a Hub copy)."""
    def number(text: str) -> int:  # a number too long to be a byte count is no count (and not json's ValueError)
        return int(text) if len(text) <= 20 else -1

    try:
        data = json.loads((Path(folder) / HUB_RECORD).read_text(encoding="utf-8"), parse_int=number)
        copy = HubCopy(data["repo_id"], data["endpoint"], data.get("commit"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None

    def text(value: object) -> bool:
        return isinstance(value, str) and bool(value) and value.isprintable()

    if not (text(copy.repo_id) and text(copy.endpoint) and (copy.commit is None or text(copy.commit))):
        return None
    # the upload's report: kept only where every part of it reads as what it should be
    report = {key: data.get(key) for key in ("private", "files", "bytes", "commit_url")}
    url = report["commit_url"]
    if (isinstance(report["private"], bool) and all(type(report[k]) is int and report[k] >= 0 for k in ("files", "bytes"))
            and (url is None or (text(url) and url.startswith(f"{copy.endpoint}/")))):
        copy = dataclasses.replace(copy, **report)
    return copy


def require_weights(folder: str | os.PathLike) -> None:
    """Every step that reads a merged folder's weights calls this first. A lazymoe output whose weight files are
    not all here is refused in one line: :class:`WeightsOnHubError` naming the repo that holds them when
    ``merge --push --no-keep`` recorded one (:data:`HUB_RECORD`), else ModelNotFoundError naming what is missing.
    Any other folder passes (the caller checks what it needs of it)."""
    folder = Path(folder)
    if not is_lazymoe_output(folder):
        return
    try:
        missing = missing_weights(folder)
    except ModelFormatError:  # a damaged index: each caller names it in its own words
        return
    if not missing:
        return
    copy = read_hub_record(folder)
    if copy is not None:
        local = folder.with_name(f"{folder.name}-full") if folder.name else Path("model-full")
        raise WeightsOnHubError(
            f"{folder} holds the small files only: its weights were uploaded to {copy.url} and deleted here as each "
            f"shard went up, and this step reads them from this disk. Download the model (`hf download {copy.repo_id} "
            f"--local-dir {local}`) and give that folder instead, or run this where a full copy is.",
            url=copy.url)
    shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
    replace = Setting("overwrite", True)
    raise ModelNotFoundError(Text(
        f"{folder} lacks its weight files ({shown}): they were deleted or never copied here. Merge again "
        f"({replace.placeholder} to replace this folder).", (replace,)))


def read_json(path: Path, what: str, ref: object) -> dict:
    """A JSON object from a model's file, or ModelFormatError saying which file is broken and what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelFormatError(f"{ref}: {what} is not UTF-8 text; the file is damaged, download the model again.") from None
    except (ValueError, RecursionError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise ModelFormatError(
            f"{ref}: {what} is not valid JSON{where}; the file is damaged, download the model again."
        ) from None
    if not isinstance(data, dict):
        raise ModelFormatError(
            f"{ref}: {what} holds a JSON {type(data).__name__}, not an object; download the model again."
        )
    return data


def read_folder_config(folder: Path) -> dict:
    """A merged (or dense) folder's config.json as a dict, or one ModelFormatError saying what is wrong with it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json; give the folder lazymoe merge wrote.")
    return read_json(path, "config.json", str(folder))


def read_folder_recipe(folder: Path) -> dict | None:
    """The recipe a merge saved in ``folder`` (None if there is none), or ModelFormatError if it is damaged."""
    path = Path(folder) / CONFIG_FILENAME
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problem = getattr(err, "problem", None) or "not readable"
        raise ModelFormatError(f"{path} is damaged ({problem}); merge again, or restore it from the model "
                               "card's recipe.") from None
    if data is not None and not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a recipe (a YAML mapping); merge again, or restore it from the "
                               "model card's recipe.")
    return data


def load_folder_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, or one ModelFormatError naming the files to restore."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ModelFormatError(f"{folder} has no usable tokenizer ({str(err).splitlines()[0][:160]}); copy the "
                               "base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it, "
                               "or merge again.") from None


def missing_weights(folder: Path) -> list[str]:
    """The weight files a merged folder's index names that are not in it: a merge that uploaded each shard and
    deleted it (``merge --push --no-keep``) leaves the small files only."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.is_file():
        return [] if (Path(folder) / "model.safetensors").is_file() else ["model.safetensors"]
    names = read_json(index, index.name, folder).get("weight_map")
    if not isinstance(names, dict):
        return []  # not an index: whoever reads it says so
    # a name of a file elsewhere than in the folder is not ours to report: whoever reads the index refuses it
    plain = {n for n in names.values() if isinstance(n, str) and n == Path(n).name and "\\" not in n
             and n not in ("", ".", "..") and n.isprintable()}
    return sorted(n for n in plain if not (Path(folder) / n).is_file())


def read_user_text(path: Path, what: str) -> str:
    """The text of a file the user named (``what`` says which, e.g. "Question file"), or ConfigError saying
    why it cannot be read: not UTF-8 (where), a folder, no permission."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at position "
                          f"{err.start}); save it as UTF-8.") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give a file.") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read ({err.strerror or err}).") from None


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``path``, or would hold it once created (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
