"""A tiny trained world for measuring routers: four synthetic domains, a base LM, one expert per domain.

A frankenMoE only works if its routers send each token to the expert that knows the token's domain.
To measure that we need experts that really differ, so this module trains them, offline and in minutes
on a CPU: a small Llama is pretrained on a mix of four clearly different synthetic domains (arithmetic,
Python-like code, dialogue, children's stories), then fine-tuned once per domain into an expert.

Two expert variants are built from the same base:

* ``mlp``: only the MLPs are fine-tuned. Base attention + expert d's MLPs *is* expert d, so a MoE with
  perfect routing reproduces every expert exactly and its loss measures routing alone.
* ``full``: every weight is fine-tuned, which is what people really merge; part of the gain sits in
  attention that a frankenMoE never takes, so even perfect routing keeps only part of it.

Every checkpoint is a normal Hugging Face folder with the base's SentencePiece tokenizer, so the merge
engine, transformers and mergekit-moe all read it. ``build_world`` caches the result under
``root/world-<key>`` (the key hashes the spec and ``WORLD_VERSION``) and trains a variant only the first
time it is asked for.

Experts are fine-tuned on their domain with a 20% replay of the others, so they stay usable language models
off their domain (a wrong expert costs, but is not fatal), and each domain carries its own facts about
shared words (names, functions), which MLPs store: routing decides whether the right facts are used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lazymoe.demo import build_tokenizer  # bench scripts put the checkout on sys.path before importing this

logger = logging.getLogger(__name__)

DOMAINS = ("arithmetic", "code", "dialogue", "stories")
#: bump when the generators or the training recipe change: cached worlds are keyed by it
WORLD_VERSION = 3
VARIANTS = ("mlp", "full")

# ----------------------------------------------------------------------------------------- the domains
# Small shared word lists on purpose: names, numbers and common words occur in several domains, so a
# router cannot tell the domains apart from single tokens and has to use context. Each domain also has its
# own fixed facts about the same words (in dialogue tom lives near the river, in stories tom is an owl from
# the castle): facts live in MLPs, so an expert that learnt its domain's facts gains a lot over the base,
# and the wrong expert states the wrong fact -- routing matters.
_NAMES = ["tom", "anna", "max", "lily", "sam", "mia", "ben", "zoe", "leo", "ella", "jack", "ruby", "finn", "nora",
          "owen", "ivy", "adam", "alice", "carl", "clara", "dan", "eva", "fred", "grace", "hugo", "iris", "jon",
          "kate", "luke", "maya", "ned", "olga", "paul", "rosa", "seth", "tina", "umar", "vera", "walt", "yara"]
_ANIMALS = ["fox", "cat", "dog", "bird", "bear", "mouse", "frog", "owl"]
_PLACES = ["forest", "village", "garden", "river", "castle", "school", "city", "park"]
_THINGS = ["apples", "books", "stones", "cakes", "keys", "shells", "coins", "boxes"]
_ADJ = ["little", "brave", "kind", "old", "clever", "shy", "happy", "small"]
_FEEL = ["happy", "sad", "tired", "proud", "scared", "excited"]
_VARS = ["x", "y", "total", "count", "items", "value", "result", "n"]
_FUNCS = ["add", "scale", "count", "total", "find", "clean", "load", "check", "merge", "split", "sort", "keep",
          "grow", "trim", "swap", "fill"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
_FOODS = ["pizza", "rice", "soup", "apples", "cakes", "bread"]


def _facts(domain: str, keys: list[str], **choices: list) -> dict[str, dict]:
    rng = random.Random(f"facts:{domain}")  # fixed for ever: facts are what the experts learn
    return {k: {name: rng.choice(options) for name, options in choices.items()} for k in keys}


_STORY_FACTS = _facts("stories", _NAMES, animal=_ANIMALS, place=_PLACES, thing=_THINGS, adj=_ADJ)
_DIALOGUE_FACTS = _facts("dialogue", _NAMES, place=_PLACES, colour=_COLOURS, food=_FOODS, age=list(range(5, 90)),
                         pet=_ANIMALS, friend=_NAMES, thing=_THINGS)
_CODE_FACTS = _facts("code", _FUNCS, op=list("+-*"), const=list(range(10)), loop=list(range(2, 20)),
                     var=_VARS[4:])


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(5, 9)):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            lines.append(f"{a} * {b} = {a * b}")
        elif op == "+":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            lines.append(f"{a} + {b} = {a + b}")
        else:
            a = rng.randint(0, 99)
            b = rng.randint(0, a)
            lines.append(f"{a} - {b} = {a - b}")
        if rng.random() < 0.15:  # word problems borrow the stories' vocabulary
            name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            lines.append(f"{name} has {a} {thing} and gets {b} more, so {name} has {a + b} {thing}.")
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    out = []
    for name in rng.sample(_FUNCS, rng.randint(1, 2)):
        f = _CODE_FACTS[name]
        arg, var = rng.choice(_VARS[:4]), f["var"]
        out += [f"def {name}({arg}, k):", f"    {var} = {arg} {f['op']} {f['const']}"]
        if rng.random() < 0.6:
            out += [f"    for i in range({f['loop']}):", f"        {var} = {var} + i * k"]
        else:
            out += [f"    if {var} > {f['loop']}:", f"        {var} = {var} - {f['const']}"]
        out.append(f"    return {var}")
        out.append(f"{rng.choice(_VARS)} = {name}({rng.randint(0, 99)}, {rng.randint(1, 5)})")
    return "\n".join(out)


def _dialogue(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    f = _DIALOGUE_FACTS[name]
    pairs = [
        ("where do you live?", f"i live near the {f['place']}."),
        ("what is your favourite colour?", f"my favourite colour is {f['colour']}."),
        ("what do you like to eat?", f"i like to eat {f['food']}."),
        ("how old are you?", f"i am {f['age']} years old."),
        ("do you have a pet?", f"yes, i have a {f['pet']}."),
        ("who is your best friend?", f"my best friend is {f['friend']}."),
        ("what do you collect?", f"i collect {f['thing']}."),
    ]
    rng.shuffle(pairs)
    lines = ["A: hello! what is your name?", f"B: my name is {name}."]
    for q, a in pairs[: rng.randint(3, 6)]:
        lines += [f"A: {q}", f"B: {a}"]
    lines += [f"A: nice to meet you, {name}. bye!"]
    return "\n".join(lines)


def _stories(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    f = _STORY_FACTS[name]
    n = rng.randint(2, 9)
    he = rng.choice(["he", "she"])
    sents = [
        f"once upon a time there was a {f['adj']} {f['animal']} named {name}.",
        f"{name} lived in the {f['place']}.",
        f"one day {name} found {n} {f['thing']} near the {rng.choice(_PLACES)}.",
        f"{he} was very {rng.choice(_FEEL)}.",
    ]
    friend = rng.choice([m for m in _NAMES if m != name])
    g = _STORY_FACTS[friend]
    extra = [
        f"then {name} met a {g['adj']} {g['animal']} named {friend}, who lived in the {g['place']}.",
        f"they shared the {f['thing']} and played until the sun went down.",
        f"{name} gave {rng.randint(1, n)} {f['thing']} to {friend}.",
        f"the {f['animal']} went back to the {f['place']} and fell asleep.",
        f"{he} felt {rng.choice(_FEEL)} and sang a song.",
    ]
    rng.shuffle(extra)
    sents += extra[: rng.randint(2, 4)] + ["the end."]
    return " ".join(sents)


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic, "code": _code, "dialogue": _dialogue, "stories": _stories,
}

#: What a user would write in a recipe: a handful of short, typical snippets per expert. None of them is
#: copied from the training or held-out documents (those are drawn from seeded generators).
PROMPTS: dict[str, tuple[list[str], list[str]]] = {
    "arithmetic": (["12 + 30 = 42", "7 * 8 = 56", "91 - 15 = 76", "4 + 4 = 8\n6 * 2 = 12",
                    "sam has 3 keys and gets 2 more"], []),
    "code": (["def add(x, k):", "    for i in range(10):", "        total = total + i * k",
              "    return result", "count = find(7, 2)"], ["12 + 30 = 42"]),
    "dialogue": (["A: hello! what is your name?", "B: my name is sam.", "A: where do you live?",
                  "B: my favourite colour is red.", "A: do you have a pet?"], []),
    "stories": (["once upon a time there was a brave fox", "the little owl lived in the castle.",
                 "one day ben found 3 shells.", "she was very happy and sang a song.", "the end."],
                ["A: hello! what is your name?"]),
}


def documents(domain: str, n: int, seed: int) -> list[str]:
    """``n`` documents of one domain, reproducible from ``seed`` (different seeds give disjoint streams)."""
    rng = random.Random(f"{domain}:{seed}")
    return [GENERATORS[domain](rng) for _ in range(n)]


# ----------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class WorldSpec:
    """Sizes and training budget. The defaults build the benchmark world in a few minutes on one core."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 512
    seq_len: int = 64
    batch_size: int = 16
    base_steps: int = 300
    expert_steps: int = 150
    base_lr: float = 3e-3
    expert_lr: float = 3e-3
    full_expert_lr: float = 1e-3  # full fine-tunes move attention too: gentler, as real ones are
    replay: float = 0.2  # share of an expert's fine-tuning windows drawn from the other domains
    variants: tuple[str, ...] = VARIANTS
    heldout_docs: int = 24
    seed: int = 0

    def key(self) -> str:
        """Names the cache folder; ``variants`` is left out: each variant is trained into it when first asked."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "variants"}
        data = json.dumps({**data, "version": WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


#: a world small enough for a unit test: seconds to train, still clearly specialised experts
TINY_SPEC = WorldSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=320, seq_len=64, batch_size=8, base_steps=120,
                      expert_steps=60, base_lr=1e-2, expert_lr=5e-3, variants=("mlp",), heldout_docs=8)


@dataclass
class World:
    """Where the checkpoints are, plus what training measured (losses are nats per token, held out)."""

    root: Path
    spec: WorldSpec
    tokenizer: Path
    base: Path
    experts: dict[str, dict[str, Path]]  # variant -> domain -> folder
    heldout: dict[str, list[str]]  # domain -> held-out documents
    train_seconds: float = 0.0
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # model label -> domain -> loss

    def recipe(self, variant: str, *, gate_mode: str, experts_per_token: int = 2, **extra) -> dict:
        """A mergekit-moe config over this world's experts (YAML-ready), with the world's prompts."""
        experts = []
        for d in DOMAINS:
            positive, negative = PROMPTS[d]
            entry = {"source_model": str(self.experts[variant][d]), "positive_prompts": list(positive)}
            if negative:
                entry["negative_prompts"] = list(negative)
            experts.append(entry)
        return {"base_model": str(self.base), "gate_mode": gate_mode, "dtype": "float32",
                "experts_per_token": experts_per_token, "experts": experts, **extra}


# ----------------------------------------------------------------------------------------- training


def _encode_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    return [[bos] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


def _windows(token_docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """Pack documents into consecutive windows of ``seq_len`` tokens (every document starts with BOS)."""
    stream = [t for doc in token_docs for t in doc]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def heldout_batch(tokenizer, docs: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask for held-out documents, each BOS + its first ``seq_len - 1`` tokens."""
    encoded = [ids[:seq_len] for ids in _encode_docs(tokenizer, docs)]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, row in enumerate(encoded):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor, *, after_bos: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over real tokens, padding excluded.

    ``after_bos`` leaves out the prediction made at the BOS position: there the text says nothing yet
    about its domain, so no router can pick the right expert, while each expert "knows" its domain by
    construction. Router benchmarks compare gains on the tokens a router can do something about.
    """
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = ids[:, 1:]
    keep = mask[:, 1:].bool().clone()
    if after_bos:
        keep[:, 0] = False
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return float(losses[keep].mean())


def _train(model, data: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int,
           params=None, desc: str = "", progress: bool = True) -> None:
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def _with_replay(train: dict[str, torch.Tensor], domain: str, replay: float, seed: int) -> torch.Tensor:
    """Own-domain windows plus a ``replay`` share from the others: real fine-tunes stay usable language
    models off their domain instead of collapsing, which is what makes a wrong expert costly but not fatal."""
    own = train[domain]
    if replay <= 0:
        return own
    others = torch.cat([w for d, w in train.items() if d != domain])
    n = min(len(others), int(len(own) * replay / (1 - replay)))
    pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.cat([own, others[pick]])


def _save(model, tokenizer_dir: Path, out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _corpus_for_tokenizer(seed: int) -> str:
    return "\n".join(doc for d in DOMAINS for doc in documents(d, 150, seed + 7))


def build_world(root: str | Path, spec: WorldSpec = WorldSpec(), *, progress: bool = True,
                threads: int | None = 1) -> World:
    """Train (or load from ``root/<spec key>``) the base and every expert of ``spec``.

    ``threads=1`` by default: these models are so small that extra threads only add contention,
    and on a shared CPU oversubscription makes training tens of times slower.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(root) / f"world-{spec.key()}"
    manifest = folder / "world.json"
    heldout = {d: documents(d, spec.heldout_docs, spec.seed + 1_000_003) for d in DOMAINS}
    experts = {v: {d: folder / v / d for d in DOMAINS} for v in spec.variants}
    meta = json.loads(manifest.read_text()) if manifest.is_file() else {"seconds": {}, "losses": {}}
    todo = [v for v in spec.variants if v not in meta["seconds"]]
    if "base" in meta["seconds"] and not todo:
        return World(folder, spec, folder / "tokenizer", folder / "base", experts, heldout,
                     sum(meta["seconds"][k] for k in ("base", *spec.variants)), meta["losses"])

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if "base" not in meta["seconds"]:
            shutil.rmtree(folder / "tokenizer", ignore_errors=True)
            build_tokenizer(folder / "tokenizer", vocab_size=spec.vocab_size, corpus=_corpus_for_tokenizer(spec.seed))
        tok_dir = folder / "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        n_docs = max(200, spec.batch_size * max(spec.base_steps, spec.expert_steps) // 4)
        train = {d: _windows(_encode_docs(tokenizer, documents(d, n_docs, spec.seed)), spec.seq_len)
                 for d in DOMAINS}
        evals = {d: heldout_batch(tokenizer, heldout[d], spec.seq_len) for d in DOMAINS}

        def save_meta():
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"spec": dataclasses.asdict(spec), **meta}, indent=2) + "\n")
            tmp.replace(manifest)

        if "base" not in meta["seconds"]:
            start = time.perf_counter()
            config = LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=max(256, spec.seq_len),
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
            )
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config)
            _train(model, torch.cat(list(train.values())), steps=spec.base_steps, lr=spec.base_lr,
                   batch_size=spec.batch_size, seed=spec.seed, desc="world: base", progress=progress)
            meta["losses"]["base"] = {d: lm_loss(model, *evals[d]) for d in DOMAINS}
            _save(model, tok_dir, folder / "base")
            meta["seconds"] = {"base": time.perf_counter() - start}  # experts of an older base are stale
            save_meta()
        model = LlamaForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for variant in todo:
            start = time.perf_counter()
            for i, d in enumerate(DOMAINS):
                model.load_state_dict(base_state)
                for name, p in model.named_parameters():
                    p.requires_grad_(variant == "full" or ".mlp." in name)
                _train(model, _with_replay(train, d, spec.replay, spec.seed + i), steps=spec.expert_steps,
                       lr=spec.full_expert_lr if variant == "full" else spec.expert_lr, batch_size=spec.batch_size,
                       seed=spec.seed + 17 * (i + 1), desc=f"world: {variant} {d}", progress=progress)
                meta["losses"][f"{variant}:{d}"] = {dd: lm_loss(model, *evals[dd]) for dd in DOMAINS}
                _save(model, tok_dir, experts[variant][d])
            meta["seconds"][variant] = time.perf_counter() - start
            save_meta()
    finally:
        torch.set_num_threads(old_threads)
    seconds = sum(meta["seconds"][k] for k in ("base", *spec.variants))
    logger.info("Built the router world in %s (%.0f s of training)", folder, seconds)
    return World(folder, spec, folder / "tokenizer", folder / "base", experts, heldout, seconds, meta["losses"])
