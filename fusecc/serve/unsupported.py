"""Request fields this server does not implement: refused when they would change the output,
ignored (and logged once per field name) when they would not.

    check_fields(req, ignored_once)   # APIError(400, param=<field>) for the first refused field

A client asking for JSON, a tool call, beam search or a grammar must not silently get free text,
so those fields are a 400 naming the field unless absent, null or at their neutral value (the
names and neutral values are vLLM's OpenAI server's and the OpenAI API's). Any other field the
server does not know is accepted, as by vLLM and the OpenAI API, and logged as ignored the first
time its name is seen (per server, not per request: a client sending it on every request must not
flood the log).
"""

from __future__ import annotations

import logging

from fusecc.serve.errors import APIError

logger = logging.getLogger("fusecc.serve")


def _absent(value) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


# field -> "is this value neutral" (null is neutral for every field: it means the default)
_REFUSED = {
    # OpenAI fields
    "suffix": _absent,
    "best_of": lambda v: v in (None, 1),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": _absent,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": _absent,
    "function_call": lambda v: v in (None, "none"),
    "audio": _absent,
    "modalities": lambda v: v is None or v == ["text"],
    "web_search_options": _absent,
    # vLLM's extra sampling fields
    "use_beam_search": _absent,
    "length_penalty": lambda v: v in (None, 1, 1.0),
    "spaces_between_special_tokens": lambda v: v in (None, True),
    "logits_processors": _absent,
    # structured output (old and new names)
    "structured_outputs": _absent,
    "guided_json": _absent,
    "guided_regex": _absent,
    "guided_choice": _absent,
    "guided_grammar": _absent,
    "structural_tag": _absent,
    # prompt building and output shape
    "prompt_embeds": _absent,
    "continue_final_message": _absent,
    "documents": _absent,
    "chat_template": _absent,
    "chat_template_kwargs": _absent,
    "return_tokens_as_token_ids": _absent,
    "return_token_ids": _absent,
}
# Per endpoint: `echo` exists for completions (implemented) but is refused for chat, where vLLM
# echoes the last message; `add_special_tokens` defaults differ (completions True, chat False).
_REFUSED_CHAT = {"echo": _absent, "add_special_tokens": _absent}
_REFUSED_COMPLETIONS = {"add_special_tokens": lambda v: v in (None, True)}


def check_fields(req, ignored_once: set[str]) -> None:
    """req: a parsed CompletionRequest or ChatCompletionRequest (unknown fields in `model_extra`)."""
    refused = {**_REFUSED, **(_REFUSED_CHAT if hasattr(req, "messages") else _REFUSED_COMPLETIONS)}
    extra = dict(req.model_extra or {})
    for name, is_neutral in refused.items():
        value = extra.pop(name) if name in extra else getattr(req, name, None)
        if not is_neutral(value):
            raise APIError(400, f"{name}={_short(value)} is not supported by this server", param=name)
    options = getattr(req, "stream_options", None)
    if options is not None and (options.model_extra or {}).get("continuous_usage_stats"):
        raise APIError(400, "stream_options.continuous_usage_stats is not supported by this server",
                       param="stream_options")
    names = set(extra)
    for message in getattr(req, "messages", None) or []:
        names.update(f"messages[].{k}" for k in message.model_extra or {})
    new = sorted(names - ignored_once)
    if new:
        ignored_once.update(new)
        logger.warning("ignoring request fields this server does not use: %s (logged once per field)",
                       ", ".join(new))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
