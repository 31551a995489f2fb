"""A request's prompt and sampling parameters checked against the model: the engine's checks.

    text, ids = prompt_token_ids(prompt, tokenizer, vocab_size, max_model_len, params.truncate_prompt_tokens)
    check_token_ids(params, vocab_size)
    words = bad_words_token_ids(tokenizer, params.bad_words)

The engine owns these checks: token ids in the vocabulary, a non-empty prompt that leaves room
for one generated token within max_model_len. Each message names the field. The server runs the
same function before it queues a request (it needs the prompt's length for the default
max_tokens) and maps its ValueError to a 400; PromptTooLong is the context-length one.
"""

from __future__ import annotations

import operator

from fusecc.runtime.sampling_params import SamplingParams

# vLLM's prompt dicts: TextPrompt {"prompt": str} and TokensPrompt {"prompt_token_ids": [...]}
# (a TokensPrompt may carry its "prompt" text too; the ids are what runs)
_PROMPT_KEYS = ("prompt", "prompt_token_ids")


class PromptTooLong(ValueError):
    """The prompt leaves no room for a generated token within max_model_len."""


def prompt_token_ids(prompt, tokenizer, vocab_size: int, max_model_len: int,
                     truncate_prompt_tokens: int | None = None) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt: a string, token ids, or a vLLM prompt dict; only
    its last `truncate_prompt_tokens` kept (-1: max_model_len - 1; SamplingParams checked the
    value). ValueError naming `prompt` when it cannot run."""
    text = None
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(_PROMPT_KEYS))
        if unknown or not any(k in prompt for k in _PROMPT_KEYS):
            raise ValueError(f"a prompt dict holds 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}")
        if "prompt_token_ids" in prompt:
            text, prompt = prompt.get("prompt"), prompt["prompt_token_ids"]
        else:
            prompt = prompt["prompt"]
            if not isinstance(prompt, str):
                raise ValueError(f"prompt dict: 'prompt' must be a string, got {type(prompt).__name__}")
    if isinstance(prompt, str):
        text, ids = prompt, list(tokenizer.encode(prompt))
    else:
        ids = _as_token_ids(prompt)
    if truncate_prompt_tokens is not None:
        keep = max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        ids = ids[-keep:]
    if not ids:
        raise ValueError("prompt must hold at least one token")
    # text too: a tokenizer's added tokens may lie past the model's embedding rows
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad}")
    if len(ids) + 1 > max_model_len:
        raise PromptTooLong(f"prompt of {len(ids)} tokens leaves no room to generate within "
                            f"max_model_len={max_model_len}")
    return text, ids


def _as_token_ids(prompt) -> list[int]:
    try:
        prompt = list(prompt)  # an iterator would be consumed by the checks below
    except TypeError:
        raise ValueError(f"prompt must be a string, token ids or a prompt dict, got {type(prompt).__name__}") from None
    if any(isinstance(t, bool) for t in prompt):
        raise ValueError("prompt token ids must be integers, got a bool")
    try:  # ints and integer scalars (numpy, 0-d tensors); int(1.7) would silently be 1
        return [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError(f"prompt token ids must be integers, got {prompt!r:.80}") from None


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """The sampling parameters' token ids against the model's vocabulary (SamplingParams checked
    they are non-negative integers; it does not know the vocabulary)."""
    # (stop_token_ids past the vocabulary are harmless: never sampled, so never a stop)
    for name, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or ())):
        outside = [t for t in ids if t >= vocab_size]
        if outside:
            raise ValueError(f"SamplingParams.{name} token id {outside[0]} is outside the vocabulary [0, {vocab_size})")


def bad_words_token_ids(tokenizer, words: list[str] | None) -> list[list[int]]:
    """Each bad word tokenized as vLLM does: as given (leading spaces stripped) and with one
    leading space, the second kept only when it is a different tokenization of the same length
    (a word-initial token of BPE vocabularies)."""
    out: list[list[int]] = []
    for word in words or ():
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                continue
            if not prefix or (out and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out
