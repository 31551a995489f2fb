"""Chat messages -> prompt text, through the tokenizer's chat template or one the caller gives.

    text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    ids = chat_token_ids(tokenizer, text)

A tokenizer without a chat template gets none silently: a made-up format would give a model
text it was never trained on, and the outputs would look plausible but be worse. The caller
passes `chat_template=` (a Jinja string or a file holding one) instead. The embedded default
model's ByteTokenizer has its own template.
"""

from __future__ import annotations

import os


def render_chat(tokenizer, messages: list[dict], chat_template: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text of one conversation. ValueError naming `messages` or `chat_template`."""
    _check_messages(messages)
    template = load_chat_template(chat_template)
    if template is None:
        if not hasattr(tokenizer, "apply_chat_template") or getattr(tokenizer, "chat_template", "") is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template= (a Jinja template string "
                             "or the path of a file holding one)")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    if hasattr(tokenizer, "init_kwargs") and hasattr(tokenizer, "apply_chat_template"):
        # a transformers tokenizer (with or without its own template): its renderer knows the
        # template helpers (raise_exception, strftime_now) and the special tokens
        return tokenizer.apply_chat_template(messages, chat_template=template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False)
    return _render_jinja(template, messages, add_generation_prompt, tokenizer)


def chat_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat prompt: encoded as any prompt, without the second BOS that a
    template writing the BOS token itself plus an encode() adding one would give."""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' string and a 'content', got {m!r:.80}")


def load_chat_template(chat_template: str | None) -> str | None:
    if chat_template is None:
        return None
    if not isinstance(chat_template, str) or not chat_template:
        raise ValueError(f"chat_template must be a Jinja template string or a file path, got {chat_template!r:.80}")
    if "{" not in chat_template and os.path.isfile(chat_template):  # a template always holds {{ or {%
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if "{" not in chat_template:
        raise ValueError(f"chat_template {chat_template!r} is neither a file nor a Jinja template")
    return chat_template


def _render_jinja(template: str, messages: list[dict], add_generation_prompt: bool, tokenizer) -> str:
    """A template for a tokenizer that is not a transformers one, in a sandbox as transformers renders."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat_template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=getattr(tokenizer, "bos_token", ""),
                                            eos_token=getattr(tokenizer, "eos_token", ""))
