"""Synthetic dense Llama checkpoints for the merge benchmark: real layout, random bytes, cached.

A merge benchmark needs inputs shaped like the models people merge (Mistral-7B: hidden 4096, MLP 14336,
32 heads, 8 KV heads, vocab 32000), but neither tool looks at the values when the router is random, so
the weights are random bit patterns written straight to safetensors — no model is ever instantiated,
which keeps building ~10 GB of inputs to a couple of minutes and well under the RAM of a small machine.

The bits are masked into a narrow exponent range so every value is finite and small (|w| < 0.016, norms
in [1, 2)): a ``hidden`` gate pass over these models then runs without overflow, and byte comparisons
never meet NaN. Every tensor of every model gets its own seed, so a tool that takes a tensor from the
wrong expert or layer produces different bytes and the verification step catches it.
"""

from __future__ import annotations

import compileall
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Bump when the files written here change, so caches built by an older version are rebuilt.
FORMAT_VERSION = 1
MARKER = ".bench-complete"  # written last: a folder without it was interrupted and is rebuilt

# Bit patterns per dtype: (integer view, real dtype, mantissa mask, exponent for |w| in [2^-7, 2^-6),
# exponent of 1.0). Weights keep a random sign and mantissa; norms keep the mantissa only, giving [1, 2).
_BITS = {
    "bfloat16": (torch.int16, torch.bfloat16, 0x007F, 0x3C00, 0x3F80),
    "float16": (torch.int16, torch.float16, 0x03FF, 0x2000, 0x3C00),
    "float32": (torch.int32, torch.float32, 0x007FFFFF, 0x3C000000, 0x3F800000),
}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# One prompt set per expert so the config is also valid for the prompt-reading gate modes, with
# prompts that differ per expert (both tools refuse identical prompts). Taken from the Beyonder recipe.
PROMPTS = [
    ["chat", "assistant", "tell me", "explain", "I want"],
    ["code", "python", "javascript", "programming", "algorithm"],
    ["storywriting", "write", "scene", "story", "character"],
    ["reason", "math", "mathematics", "solve", "count"],
]


@dataclass(frozen=True)
class Shape:
    """The dense model every expert shares. Defaults: Mistral-7B widths with fewer layers."""

    hidden: int = 4096
    intermediate: int = 14336
    layers: int = 4
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def key(self) -> str:
        return (f"h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}kv{self.kv_heads}"
                f"-v{self.vocab}-{self.dtype}")

    @property
    def itemsize(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of a dense Llama checkpoint, in the order Hugging Face writes them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def nbytes(self, shape: tuple[int, ...]) -> int:
        n = self.itemsize
        for d in shape:
            n *= d
        return n

    def config_json(self) -> dict:
        """A plain Llama config.json, which both lazymoe and mergekit-moe accept as a Mixtral input."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": self.dtype,
        }


def compile_lazymoe() -> None:
    """Byte-compile lazymoe's modules, as pip does for an installed package and as any earlier run does where
    Python may write bytecode. A machine that sets PYTHONDONTWRITEBYTECODE (this one does) would otherwise
    compile every module again in each measured run: about 0.12 s of start-up no user pays."""
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "lazymoe", quiet=1)


def random_tensor(shape: tuple[int, ...], dtype: str, seed: int, *, norm: bool = False) -> torch.Tensor:
    """Random finite values of ``dtype`` made by bit masking: several times faster than torch.randn on CPU."""
    int_dtype, real_dtype, mantissa, weight_exp, one_exp = _BITS[dtype]
    bits = 8 * torch.empty((), dtype=int_dtype).element_size()
    sign = 1 << (bits - 1)
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-sign, sign, shape, dtype=int_dtype, generator=gen)

    def signed(v: int) -> int:  # torch's bitwise ops want the mask as a value of the signed dtype
        return v - (1 << bits) if v >= sign else v

    keep = mantissa if norm else mantissa | sign
    raw.bitwise_and_(signed(keep)).bitwise_or_(signed(one_exp if norm else weight_exp))
    return raw.view(real_dtype)


def _write_dense(folder: Path, shape: Shape, model_index: int, max_shard_bytes: int, log) -> None:
    """Write one dense model as sharded safetensors plus an index, as the Hub layout has it."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        if groups[-1] and size + shape.nbytes(dims) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, dims))
        size += shape.nbytes(dims)
    n = len(groups)
    weight_map: dict[str, str] = {}
    tensor_index = 0
    for g, group in enumerate(groups):
        filename = f"model-{g + 1:05d}-of-{n:05d}.safetensors"
        # one shard in memory at a time (save_file needs the dict); shards are small enough for that
        shard = {}
        for name, dims in group:
            seed = model_index * 1_000_003 + tensor_index  # distinct bytes for every tensor of every model
            shard[name] = random_tensor(dims, shape.dtype, seed, norm=name.endswith("norm.weight"))
            weight_map[name] = filename
            tensor_index += 1
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
        log(f"  {folder.name}/{filename}")
    total = sum(shape.nbytes(d) for _, d in shape.tensors())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build_tokenizer(folder: Path) -> str:
    """A real (tiny) tokenizer: lazymoe's demo one when available, else a byte-level BPE trained here.

    Both tools load the base tokenizer and copy it to the output, so the folder needs one; its size does
    not matter as long as it has no more tokens than the embedding has rows.
    """
    try:
        from lazymoe.demo import build_tokenizer as demo_tokenizer
    except ImportError:
        demo_tokenizer = None
    if demo_tokenizer is not None:
        demo_tokenizer(folder)
        return "lazymoe.demo.build_tokenizer (SentencePiece BPE, 512 tokens)"

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(p) for p in PROMPTS] + [
        "The quick brown fox jumps over the lazy dog.",
        "def add(a, b):\n    return a + b\n",
        "Once upon a time there was a model made of experts.",
        "Solve 12 * 7 and explain each step.",
    ]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return f"byte-level BPE trained with tokenizers ({tok.get_vocab_size()} tokens)"


def build_experts(root: Path, shape: Shape, num_experts: int, *, max_input_shard_bytes: int = 1_000_000_000,
                  log=print) -> list[Path]:
    """Return ``num_experts`` dense model folders under ``root``, building the ones not cached yet."""
    root = root / shape.key
    root.mkdir(parents=True, exist_ok=True)
    spec = {"format": FORMAT_VERSION, "shape": asdict(shape), "max_input_shard_bytes": max_input_shard_bytes}
    tok_dir = root / "tokenizer"
    if not (tok_dir / MARKER).is_file():
        shutil.rmtree(tok_dir, ignore_errors=True)
        tok_dir.mkdir()
        how = build_tokenizer(tok_dir)
        (tok_dir / MARKER).write_text(how + "\n")
    folders = []
    for e in range(num_experts):
        folder = root / f"expert{e}"
        marker = folder / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == {**spec, "model_index": e}:
            folders.append(folder)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        log(f"building synthetic expert {e} ({shape.key}) in {folder}")
        _write_dense(folder, shape, e, max_input_shard_bytes, log)
        (folder / "config.json").write_text(json.dumps(shape.config_json(), indent=2) + "\n")
        gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for f in tok_dir.iterdir():
            if f.name != MARKER:
                shutil.copyfile(f, folder / f.name)
        marker.write_text(json.dumps({**spec, "model_index": e}))
        folders.append(folder)
    return folders


def tokenizer_origin(root: Path, shape: Shape) -> str:
    marker = root / shape.key / "tokenizer" / MARKER
    return marker.read_text().strip() if marker.is_file() else "?"


def write_moe_config(path: Path, experts: list[Path], *, gate_mode: str, dtype: str, experts_per_token: int) -> Path:
    """One mergekit-moe YAML that both tools read unchanged. The base is expert 0, as in the Beyonder recipe."""
    lines = [
        f"base_model: {json.dumps(str(experts[0]))}",
        f"gate_mode: {gate_mode}",
        f"dtype: {dtype}",
        f"experts_per_token: {experts_per_token}",
        "experts:",
    ]
    for e, folder in enumerate(experts):
        prompts = PROMPTS[e % len(PROMPTS)]
        if e >= len(PROMPTS):  # keep prompts distinct per expert beyond the four recipe topics
            prompts = [f"{p} {e}" for p in prompts]
        lines.append(f"  - source_model: {json.dumps(str(folder))}")
        lines.append("    positive_prompts:")
        lines += [f"      - {json.dumps(p)}" for p in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
