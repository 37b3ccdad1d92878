"""How a router prompt becomes token ids: one rule for the plan's checks, the fitted gate modes and the routing
picture (the tokenizer's own BOS handling, or the prompt as a user turn of the base's chat template)."""

from __future__ import annotations

from .errors import ConfigError


def router_token_ids(tokenizer, prompt: str, *, chat_template: bool = False) -> list[int]:
    """The ids the MoE sees for ``prompt``: with the tokenizer's own BOS handling, or as a chat user turn."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "router_chat_template is true but the base model's tokenizer has no chat template; "
                "set router_chat_template: false or use a base whose tokenizer_config.json defines one."
            )
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # jinja2's SecurityError/TemplateError, or transformers' ValueError
            raise ConfigError(
                f"router_chat_template is true but the base model's chat template fails "
                f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); set router_chat_template: false "
                "or use a base whose chat template renders."
            ) from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])
