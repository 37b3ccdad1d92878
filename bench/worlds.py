"""A suite of small trained worlds for measuring routers: domain sets, expert counts, bases, prompt styles.

A router is only good if it is good on worlds it was not developed on, so the router benchmark measures
several worlds that differ in every way that changes routing:

* **domain sets**: formats (arithmetic, code, dialogue, stories), natural-language-like domains
  (recipes, weather reports, sports reports, letters) and a third set (science facts, poems, shop
  records, quizzes); an eight-domain world mixes two sets;
* **expert count**: 4 and 8;
* **base size and training length**: 2 to 3 layers, hidden 48 to 64, 250 to 600 steps;
* **prompt style** (what users write in a recipe): descriptive words only ("code", "python", ...),
  words plus one example, or five examples;
* **expert training**: ``mlp`` (only the MLPs fine-tuned: perfect routing reproduces the expert) and
  ``full`` (every weight fine-tuned, as people really merge).

Every domain carries its own facts about shared words (names, places, things) that MLPs store, so the
right expert gains a lot over the base and the wrong one states the wrong fact. A share of every domain's
documents opens with a topic line that uses the domain's descriptive words ("python code:", "a story"), as
real text does; that is how a real base learns what "code" or "storywriting" means, so words-only prompts
mean something to the base and the experts here as they do in real models.

Built worlds are cached under ``root/world-<key>`` (the key hashes the spec and ``WORLD_VERSION``).
This is benchmark code: it uses the package only through its public functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

#: bump when the generators or the training recipe change: cached worlds are keyed by it
WORLD_VERSION = 2
VARIANTS = ("mlp", "full")
PROMPT_STYLES = ("words", "words+example", "examples")

# ----------------------------------------------------------------------------------------- shared words
# Small shared word lists on purpose: names, numbers and common words occur in several domains, so a
# router cannot tell the domains apart from single tokens and has to use context.
NAMES = ["tom", "anna", "max", "lily", "sam", "mia", "ben", "zoe", "leo", "ella", "jack", "ruby", "finn", "nora",
         "owen", "ivy", "adam", "alice", "carl", "clara", "dan", "eva", "fred", "grace", "hugo", "iris", "jon",
         "kate", "luke", "maya", "ned", "olga", "paul", "rosa", "seth", "tina"]
ANIMALS = ["fox", "cat", "dog", "bird", "bear", "mouse", "frog", "owl"]
PLACES = ["forest", "village", "garden", "river", "castle", "school", "city", "park"]
THINGS = ["apples", "books", "stones", "cakes", "keys", "shells", "coins", "boxes"]
ADJ = ["little", "brave", "kind", "old", "clever", "shy", "happy", "small"]
FEEL = ["happy", "sad", "tired", "proud", "scared", "excited"]
VARS = ["x", "y", "total", "count", "items", "value", "result", "n"]
FUNCS = ["add", "scale", "count", "total", "find", "clean", "load", "check", "merge", "split", "sort", "keep"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
FOODS = ["pizza", "rice", "soup", "apples", "cakes", "bread"]
TEAMS = ["lions", "eagles", "sharks", "wolves", "bears", "tigers", "hawks", "foxes"]
INGREDIENTS = ["flour", "sugar", "eggs", "butter", "milk", "salt", "rice", "apples", "cheese", "onions"]
DISHES = ["soup", "cake", "bread", "pie", "stew", "salad", "pasta", "curry"]
WEATHER = ["sunny", "rainy", "cloudy", "windy", "snowy", "foggy", "stormy"]
PLANETS = ["moon", "sun", "mars", "earth", "venus", "river", "ocean", "forest"]
ELEMENTS = ["iron", "water", "gas", "rock", "ice", "dust", "salt", "carbon"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


class _Facts:
    """A domain's facts about shared words. The base reads documents with facts drawn afresh each time
    (it learns the formats, not the facts); experts and held-out text use the fixed table, which is what
    an expert learns and the base cannot know, as with a real domain fine-tune."""

    def __init__(self, domain: str, keys: list[str], **choices: list):
        rng = random.Random(f"facts:{domain}")  # fixed for ever: facts are what the experts learn
        self.choices = choices
        self.rows = {k: {name: rng.choice(options) for name, options in choices.items()} for k in keys}

    def get(self, key: str, rng: random.Random, fixed: bool) -> dict:
        if fixed:
            return self.rows[key]
        return {name: rng.choice(options) for name, options in self.choices.items()}


_facts = _Facts


_STORY = _facts("stories", NAMES, animal=ANIMALS, place=PLACES, thing=THINGS, adj=ADJ)
_DIALOGUE = _facts("dialogue", NAMES, place=PLACES, colour=COLOURS, food=FOODS, age=list(range(5, 90)),
                   pet=ANIMALS, friend=NAMES)
_CODE = _facts("code", FUNCS, op=list("+-*"), const=list(range(10)), loop=list(range(2, 20)), var=VARS[4:])
_RECIPE = _facts("recipes", DISHES, a=INGREDIENTS, b=INGREDIENTS, minutes=list(range(10, 90, 5)),
                 heat=list(range(150, 250, 10)), serves=list(range(2, 9)))
_WEATHER = _facts("weather", PLACES + NAMES[:8], sky=WEATHER, temp=list(range(-5, 35)), wind=list(range(5, 60, 5)))
_SPORTS = _facts("sports", TEAMS, city=PLACES, coach=NAMES, star=NAMES, colour=COLOURS)
_LETTERS = _facts("letters", NAMES, place=PLACES, thing=THINGS, sibling=NAMES, job=["baker", "teacher", "farmer",
                  "doctor", "painter", "sailor"])
_SCIENCE = _facts("science", PLANETS, made=ELEMENTS, colour=COLOURS, size=["tiny", "small", "large", "huge"],
                  hot=list(range(-200, 500, 25)))
_POEMS = _facts("poems", ANIMALS + PLACES, adj=ADJ + COLOURS, verb=["sings", "sleeps", "dreams", "shines", "waits",
                "dances"], time=["night", "dawn", "noon", "spring", "winter", "rain"])
_RECORDS = _facts("records", NAMES, item=THINGS + FOODS, price=list(range(1, 50)), city=PLACES,
                  id=list(range(100, 999)))
_QUIZ = _facts("quiz", ANIMALS + PLANETS, legs=list(range(0, 9)), home=PLACES, colour=COLOURS, eats=FOODS)


def _arithmetic(rng: random.Random, fixed: bool = True) -> str:
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
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            lines.append(f"{name} has {a} {thing} and gets {b} more, so {name} has {a + b} {thing}.")
    return "\n".join(lines)


def _code(rng: random.Random, fixed: bool = True) -> str:
    out = []
    for name in rng.sample(FUNCS, rng.randint(1, 2)):
        f = _CODE.get(name, rng, fixed)
        arg, var = rng.choice(VARS[:4]), f["var"]
        out += [f"def {name}({arg}, k):", f"    {var} = {arg} {f['op']} {f['const']}"]
        if rng.random() < 0.6:
            out += [f"    for i in range({f['loop']}):", f"        {var} = {var} + i * k"]
        else:
            out += [f"    if {var} > {f['loop']}:", f"        {var} = {var} - {f['const']}"]
        out.append(f"    return {var}")
        out.append(f"{rng.choice(VARS)} = {name}({rng.randint(0, 99)}, {rng.randint(1, 5)})")
    return "\n".join(out)


def _dialogue(rng: random.Random, fixed: bool = True) -> str:
    name = rng.choice(NAMES)
    f = _DIALOGUE.get(name, rng, fixed)
    pairs = [
        ("where do you live?", f"i live near the {f['place']}."),
        ("what is your favourite colour?", f"my favourite colour is {f['colour']}."),
        ("what do you like to eat?", f"i like to eat {f['food']}."),
        ("how old are you?", f"i am {f['age']} years old."),
        ("do you have a pet?", f"yes, i have a {f['pet']}."),
        ("who is your best friend?", f"my best friend is {f['friend']}."),
    ]
    rng.shuffle(pairs)
    lines = ["A: hello! what is your name?", f"B: my name is {name}."]
    for q, a in pairs[: rng.randint(3, 6)]:
        lines += [f"A: {q}", f"B: {a}"]
    lines += [f"A: nice to meet you, {name}. bye!"]
    return "\n".join(lines)


def _stories(rng: random.Random, fixed: bool = True) -> str:
    name = rng.choice(NAMES)
    f = _STORY.get(name, rng, fixed)
    n = rng.randint(2, 9)
    he = rng.choice(["he", "she"])
    sents = [f"once upon a time there was a {f['adj']} {f['animal']} named {name}.",
             f"{name} lived in the {f['place']}.", f"one day {name} found {n} {f['thing']} near the "
             f"{rng.choice(PLACES)}.", f"{he} was very {rng.choice(FEEL)}."]
    friend = rng.choice([m for m in NAMES if m != name])
    g = _STORY.get(friend, rng, fixed)
    extra = [f"then {name} met a {g['adj']} {g['animal']} named {friend}, who lived in the {g['place']}.",
             f"they shared the {f['thing']} and played until the sun went down.",
             f"{name} gave {rng.randint(1, n)} {f['thing']} to {friend}.",
             f"the {f['animal']} went back to the {f['place']} and fell asleep.",
             f"{he} felt {rng.choice(FEEL)} and sang a song."]
    rng.shuffle(extra)
    return " ".join(sents + extra[: rng.randint(2, 4)] + ["the end."])


def _recipes(rng: random.Random, fixed: bool = True) -> str:
    dish = rng.choice(DISHES)
    f = _RECIPE.get(dish, rng, fixed)
    steps = [f"mix the {f['a']} and the {f['b']} in a bowl.", f"add a little {rng.choice(INGREDIENTS)}.",
             f"bake at {f['heat']} degrees for {f['minutes']} minutes.", "stir well and let it rest.",
             f"serve the {dish} warm with {rng.choice(INGREDIENTS)}."]
    rng.shuffle(steps[1:4])
    return (f"recipe for {dish}. serves {f['serves']}.\ningredients: {f['a']}, {f['b']}, "
            f"{rng.choice(INGREDIENTS)}.\n" + "\n".join(f"step {i + 1}: {s}" for i, s in enumerate(steps)))


def _weather(rng: random.Random, fixed: bool = True) -> str:
    out = []
    for where in rng.sample(PLACES + NAMES[:8], rng.randint(2, 4)):
        f = _WEATHER.get(where, rng, fixed)
        day = rng.choice(DAYS)
        out.append(f"on {day} the {where} will be {f['sky']} with a high of {f['temp']} degrees. "
                   f"winds of {f['wind']} km per hour are expected.")
    out.append(rng.choice(["take an umbrella.", "enjoy the weekend.", "stay warm.", "more news at noon."]))
    return "weather report. " + " ".join(out)


def _sports(rng: random.Random, fixed: bool = True) -> str:
    home, away = rng.sample(TEAMS, 2)
    f, g = _SPORTS.get(home, rng, fixed), _SPORTS.get(away, rng, fixed)
    a, b = rng.randint(0, 5), rng.randint(0, 5)
    out = [f"the {home} from the {f['city']} played the {away} on {rng.choice(DAYS)}.",
           f"{f['star']} scored for the {home} in the first half.",
           f"the final score was {a} to {b}.", f"coach {f['coach']} said the team in {f['colour']} played well.",
           f"{g['star']} of the {away} was hurt.", f"fans of the {away} came from the {g['city']}."]
    rng.shuffle(out[1:])
    return "match report. " + " ".join(out[: rng.randint(4, 6)])


def _letters(rng: random.Random, fixed: bool = True) -> str:
    name = rng.choice(NAMES)
    f = _LETTERS.get(name, rng, fixed)
    to = rng.choice([n for n in NAMES if n != name])
    lines = [f"dear {to},", f"i hope you are well. i still live in the {f['place']} and work as a {f['job']}.",
             f"my sister {f['sibling']} sends her love.", f"thank you for the {f['thing']} you sent me.",
             f"i will visit you on {rng.choice(DAYS)}."]
    rng.shuffle(lines[1:])
    return "\n".join(lines[: rng.randint(3, 5)] + [f"yours, {name}"])


def _science(rng: random.Random, fixed: bool = True) -> str:
    out = []
    for body in rng.sample(PLANETS, rng.randint(2, 4)):
        f = _SCIENCE.get(body, rng, fixed)
        out += [f"the {body} is mostly made of {f['made']}.", f"its surface looks {f['colour']} and it is "
                f"{f['size']}.", f"the {body} reaches {f['hot']} degrees."][: rng.randint(2, 3)]
    return "science notes. " + " ".join(out)


def _poems(rng: random.Random, fixed: bool = True) -> str:
    lines = []
    for subject in rng.sample(ANIMALS + PLACES, rng.randint(2, 4)):
        f = _POEMS.get(subject, rng, fixed)
        lines += [f"oh {f['adj']} {subject}, you {f['verb']} at {f['time']},",
                  f"the {subject} {f['verb']} and all is {rng.choice(['bright', 'right', 'light', 'white'])}."]
    return "a poem.\n" + "\n".join(lines)


def _records(rng: random.Random, fixed: bool = True) -> str:
    rows = []
    for name in rng.sample(NAMES, rng.randint(2, 4)):
        f = _RECORDS.get(name, rng, fixed)
        rows.append(f'{{"id": {f["id"]}, "name": "{name}", "city": "{f["city"]}", "item": "{f["item"]}", '
                    f'"price": {f["price"]}, "qty": {rng.randint(1, 9)}}}')
    return "[\n" + ",\n".join(rows) + "\n]"


def _quiz(rng: random.Random, fixed: bool = True) -> str:
    out = []
    for i, what in enumerate(rng.sample(ANIMALS + PLANETS, rng.randint(2, 4))):
        f = _QUIZ.get(what, rng, fixed)
        q, a = rng.choice([(f"how many legs does a {what} have?", f"{f['legs']} legs."),
                           (f"where does a {what} live?", f"in the {f['home']}."),
                           (f"what colour is a {what}?", f"{f['colour']}."),
                           (f"what does a {what} eat?", f"{f['eats']}.")])
        out += [f"question {i + 1}: {q}", f"answer: {a}"]
    return "\n".join(out)


@dataclass(frozen=True)
class Domain:
    generate: Callable[[random.Random, bool], str]
    #: descriptive words a user would write for this domain (and topic lines that use them)
    words: tuple[str, ...]
    #: short typical snippets a user would paste; never copied from training or held-out documents
    examples: tuple[str, ...]


DOMAINS: dict[str, Domain] = {
    "arithmetic": Domain(_arithmetic, ("math", "arithmetic", "numbers", "calculation", "sums"),
                         ("12 + 30 = 42", "7 * 8 = 56", "91 - 15 = 76", "4 + 4 = 8\n6 * 2 = 12",
                          "sam has 3 keys and gets 2 more")),
    "code": Domain(_code, ("code", "python", "programming", "functions", "coding"),
                   ("def add(x, k):", "    for i in range(10):", "        total = total + i * k", "    return result",
                    "count = find(7, 2)")),
    "dialogue": Domain(_dialogue, ("chat", "conversation", "dialogue", "talk", "questions and answers"),
                       ("A: hello! what is your name?", "B: my name is sam.", "A: where do you live?",
                        "B: my favourite colour is red.", "A: do you have a pet?")),
    "stories": Domain(_stories, ("story", "storywriting", "fairy tale", "fiction", "children's story"),
                      ("once upon a time there was a brave fox", "the little owl lived in the castle.",
                       "one day ben found 3 shells.", "she was very happy and sang a song.", "the end.")),
    "recipes": Domain(_recipes, ("recipe", "cooking", "baking", "food", "kitchen"),
                      ("recipe for soup. serves 4.", "ingredients: flour, eggs, milk.",
                       "step 2: mix the sugar and the butter in a bowl.", "bake at 180 degrees for 30 minutes.",
                       "serve the pie warm with cheese.")),
    "weather": Domain(_weather, ("weather", "forecast", "weather report", "climate", "temperature"),
                      ("weather report. on monday the city will be sunny", "with a high of 21 degrees.",
                       "winds of 20 km per hour are expected.", "take an umbrella.",
                       "the park will be rainy")),
    "sports": Domain(_sports, ("sports", "football", "match report", "sport news", "game"),
                     ("match report. the lions played the hawks", "the final score was 2 to 1.",
                      "jack scored for the wolves in the first half.", "coach anna said the team played well.",
                      "fans of the bears came from the city.")),
    "letters": Domain(_letters, ("letter", "letters", "correspondence", "mail", "personal letter"),
                      ("dear anna,", "i hope you are well.", "my sister mia sends her love.",
                       "thank you for the books you sent me.", "yours, tom")),
    "science": Domain(_science, ("science", "astronomy", "physics", "facts", "planets"),
                      ("science notes. the moon is mostly made of rock.", "its surface looks white",
                       "the sun reaches 475 degrees.", "mars is small.", "the ocean is mostly made of water.")),
    "poems": Domain(_poems, ("poem", "poetry", "verse", "rhymes", "song lyrics"),
                    ("a poem.", "oh little fox, you sing at night,", "the river waits and all is bright.",
                     "oh green garden, you dream at dawn,", "the owl sleeps and all is light.")),
    "records": Domain(_records, ("json", "data", "records", "database", "table"),
                      ('{"id": 120, "name": "tom", "city": "park"', '"item": "keys", "price": 12, "qty": 3}',
                       "[", '"name": "anna", "city": "river"', '{"id": 311,')),
    "quiz": Domain(_quiz, ("quiz", "trivia", "questions", "test", "exam"),
                   ("question 1: how many legs does a cat have?", "answer: 4 legs.",
                    "question 2: where does a bird live?", "answer: in the forest.", "what colour is a frog?")),
}

DOMAIN_SETS = {
    "formats": ("arithmetic", "code", "dialogue", "stories"),
    "prose": ("recipes", "weather", "sports", "letters"),
    "mixed": ("science", "poems", "records", "quiz"),
}
TOPIC_SHARE = 0.3  # share of documents that open with a topic line naming their domain


def document(domain: str, rng: random.Random, fixed: bool = True) -> str:
    spec = DOMAINS[domain]
    text = spec.generate(rng, fixed)
    if rng.random() < TOPIC_SHARE:
        text = f"{rng.choice(['', 'some ', 'a page of ', 'more '])}{rng.choice(spec.words)}:\n" + text
    return text


def documents(domain: str, n: int, seed: int, *, fixed: bool = True) -> list[str]:
    """``n`` documents of one domain, reproducible from ``seed`` (different seeds give disjoint streams);
    ``fixed=False``: facts drawn afresh per document (the base's pretraining text)."""
    rng = random.Random(f"{domain}:{seed}:{fixed}")
    return [document(domain, rng, fixed) for _ in range(n)]


def prompts(domain: str, style: str) -> list[str]:
    """Five positive prompts in one of the ``PROMPT_STYLES``: what users write in a recipe today."""
    spec = DOMAINS[domain]
    if style == "words":
        return list(spec.words)
    if style == "words+example":
        return list(spec.words[:4]) + [spec.examples[0]]
    if style == "examples":
        return list(spec.examples)
    raise ValueError(f"unknown prompt style {style!r}; use one of {PROMPT_STYLES}")


# ----------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class WorldSpec:
    domains: tuple[str, ...] = DOMAIN_SETS["formats"]
    hidden_size: int = 48
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 400
    seq_len: int = 64
    batch_size: int = 16
    base_steps: int = 300
    expert_steps: int = 150
    base_lr: float = 5e-3
    expert_lr: float = 4e-3
    full_expert_lr: float = 1.5e-3  # full fine-tunes move attention too: gentler, as real ones are
    replay: float = 0.2  # share of an expert's fine-tuning windows drawn from the other domains
    variants: tuple[str, ...] = VARIANTS
    heldout_docs: int = 12
    seed: int = 0

    def key(self) -> str:
        """Names the cache folder; ``variants`` is left out: each variant is trained into it when first asked."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "variants"}
        data = json.dumps({**data, "version": WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SuiteWorld:
    """One entry of the suite: a built world, which of its expert variants is merged, and the prompt style."""

    name: str
    spec: WorldSpec
    variant: str
    style: str
    held_out: bool  # True: never tuned against, only measured


#: The suite. Tuning happens on the two ``held_out=False`` worlds only; the others are measured, never tuned.
_FORMATS = WorldSpec(domains=DOMAIN_SETS["formats"], hidden_size=48, num_hidden_layers=2, base_steps=300)
_PROSE = WorldSpec(domains=DOMAIN_SETS["prose"], hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                   base_steps=500, seed=1)
_MIXED = WorldSpec(domains=DOMAIN_SETS["mixed"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   base_steps=250, expert_steps=100, seed=2)
_EIGHT = WorldSpec(domains=DOMAIN_SETS["formats"] + DOMAIN_SETS["mixed"], hidden_size=48, intermediate_size=128,
                   num_hidden_layers=3, base_steps=600, expert_steps=120, variants=("mlp",), seed=3)
SUITE = (
    SuiteWorld("formats-mlp-words+ex", _FORMATS, "mlp", "words+example", held_out=False),
    SuiteWorld("prose-mlp-words", _PROSE, "mlp", "words", held_out=False),
    SuiteWorld("formats-full-words", _FORMATS, "full", "words", held_out=True),
    SuiteWorld("prose-full-examples", _PROSE, "full", "examples", held_out=True),
    SuiteWorld("mixed-full-words", _MIXED, "full", "words", held_out=True),
    SuiteWorld("mixed-mlp-examples", _MIXED, "mlp", "examples", held_out=True),
    SuiteWorld("eight-mlp-words+ex", _EIGHT, "mlp", "words+example", held_out=True),
)

#: a world small enough for a unit test: seconds to train, still clearly specialised experts
TINY_SPEC = WorldSpec(domains=DOMAIN_SETS["formats"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=320, batch_size=8, base_steps=150,
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
    losses: dict[str, dict[str, float]] = field(default_factory=dict)

    def recipe(self, variant: str, style: str, *, gate_mode: str, experts_per_token: int = 2, **extra) -> dict:
        """A mergekit-moe config over this world's experts (YAML-ready), with ``style`` prompts."""
        experts = [{"source_model": str(self.experts[variant][d]), "positive_prompts": prompts(d, style)}
                   for d in self.spec.domains]
        return {"base_model": str(self.base), "gate_mode": gate_mode, "dtype": "float32",
                "experts_per_token": experts_per_token, "experts": experts, **extra}


# ----------------------------------------------------------------------------------------- training


def _encode_docs(tokenizer, docs: list[str]) -> list[list[int]]:
    bos = tokenizer.bos_token_id
    return [[bos] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]


def _windows(token_docs: list[list[int]], seq_len: int) -> torch.Tensor:
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


def token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy from the logits, (B, T-1), and which count: real tokens after BOS.

    Computed from the logits, never ``out.loss``: a Mixtral run with router logits adds the router's
    auxiliary loss to that. The prediction made at BOS is left out: there nothing tells the domain yet.
    """
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    keep = mask[:, 1:].bool().clone()
    keep[:, 0] = False
    return ce, keep


@torch.no_grad()
def lm_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    ce, keep = token_losses(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    return float(ce[keep].mean())


def _train(model, data: torch.Tensor, *, steps: int, lr: float, batch_size: int, seed: int, desc: str = "",
           progress: bool = True) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=gen)]
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _with_replay(own: torch.Tensor, pretrain: dict[str, torch.Tensor], domain: str, replay: float,
                 seed: int) -> torch.Tensor:
    """Own-domain windows plus a ``replay`` share of the other domains' pretraining text: real fine-tunes
    stay usable language models off their domain, so a wrong expert costs but is not fatal."""
    others = torch.cat([w for d, w in pretrain.items() if d != domain])
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


def build_world(root: str | Path, spec: WorldSpec, *, progress: bool = True, threads: int | None = 1) -> World:
    """Train (or load from ``root/world-<key>``) the base and every expert variant of ``spec``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lazymoe.demo import build_tokenizer

    folder = Path(root) / f"world-{spec.key()}"
    manifest = folder / "world.json"
    heldout = {d: documents(d, spec.heldout_docs, spec.seed + 1_000_003) for d in spec.domains}
    experts = {v: {d: folder / v / d for d in spec.domains} for v in spec.variants}
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
        tok_dir = folder / "tokenizer"
        if "base" not in meta["seconds"]:
            shutil.rmtree(tok_dir, ignore_errors=True)
            corpus = "\n".join(doc for d in spec.domains for doc in documents(d, 150, spec.seed + 7))
            build_tokenizer(tok_dir, vocab_size=spec.vocab_size, corpus=corpus)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        n_docs = max(200, spec.batch_size * max(spec.base_steps, spec.expert_steps) // 4)
        train = {d: _windows(_encode_docs(tokenizer, documents(d, n_docs, spec.seed)), spec.seq_len)
                 for d in spec.domains}
        pretrain = {d: _windows(_encode_docs(tokenizer, documents(d, n_docs, spec.seed, fixed=False)), spec.seq_len)
                    for d in spec.domains}
        evals = {d: heldout_batch(tokenizer, heldout[d], spec.seq_len) for d in spec.domains}

        def save_meta():
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"spec": dataclasses.asdict(spec), **meta}, indent=2) + "\n")
            tmp.replace(manifest)

        if "base" not in meta["seconds"]:
            start = time.perf_counter()
            config = LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config)
            _train(model, torch.cat(list(pretrain.values())), steps=spec.base_steps, lr=spec.base_lr,
                   batch_size=spec.batch_size, seed=spec.seed, desc="world: base", progress=progress)
            meta["losses"]["base"] = {d: lm_loss(model, *evals[d]) for d in spec.domains}
            _save(model, tok_dir, folder / "base")
            meta["seconds"] = {"base": time.perf_counter() - start}  # experts of an older base are stale
            save_meta()
        model = LlamaForCausalLM.from_pretrained(str(folder / "base"), dtype=torch.float32)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for variant in todo:
            start = time.perf_counter()
            for i, d in enumerate(spec.domains):
                model.load_state_dict(base_state)
                for name, p in model.named_parameters():
                    p.requires_grad_(variant == "full" or ".mlp." in name)
                _train(model, _with_replay(train[d], pretrain, d, spec.replay, spec.seed + i), steps=spec.expert_steps,
                       lr=spec.full_expert_lr if variant == "full" else spec.expert_lr, batch_size=spec.batch_size,
                       seed=spec.seed + 17 * (i + 1), desc=f"world: {variant} {d}", progress=progress)
                meta["losses"][f"{variant}:{d}"] = {dd: lm_loss(model, *evals[dd]) for dd in spec.domains}
                _save(model, tok_dir, experts[variant][d])
            meta["seconds"][variant] = time.perf_counter() - start
            save_meta()
    finally:
        torch.set_num_threads(old_threads)
    seconds = sum(meta["seconds"][k] for k in ("base", *spec.variants))
    return World(folder, spec, tok_dir, folder / "base", experts, heldout, seconds, meta["losses"])
