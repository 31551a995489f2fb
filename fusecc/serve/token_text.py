"""How one token id is shown in logprobs: its text, and the raw bytes it stands for.

    names = TokenNames(tokenizer)
    names.text(token_id)    # decode([token_id]): "é" is "\\ufffd" when the token is half of it
    names.bytes(token_id)   # the token's own bytes: [195] for that half, not U+FFFD's [239, 191, 189]

OpenAI's `bytes` field exists so that a client can join the bytes of consecutive tokens into
characters that a single token splits; the UTF-8 of the decoded text cannot do that. The raw
bytes come from the token's vocabulary string: byte-level BPE (GPT-2, Llama-3, Qwen) spells each
byte as one printable character, SentencePiece byte fallback (Llama-2, Mistral) as `<0xNN>` and
spaces as `▁`; the embedded model's byte tokenizer has a byte per id below 256.
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    # GPT-2's byte -> printable character table, inverted (as in transformers' bytes_to_unicode)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenNames:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def bytes(self, token_id: int) -> list[int]:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._raw_bytes(token_id)
        return cached

    def _raw_bytes(self, token_id: int) -> list[int]:
        text = self.text(token_id)
        if "\ufffd" not in text:
            return list(text.encode())
        from fusecc.runtime.byte_tokenizer import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer) and token_id < 256:
            return [token_id]
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        piece = convert(token_id) if convert is not None else None
        if isinstance(piece, str) and piece:
            m = _BYTE_FALLBACK.match(piece)
            if m:
                return [int(m.group(1), 16)]
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(text.encode())  # a genuine U+FFFD, or a vocabulary this does not know
