"""Plain helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


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
