"""Router prompts as token ids: the reference tokenisation, the fitted modes' prompt set, its continuations.

The reference modes tokenise like mergekit-moe (BOS as text, left padding with BOS); the fitted modes and the
routing picture use the tokenizer's own BOS handling (or the chat template) and right padding, so every real
token sits at the position the model gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MoEConfig
from ..lazy import no_grad, torch
from ..tokens import router_token_ids


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The reference tokenisation: BOS as text, no special tokens added, left-padded with BOS."""
    texts = [(tokenizer.bos_token or "") + p for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding keeps every real token at its true position, and causal attention never sees the pads."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class PromptSet:
    """Every prompt the fitted modes read, as token ids, and whose it is."""

    seqs: list[list[int]]
    expert: torch.Tensor  # (S,) expert the prompt belongs to (or argues against, for negatives)
    positive: torch.Tensor  # (S,) bool
    index: torch.Tensor  # (S,) index among that expert's positive prompts: the cross-validation fold


def prompt_set(tokenizer, config: MoEConfig) -> PromptSet:
    chat = bool(config.router_chat_template)
    seqs, expert, positive, index = [], [], [], []
    for e, spec in enumerate(config.experts):
        for kind, prompts in ((True, spec.positive_prompts), (False, spec.negative_prompts)):
            for j, prompt in enumerate(prompts):
                seqs.append(router_token_ids(tokenizer, prompt, chat_template=chat))
                expert.append(e)
                positive.append(kind)
                index.append(j if kind else 0)
    return PromptSet(seqs, torch.tensor(expert), torch.tensor(positive), torch.tensor(index))


DEFAULT_CONTINUATION_TOKENS = 48


@no_grad
def continue_prompts(model, tokenizer, prompts: PromptSet, *, new_tokens: int, seed: int,
                     batch_size: int = 16) -> PromptSet:
    """Extend every positive prompt with ``new_tokens`` tokens sampled from ``model`` (the base).

    A router meets tokens deep inside texts of its expert's kind, with long contexts; five short prompts
    only show it their first few tokens. The base's own continuation of a prompt is such a text (for a chat
    template, it is the answer), and it costs no extra input from the user.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    out = list(prompts.seqs)
    todo = [i for i, positive in enumerate(prompts.positive.tolist()) if positive]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded, without disturbing the caller's random state
        torch.manual_seed(seed)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start: start + batch_size]
            width = max(len(prompts.seqs[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(prompts.seqs[i])) + prompts.seqs[i] for i in chunk])
            mask = torch.tensor([[0] * (width - len(prompts.seqs[i])) + [1] * len(prompts.seqs[i]) for i in chunk])
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 do_sample=True, temperature=0.8, top_p=0.95, top_k=0, pad_token_id=pad)
            for row, i in zip(gen[:, width:].tolist(), chunk):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                out[i] = prompts.seqs[i] + row
    return PromptSet(out, prompts.expert, prompts.positive, prompts.index)


def real_tokens(mask: torch.Tensor, ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(B, T) bool: real tokens, minus a leading BOS (the same state whatever the prompt, so it says nothing)."""
    keep = mask.bool().clone()
    if bos_id is not None:
        keep[:, 0] &= ids[:, 0] != bos_id
    return keep
