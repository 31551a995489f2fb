"""Incremental detokenization and stop strings for one sequence.

Decoding the whole output every step costs O(n) per token. Like vLLM, decode only a short window:
the text of tokens[prefix:read] is already emitted; decoding tokens[prefix:] and taking what
extends it gives the new text. A window ending in U+FFFD (half a UTF-8 character, or a byte
token) is held back until the next token completes it.

Stop strings: the emitted text is cut before the first occurrence (the stop string itself is
not part of the output, as in vLLM and OpenAI), or after it with include_stop_str_in_output,
and `check_stop` reports which one matched.
"""

from __future__ import annotations

# tokens decoded before the read offset, so that tokenizers that strip leading spaces of a
# first token (SentencePiece) still see the context they need
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool,
                 include_stop_str: bool = False) -> None:
        self.tokenizer, self.stop, self.skip = tokenizer, stop, skip_special_tokens
        self.include_stop_str = include_stop_str
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.max_stop_len = max((len(s) for s in stop), default=0)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Append new tokens; returns the newly emitted text."""
        self.tokens += token_ids
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset],
                                            skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full) <= len(prefix_text) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.tokens)
        self.text += new
        return new

    def flush(self) -> str:
        """At the end of a sequence: emit what was held back (an incomplete character decodes to U+FFFD)."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset],
                                            skip_special_tokens=self.skip)
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:], skip_special_tokens=self.skip)
        self.read_offset = len(self.tokens)
        new = full[len(prefix_text):] if full.startswith(prefix_text) else ""
        self.text += new
        return new

    def stable_text(self) -> str:
        """The text an unfinished request may show: without its longest suffix that begins a stop
        string (the next tokens could complete it, and the stop string is cut from the output), so
        every text shown is a prefix of the final one. vLLM holds such a tail back too. With
        include_stop_str the stop string stays in the output: nothing needs holding back."""
        hold = 0 if self.include_stop_str or not self.stop else min(len(self.text), self.max_stop_len - 1)
        for n in range(hold, 0, -1):
            tail = self.text[-n:]
            if any(stop.startswith(tail) for stop in self.stop):
                return self.text[:-n]
        return self.text

    def check_stop(self, new_text_len: int) -> str | None:
        """The stop string ending in the last `new_text_len` characters, if any; truncates the text
        before it (after it with include_stop_str)."""
        if not self.stop or not new_text_len:
            return None
        start = max(0, len(self.text) - new_text_len - self.max_stop_len + 1)
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[:best[0] + (len(best[1]) if self.include_stop_str else 0)]
        return best[1]
