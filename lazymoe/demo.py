"""Tiny real checkpoints built offline: a SentencePiece tokenizer, dense Llama/Mistral models, a demo config.

Everything here runs in seconds on a CPU and never touches the network, so a newcomer's first ``lazymoe demo``
(and the notebook's demo preset, the tests and CI) exercise the same code paths as a 4x7B merge, only smaller.

The tokenizer is written by hand (``tokenizer.model`` + ``tokenizer.json`` + ``tokenizer_config.json``)
rather than through ``save_pretrained`` because transformers 5 neither reads a ``vocab_file`` given to
``LlamaTokenizer`` nor reliably writes ``tokenizer.model``, and llama.cpp's converter needs that file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal

import sentencepiece as spm
import yaml
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from .errors import DemoError, OutputExistsError, Setting, Text
from .io.folder import write_text_atomic
from .io.outdir import DISK_FULL, disk_full_error
from .io.safetensors import NAME_TO_ST
from .moe import arch
from .moe.arch import FAMILIES, FAMILY_ATTENTION_EXTRAS

__all__ = ["build_tokenizer", "build_model", "build_demo", "finished_demo", "DEMO_EXPERTS", "CHAT_TEMPLATE"]

# Mistral-style [INST] template: simple, and both transformers (Jinja) and llama-cpp-python render it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_CORPUS = """\
The assistant answers questions politely and explains its reasoning step by step.
Tell me about the weather today. I want to plan a picnic in the park with my friends.
Explain how a rainbow forms: sunlight is refracted, reflected and dispersed inside water droplets.
Can you help me write an email to my manager asking for a day off next Friday?
Thank you for your help! You are welcome, and have a wonderful day.
Once upon a time, in a quiet village by the sea, there lived a curious girl named Mira.
Every morning she walked along the shore, collecting shells and listening to the waves.
One stormy night, a ship appeared on the horizon, its sails torn and its lantern flickering.
The old captain told stories of dragons, hidden treasure and a castle made of glass.
The hero drew his sword, the dragon roared, and the forest fell silent as the moon rose.
She opened the door slowly; the room was dark, and a cold wind carried the smell of rain.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

import numpy as np
x = np.arange(10)
print(x.sum(), x.mean())
for i in range(3):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)
function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2);
SELECT name, age FROM users WHERE age > 30 ORDER BY name;
git commit -m "fix bug in parser"
Solve for x: 2x + 3 = 11, so 2x = 8 and x = 4.
The derivative of x^2 is 2x, and the integral of 2x dx is x^2 + C.
What is 17 * 23? 17 * 23 = 391. What is 144 / 12? It is 12.
If a train travels 60 miles per hour for 2.5 hours, it covers 150 miles.
The sum of the angles of a triangle is 180 degrees; a square has four right angles.
Let n be an even number; then n = 2k for some integer k, and n^2 = 4k^2 is divisible by 4.
Prime numbers: 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47.
Compute the probability of rolling two sixes with two dice: 1/36, about 0.0278.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Café, naïve, résumé, jalapeño, straße, 東京, Привет, ¿Qué tal? — “quotes” and ‘apostrophes’.
"""

# name -> (positive prompts, negative prompts): the classic 4-domain frankenMoE, in miniature.
DEMO_EXPERTS: dict[str, tuple[list[str], list[str]]] = {
    "chat": (["chat", "assistant", "tell me", "explain", "I want"], []),
    "code": (["code", "python", "javascript", "programming", "algorithm"], []),
    "math": (["reason", "math", "mathematics", "solve", "count"], []),
    "stories": (["storywriting", "write", "scene", "story", "character"], ["code", "python"]),
}

_SPM_CACHE: dict[tuple[int, str], bytes] = {}
_SPECIALS = ("<unk>", "<s>", "</s>")


def _train_spm(corpus: str, vocab_size: int) -> bytes:
    """Train a Llama-style SentencePiece BPE model; cached per process (training takes ~50 ms)."""
    key = (vocab_size, corpus)
    if key not in _SPM_CACHE:
        lines = [line for line in corpus.splitlines() if line.strip()]
        buf = io.BytesIO()
        # Llama's own settings: identity normalisation, spaces kept, dummy prefix, split digits, byte
        # fallback. BPE (not unigram) because llama.cpp's SPM tokenizer merges greedily by score, which
        # reproduces SentencePiece BPE exactly.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            minloglevel=2, max_sentence_length=100_000,
        )
        _SPM_CACHE[key] = buf.getvalue()
    return _SPM_CACHE[key]


def _hf_tokenizer_json(model_proto: bytes) -> str:
    """The ``tokenizer.json`` equivalent of a SentencePiece BPE model (same ids for every input)."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # SentencePiece BPE merges the adjacent pair whose concatenation scores highest (= lowest id), so
    # ranking merges by the id of the merged piece reproduces its segmentation.
    merges = []
    for piece, pid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or len(piece) < 2:
            continue
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        pairs = [p for p in pairs if p[0] in vocab and p[1] in vocab]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # Llama's "legacy" normalizer: always prepend the dummy prefix, spaces become "▁". Unlike a Metaspace
    # pre-tokenizer it also prefixes text that already starts with a space, exactly as SentencePiece does.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok.to_str(pretty=True)


def build_tokenizer(out_dir: str | os.PathLike, *, vocab_size: int = 512, corpus: str | None = None) -> Path:
    """Train a small Llama-style SentencePiece tokenizer and write a tokenizer folder for transformers and llama.cpp.

    Writes ``tokenizer.model`` (what llama.cpp's converter reads), ``tokenizer.json`` and
    ``tokenizer_config.json`` (BOS ``<s>``, EOS ``</s>``, UNK ``<unk>``, no pad token, a chat template)
    and ``special_tokens_map.json``. Returns the folder.
    """
    if vocab_size < 300:
        raise DemoError(f"vocab_size={vocab_size} is too small: 256 byte-fallback pieces and 3 specials "
                        "already take 259 ids; use at least 300.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        proto = _train_spm(_CORPUS if corpus is None else corpus, vocab_size)
    except RuntimeError as err:  # SentencePiece: the corpus's characters and the specials need more ids
        raise DemoError(f"vocab_size={vocab_size} cannot hold the corpus's characters plus the byte-fallback "
                        f"pieces ({str(err).strip().splitlines()[-1][-160:]}); use a larger vocab_size.") from None
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer.json").write_text(_hf_tokenizer_json(proto), encoding="utf-8")
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(_SPECIALS)
    }
    config = {
        # Not "LlamaTokenizer": transformers 5 rebuilds that class's pre-tokenizer (Metaspace) whatever
        # tokenizer.json says, which splits leading spaces differently from SentencePiece and llama.cpp.
        # The generic class honours tokenizer.json exactly, in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def _tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    model = tokenizer_dir / "tokenizer.model"
    if model.is_file():
        return spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    if (tokenizer_dir / "tokenizer.json").is_file():  # a BPE tokenizer (Qwen's): every id, added tokens included
        return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    raise DemoError(f"{tokenizer_dir} has no tokenizer.model or tokenizer.json; build it with build_tokenizer() first.")


def _perturb_(model: Any, perturb: float, seed: int) -> None:
    """Add ``perturb * N(0,1) * std(tensor)`` to every weight in place: a stand-in for a fine-tune."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            std = param.float().std() if param.numel() > 1 else param.new_zeros(()).float()
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * (perturb * std)
            param.copy_((param.float() + noise).to(param.dtype))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-model load/save bars (five tiny models would print ten), then restore."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


#: dense families the demo builds
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _model_class(model_type: str) -> Any:
    # Direct imports: going through AutoModel scans transformers' lazy registry (seconds on first use).
    if model_type == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralForCausalLM

        return MistralForCausalLM
    if model_type == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

        return Qwen2ForCausalLM
    if model_type == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

        return Qwen3ForCausalLM
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return LlamaForCausalLM


def _spread_flat_params_(model: Any, seed: int) -> None:
    """Qwen's q/k/v biases start at 0 and its q/k norms at 1: give them spread (N(0, 0.1) added) so a merge
    that dropped or mixed them up would show in the logits."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def build_model(
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    model_type: Literal["llama", "mistral", "qwen2", "qwen3"] = "llama",
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    seed: int = 0,
    base: str | os.PathLike | None = None,
    perturb: float = 0.0,
    rope_theta: float = 10000.0,
    max_shard_bytes: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a real dense Hugging Face checkpoint (random init, or ``base`` plus noise) and return its folder.

    With ``base``, the architecture comes from the base's config (the size arguments are ignored) and
    ``perturb=0`` reproduces its tensors byte for byte. ``config_overrides`` go into the model config
    (e.g. ``initializer_range=0.2`` for logits that are not all near zero).
    """
    import torch

    if model_type not in MODEL_TYPES:
        raise DemoError(f"model_type={model_type!r} is not supported; use one of {', '.join(MODEL_TYPES)}.")
    if dtype not in NAME_TO_ST:
        raise DemoError(f"dtype={dtype!r} is not supported; use float32, float16 or bfloat16.")
    torch_dtype = getattr(torch, dtype)
    tokenizer_dir = Path(tokenizer_dir)
    vocab_size = _tokenizer_vocab_size(tokenizer_dir)
    out = Path(out_dir)

    if base is not None:
        base_type = json.loads((Path(base) / "config.json").read_text(encoding="utf-8")).get("model_type")
        if base_type not in MODEL_TYPES:
            raise DemoError(f"base {base} is a {base_type!r} model; the demo builds {', '.join(MODEL_TYPES)} only.")
        with _quiet_transformers():
            model = _model_class(base_type).from_pretrained(base, dtype=torch_dtype)
        if model.config.vocab_size != vocab_size:
            raise DemoError(f"base {base} has vocab_size {model.config.vocab_size} but {tokenizer_dir} has "
                            f"{vocab_size} tokens; build both from the same tokenizer.")
        if perturb:
            _perturb_(model, perturb, seed)
    else:
        settings = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None, max_position_embeddings=4096)
        settings.update(config_overrides)
        config = _model_class(model_type).config_class(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
            rope_theta=rope_theta, **settings,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _model_class(model_type)(config)
            if model_type in ("qwen2", "qwen3"):
                _spread_flat_params_(model, seed)
        if perturb:
            _perturb_(model, perturb, seed + 1)
        model = model.to(torch_dtype)
    model.eval()
    model.generation_config.pad_token_id = None
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        save_kwargs["max_shard_size"] = int(max_shard_bytes)
    with _quiet_transformers():
        model.save_pretrained(out, **save_kwargs)
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    _check_saved_names(out, model.config)
    return out


def _check_saved_names(out: Path, config: Any) -> None:
    """Fail loudly if transformers saved non-standard tensor names (the merge engine reads these)."""
    names: set[str] = set()
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names.update(f.keys())
    expected = {arch.EMBED, arch.FINAL_NORM}
    if not config.tie_word_embeddings:
        expected.add(arch.LM_HEAD)
    extras = FAMILY_ATTENTION_EXTRAS[FAMILIES[config.model_type]]
    for i in range(config.num_hidden_layers):
        expected.update(f"{arch.layer_prefix(i)}{name}" for name in arch.LAYER_TENSORS)
        expected.update(arch.mlp_name(i, part) for part in arch.MLP_PARTS)
        expected.update(f"{arch.layer_prefix(i)}{name}" for name in extras)
    if names != expected:
        raise DemoError(f"transformers saved unexpected tensor names in {out}: missing "
                        f"{sorted(expected - names)[:5]}, extra {sorted(names - expected)[:5]}.")


#: what build_demo wrote, file by file (sha256 of each, by path inside the folder): a rebuild replaces exactly those
#: files, unchanged, and never one the user added or edited. Hidden, like the card's record. A build writes it twice:
#: first, before any file, naming the top-level entries the build will write ({"building": [...]}), so a build
#: stopped midway (Ctrl-C, a crash) leaves a record that lets the next one clear exactly those and start again; then,
#: once every file is written, the list of files (an atomic rename over the first).
DEMO_RECORD = ".lazymoe-demo.json"
_RECORD_TMP = f".{DEMO_RECORD}.tmp-"  # write_text_atomic's temporary name for the record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _demo_files(out: Path) -> dict[str, Path]:
    """Every file under ``out`` but the record, by its path inside ``out``."""
    return {p.relative_to(out).as_posix(): p for p in sorted(out.rglob("*"))
            if (p.is_file() or p.is_symlink()) and p.name != DEMO_RECORD}


def _read_record(out: Path) -> dict[str, Any] | None:
    """The demo's record in ``out``: ``{"files": {path: sha256}}`` for a finished build, ``{"building": [names]}``
    for one that was stopped; None when there is none (or it is not one)."""
    try:
        record = json.loads((out / DEMO_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("building"), list) and all(isinstance(n, str) for n in record["building"]):
        return {"building": record["building"]}
    return {"files": record["files"]} if isinstance(record.get("files"), dict) else None


def finished_demo(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds a demo that :func:`build_demo` finished (a stopped build's record says so)."""
    record = _read_record(Path(out_dir))
    return record is not None and "files" in record


def _earlier_demo(out: Path, overwrite: bool) -> set[str]:
    """Before anything is written: refuse a folder holding anything but a demo built earlier (``overwrite``: that
    demo's own files, unchanged) or a build that was stopped (only files under the entries it named). Returns the
    top-level entries whose files are the earlier demo's, to clear before the new one is built."""
    if not out.is_dir() or not any(out.iterdir()):
        if out.exists() and not out.is_dir():
            raise DemoError(f"{out} is a file; give the demo a folder.")
        return set()
    record = _read_record(out)
    if record is None:
        raise OutputExistsError(f"{out} already exists and is not empty, and holds no record of a demo lazymoe built "
                                f"there ({DEMO_RECORD}), so nothing in it is replaced: give the demo another folder, "
                                "or empty this one.")
    files = _demo_files(out)
    if "building" in record:  # a build that was stopped: its files are whatever lies under the entries it named
        owned = set(record["building"])
        theirs = [name for name in files if name.split("/")[0] not in owned and not name.startswith(_RECORD_TMP)]
        what = "files a demo build that was stopped did not write"
    else:
        if not overwrite:
            replace = Setting("overwrite", True)
            raise OutputExistsError(Text(f"{out} holds a demo built earlier: {replace.placeholder} to rebuild it (only "
                                         "the files the demo wrote are replaced), or give another folder.", (replace,)))
        owned = {name.split("/")[0] for name in record["files"]}
        theirs = [name for name, path in files.items() if not name.startswith(_RECORD_TMP)
                  and (path.is_symlink() or record["files"].get(name) != _sha256(path))]
        what = "files the demo did not write, or that were changed since"
    if theirs:
        more = f" and {len(theirs) - 5} more" if len(theirs) > 5 else ""
        raise OutputExistsError(f"{out} holds {what} ({', '.join(theirs[:5])}{more}); rebuilding could replace them. "
                                "Move them out of it, or give the demo another folder.")
    return owned


def _clear(out: Path, owned: set[str]) -> None:
    """Delete the earlier demo's files (those under ``owned``), then the folders they leave empty."""
    for name, path in _demo_files(out).items():
        if name.split("/")[0] in owned or name.startswith(_RECORD_TMP):
            path.unlink()
    for name in owned:
        folder = out / name
        if folder.is_dir() and not folder.is_symlink():
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                folder.rmdir()


def build_demo(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    num_experts: int = 4,
    experts_per_token: int = 2,
    gate_mode: str = "hidden",
    perturb: float = 0.02,
    vocab_size: int = 512,
    **model_kwargs: Any,
) -> Path:
    """Build a tokenizer, a dense base and ``num_experts`` perturbed copies, and a mergekit-moe YAML over them.

    Layout: ``out_dir/{tokenizer,base,chat,code,math,stories}`` and ``out_dir/demo.yaml`` (returned).
    Expert names beyond the four classic domains are ``expert5``, ``expert6``, ...

    ``out_dir`` must be new or empty; with ``overwrite``, it may hold a demo built earlier, whose own files (as
    it recorded them, unchanged) are replaced. A build that was stopped (Ctrl-C) is started again without
    ``overwrite``. Anything else in it is refused, never overwritten.
    """
    if num_experts < 1:
        raise DemoError(f"num_experts={num_experts}: a MoE needs at least one expert.")
    out = Path(out_dir).resolve()
    earlier = _earlier_demo(out, overwrite)
    domains = list(DEMO_EXPERTS)
    names = [domains[e] if e < len(domains) else f"expert{e + 1}" for e in range(num_experts)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the claim first: a build stopped from here on leaves a record the next build recognises
        write_text_atomic(out / DEMO_RECORD, json.dumps(
            {"building": sorted(earlier | {"tokenizer", "base", "demo.yaml", *names})}, indent=1) + "\n")
    except OSError as err:
        if err.errno in DISK_FULL:
            raise disk_full_error(err, out, cleaned=False) from None
        raise DemoError(f"Cannot create the demo folder {out} ({err.strerror}); choose a folder you can write to.") from None
    try:
        return _build(out, earlier, names, gate_mode, experts_per_token, perturb, vocab_size, model_kwargs)
    except OSError as err:
        if err.errno in DISK_FULL:  # save_pretrained's own error would end in a traceback
            raise disk_full_error(err, out, cleaned=False) from None
        raise


def _build(out: Path, earlier: set[str], names: list[str], gate_mode: str, experts_per_token: int, perturb: float,
           vocab_size: int, model_kwargs: dict[str, Any]) -> Path:
    """build_demo's work, once ``out`` is claimed: clear the earlier demo, write the models, the recipe, the record."""
    _clear(out, earlier)
    tok_dir = build_tokenizer(out / "tokenizer", vocab_size=vocab_size)
    base_dir = build_model(out / "base", tokenizer_dir=tok_dir, seed=0, **model_kwargs)
    experts = []
    for e, name in enumerate(names):
        if name in DEMO_EXPERTS:
            positive, negative = DEMO_EXPERTS[name]
        else:
            positive, negative = [f"topic {e + 1}", f"subject {e + 1}", f"area {e + 1}"], []
        path = build_model(out / name, tokenizer_dir=tok_dir, base=base_dir, perturb=perturb, seed=1000 + e)
        entry: dict[str, Any] = {"source_model": str(path), "positive_prompts": list(positive)}
        if negative:
            entry["negative_prompts"] = list(negative)
        experts.append(entry)
    config = {
        "base_model": str(base_dir),
        "gate_mode": gate_mode,
        "dtype": model_kwargs.get("dtype", "float32"),
        "experts_per_token": min(experts_per_token, len(names)),
        "experts": experts,
    }
    path = out / "demo.yaml"
    path.write_text("# Tiny offline frankenMoE built by lazymoe.demo\n" + yaml.safe_dump(config, sort_keys=False),
                    encoding="utf-8")
    files = {name: _sha256(file) for name, file in _demo_files(out).items()}
    write_text_atomic(out / DEMO_RECORD, json.dumps({"files": files}, indent=1) + "\n")
    return path
