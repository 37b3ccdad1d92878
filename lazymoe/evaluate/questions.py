"""Your own questions, side by side: the MoE's answer to each (and optionally the base's and each expert's).

Every model answers with its own tokenizer's chat template (plain text where it has none), greedy decoding,
seeded; each MoE answer comes with the experts its tokens were routed to (share of top-k picks over the
answer's tokens and every layer). Models are loaded whole, one at a time, the way the notebook's "Try it"
step loads the MoE (in 4-bit where that is all the GPU allows); a model that fits nowhere, or whose files are
not here, is skipped with the reason. The result is saved as ``answers.md`` and ``answers.json`` beside the
model; the card includes the Markdown when the answers are marked for it.

Question lists: a YAML or JSON list (strings, or ``{question: ..., expert: index-or-label}``), or a text
file, one question a line, optionally tagged ``[expert] question``; in a recipe, ``eval_questions`` per
expert (tagged with it) and at the top level (untagged).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..publish.render import md_escape
from ..io.folder import CONFIG_FILENAME, read_user_text, require_lazymoe_output
from ..config import MoEConfig, load_config
from ..options import DEFAULT_ANSWER_TOKENS
from ..errors import ConfigError, LazyMoEError
from ..publish.eval_report import ANSWERS_JSON, ANSWERS_MD, ANSWERS_SCHEMA
from .skill import Sources
from ..router.routing import expert_labels
from ..runtime.machine import probe
from ..runtime.load import choose_loading, encode_chat, free_memory, load_merged, stored_dtype

COMPARE_CHOICES = ("moe", "base", "experts")
_TAG = re.compile(r"^\[(?P<tag>[^\]]+)\]\s*(?P<text>.+)$")


@dataclass(frozen=True)
class Question:
    text: str
    expert: int | str | None = None  # index or label; resolved against the model's experts when answering


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Questions from a file (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Question file {path} does not exist.")
    raw = read_user_text(path, "Question file")
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(raw)  # JSON is YAML
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML/JSON: {getattr(err, 'problem', err)}.") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path} must hold a list of questions (strings or {{question, expert}} mappings).")
        out = []
        for i, item in enumerate(data):
            if isinstance(item, str) and item.strip():
                out.append(Question(item.strip()))
            elif isinstance(item, dict) and isinstance(item.get("question"), str) and item["question"].strip():
                unknown = set(item) - {"question", "expert"}
                if unknown:
                    raise ConfigError(f"{path}, item {i}: unknown key {sorted(unknown)[0]!r}; use question and expert.")
                out.append(Question(item["question"].strip(), item.get("expert")))
            else:
                raise ConfigError(f"{path}, item {i}: write a question as text or as {{question: ..., expert: ...}}.")
    else:
        out = []
        for line in raw.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _TAG.match(line.strip())
            out.append(Question(match["text"].strip(), _tag(match["tag"])) if match else Question(line.strip()))
    if not out:
        raise ConfigError(f"Question file {path} holds no question.")
    return out


def _tag(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() else text


def questions_from_config(config: MoEConfig) -> list[Question]:
    """The recipe's ``eval_questions`` (per expert, then untagged); empty when it has none."""
    out = [Question(q, e) for e, spec in enumerate(config.experts) for q in (spec.eval_questions or [])]
    return out + [Question(q) for q in (config.eval_questions or [])]


def _resolve(question: Question, labels: list[str]) -> int | None:
    tag = question.expert
    if tag is None:
        return None
    if isinstance(tag, int) and 0 <= tag < len(labels):
        return tag
    if isinstance(tag, str):
        matches = [i for i, label in enumerate(labels) if label == tag or label.lower().startswith(tag.lower())]
        if len(matches) == 1:
            return matches[0]
    raise ConfigError(f"Question {question.text[:40]!r} is tagged {tag!r}, which names no single expert; use an "
                      f"index 0-{len(labels) - 1} or one of {', '.join(labels)}.")


def _compare(compare: str | tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(c.strip().lower() for c in (compare.split(",") if isinstance(compare, str) else compare) if c.strip())
    bad = [c for c in items if c not in COMPARE_CHOICES]
    if bad:
        raise ConfigError(f"compare {bad[0]!r}: choose from {', '.join(COMPARE_CHOICES)} (e.g. moe,base,experts).")
    return ("moe", *[c for c in items if c != "moe"])


def _answer_all(folder: Path, prompts: list[str], *, max_new_tokens: int, seed: int,
                experts_per_token: int | None) -> tuple[list[dict] | None, str | None]:
    """Load the model in ``folder`` as "Try it" would, answer every prompt; (answers, None) or (None, why not)."""
    import torch

    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    choice = choose_loading(size, probe(folder), dtype=stored_dtype(folder))
    if choice.device is None:
        return None, choice.reason
    model, tokenizer = load_merged(folder, choice)
    out = []
    try:
        chat = bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for prompt in prompts:
            inputs = {k: v.to(model.device) for k, v in encode_chat(tokenizer, prompt).items()}
            torch.manual_seed(seed)  # greedy needs no randomness; seeded all the same, so reruns agree
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            n = inputs["input_ids"].shape[1]
            answer = {"text": tokenizer.decode(ids[0, n:], skip_special_tokens=True).strip(), "chat_template": chat,
                      "new_tokens": int(ids.shape[1] - n)}
            if experts_per_token is not None:
                with torch.no_grad():
                    routed = model(input_ids=ids, output_router_logits=True).router_logits
                # the router's choices for the answer's own tokens (the question's when the answer is empty)
                first = n if ids.shape[1] > n else 0
                picks = torch.cat([r.reshape(ids.shape[1], -1)[first:].float().cpu() for r in routed])
                chosen = picks.topk(experts_per_token, dim=-1).indices.flatten()
                answer["routed"] = (torch.bincount(chosen, minlength=picks.shape[-1]).double() / chosen.numel()).tolist()
            out.append(answer)
    finally:
        del model
        free_memory()
    return out, None


def check_questions(model_dir: str | os.PathLike, questions: list[Question] | None = None, *,
                    compare: str | tuple[str, ...] = "moe", max_new_tokens: int = DEFAULT_ANSWER_TOKENS
                    ) -> tuple[MoEConfig, list[Question], tuple[str, ...], list[int | None]]:
    """What :func:`answer_questions` checks before any model loads (a front end calls it before other long
    steps): the recipe, the questions, the models to compare and each question's expert, or ConfigError."""
    folder = require_lazymoe_output(model_dir)
    recipe = load_config(folder / CONFIG_FILENAME)
    questions = list(questions) if questions is not None else questions_from_config(recipe)
    if not questions:
        raise ConfigError("No questions: add eval_questions to the config (per expert or at the top level) or give "
                          "a question file.")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens must be at least 1.")
    which = _compare(compare)
    labels = expert_labels([e.source_model for e in recipe.experts])
    return recipe, questions, which, [_resolve(q, labels) for q in questions]


def answer_questions(model_dir: str | os.PathLike, questions: list[Question] | None = None, *,
                     compare: str | tuple[str, ...] = "moe", max_new_tokens: int = DEFAULT_ANSWER_TOKENS, seed: int | None = None,
                     download: bool = False, release: bool = False) -> dict[str, Any]:
    """Answer ``questions`` (default: the recipe's ``eval_questions``) with the MoE and the models in ``compare``.

    Source models come from their folders or the local cache; ``download`` fetches missing ones and ``release``
    deletes what it fetched once that model has answered (see :class:`~lazymoe.evaluate.skill.Sources`)."""
    recipe, questions, which, tags = check_questions(model_dir, questions, compare=compare,
                                                     max_new_tokens=max_new_tokens)
    folder = Path(model_dir)
    labels = expert_labels([e.source_model for e in recipe.experts])
    seed = (recipe.seed or 0) if seed is None else seed
    prompts = [q.text for q in questions]
    models: list[tuple[str, str]] = [("MoE", "")]
    if "base" in which:
        models.append(("base", recipe.base_model))
    if "experts" in which:
        models += [(f"{i}: {label}", recipe.experts[i].source_model) for i, label in enumerate(labels)]
    answers: dict[str, list[dict]] = {}
    sources = Sources(download=download, release=release)
    skipped = []
    done: dict[str, list[dict]] = {}
    for name, ref in models:
        if name == "MoE":
            got, why = _answer_all(folder, prompts, max_new_tokens=max_new_tokens, seed=seed,
                                   experts_per_token=recipe.experts_per_token)
        elif ref in done:  # e.g. an expert that is the base model: same weights, same greedy answers
            got, why = done[ref], None
        else:
            try:
                got, why = _answer_all(sources.folder(ref), prompts, max_new_tokens=max_new_tokens, seed=seed,
                                       experts_per_token=None)
            except LazyMoEError as err:
                got, why = None, str(err)
            finally:
                sources.release(ref)
        if got is None:
            skipped.append(f"{name}: {why}")
            continue
        if ref:
            done[ref] = got
        answers[name] = got
    if "MoE" not in answers:
        raise LazyMoEError(f"The MoE cannot answer here: {skipped[0].split(': ', 1)[1]}")
    return {
        "schema": ANSWERS_SCHEMA,
        "model_name": folder.resolve().name,
        "decoding": {"greedy": True, "seed": seed, "max_new_tokens": max_new_tokens},
        "experts": labels,
        "experts_per_token": recipe.experts_per_token,
        "models": list(answers),
        "questions": [
            {"question": q.text, "expert": tag, "expert_label": labels[tag] if tag is not None else None,
             "answers": {name: got[i] for name, got in answers.items()}}
            for i, (q, tag) in enumerate(zip(questions, tags))
        ],
        "skipped": skipped,
        "in_card": False,
    }


def routed_text(shares: list[float], labels: list[str], *, top: int = 3) -> str:
    """``code 48%, math 31%``: the experts that served an answer, most used first."""
    ranked = sorted(range(len(shares)), key=lambda e: -shares[e])[:top]
    return ", ".join(f"{labels[e]} {100 * shares[e]:.0f}%" for e in ranked if shares[e] > 0)


def answers_markdown(result: dict[str, Any], *, heading: str = "###") -> str:
    """The answers as Markdown: one small table per question, the MoE's row with the experts it used."""
    d = result["decoding"]
    lines = [f"Greedy decoding (seed {d['seed']}, at most {d['max_new_tokens']} new tokens), each model with its "
             "own chat template. *Routed*: share of the MoE's top-"
             f"{result['experts_per_token']} expert choices over the answer's tokens and every layer.", ""]
    for n, q in enumerate(result["questions"], 1):
        tag = f" (for {q['expert_label']})" if q["expert_label"] else ""
        lines += [f"{heading} Q{n}{tag}: {md_escape(q['question'])}", "", "| Model | Answer |", "|---|---|"]
        for name, answer in q["answers"].items():
            text = md_escape(answer["text"]) if answer["text"] else "*(empty answer)*"
            if "routed" in answer:
                text += f"<br>*Routed: {md_escape(routed_text(answer['routed'], result['experts']))}*"
            lines.append(f"| {md_escape(name)} | {text} |")
        lines.append("")
    for item in result["skipped"]:
        lines.append(f"- Not answered by {md_escape(item)}")
    return "\n".join(lines).rstrip() + "\n"


def write_answers(model_dir: str | os.PathLike, result: dict[str, Any], *, in_card: bool = False) -> tuple[Path, Path]:
    """Save ``answers.md`` and ``answers.json`` in the model folder (the card shows them with ``in_card``)."""
    folder = Path(model_dir)
    result = {**result, "in_card": bool(in_card)}
    paths = []
    for name, text in ((ANSWERS_MD, answers_markdown(result)),
                       (ANSWERS_JSON, json.dumps(result, indent=2, ensure_ascii=False) + "\n")):
        path = folder / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
