"""OpenAI logprobs from the engine's vLLM-shaped ones, and how one token is shown in them.

    fmt = LogprobFormatter(tokenizer)
    fmt.completion(output, start, text_offset)   # CompletionLogprobs of output's tokens from `start` on
    fmt.chat(output, start, top_logprobs)        # ChatLogprobs
    fmt.prompt(request_output.prompt_logprobs)   # vLLM's prompt_logprobs field
    fmt.names.bytes(token_id)                    # the token's own bytes: [195] for half of "é", not
                                                 # U+FFFD's [239, 191, 189]

The engine gives, per generated token, {token id: Logprob(logprob, rank, decoded_token)} holding
the sampled token and the top ones. Completions list every entry (vLLM's); chat lists exactly the
`top_logprobs` most likely. JSON has no -inf: a token ruled out is reported at a floor of -9999.

OpenAI's `bytes` field exists so that a client can join the bytes of consecutive tokens into
characters that a single token splits; the UTF-8 of the decoded text cannot do that. The raw
bytes come from the token's vocabulary string: byte-level BPE (GPT-2, Llama-3, Qwen) spells each
byte as one printable character, SentencePiece byte fallback (Llama-2, Mistral) as `<0xNN>` and
spaces as `▁`; the embedded model's byte tokenizer has a byte per id below 256.
"""

from __future__ import annotations

import re
from functools import lru_cache

from fusecc.serve.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob

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


class LogprobFormatter:
    def __init__(self, tokenizer) -> None:
        self.names = TokenNames(tokenizer)

    @staticmethod
    def _positions(o, start: int):
        """(sampled token id, {token id: Logprob}) per generated token from `start` on (vLLM's shape:
        the dict holds the sampled token and the top ones)."""
        return zip(o.token_ids[start:], (o.logprobs or [])[start:len(o.token_ids)])

    def completion(self, o, start: int, offset: int) -> CompletionLogprobs:
        names = self.names
        lp = CompletionLogprobs()
        for token_id, entry in self._positions(o, start):
            tok = names.text(token_id)
            lp.tokens.append(tok)
            lp.token_logprobs.append(_json_logprob(entry[token_id].logprob))
            # vLLM's completions list every entry: the top ones and the sampled one
            lp.top_logprobs.append({names.text(t): _json_logprob(e.logprob) for t, e in _by_rank(entry)})
            lp.text_offset.append(offset)
            offset += len(tok)
        return lp

    def chat(self, o, start: int, top: int) -> ChatLogprobs:
        names = self.names
        content = []
        for token_id, entry in self._positions(o, start):
            # chat lists exactly the `top_logprobs` most likely, whether or not the sampled one is among them
            tops = [TopLogprob(token=names.text(t), logprob=_json_logprob(e.logprob), bytes=names.bytes(t))
                    for t, e in _by_rank(entry)[:top]]
            content.append(ChatTokenLogprob(token=names.text(token_id), logprob=_json_logprob(entry[token_id].logprob),
                                            bytes=names.bytes(token_id), top_logprobs=tops))
        return ChatLogprobs(content=content)


    @staticmethod
    def prompt(prompt_logprobs) -> list | None:
        """The engine's prompt logprobs as vLLM's server returns them: per prompt token None (the
        first) or {token id: {logprob, rank, decoded_token}}, -inf floored."""
        if prompt_logprobs is None:
            return None
        return [None if entry is None else
                {t: PromptLogprob(logprob=_json_logprob(e.logprob), rank=e.rank, decoded_token=e.decoded_token)
                 for t, e in entry.items()} for entry in prompt_logprobs]


def _by_rank(entry: dict) -> list:
    """(token id, Logprob) pairs, most likely first (a sampled token outside the top has the largest rank)."""
    return sorted(entry.items(), key=lambda item: (item[1].rank is None, item[1].rank or 0, -item[1].logprob))


# JSON has no -inf: a token the model (or a filter) rules out is reported with this floor, as vLLM does
_LOGPROB_FLOOR = -9999.0


def _json_logprob(value: float) -> float:
    return value if value >= _LOGPROB_FLOOR else _LOGPROB_FLOOR  # NaN compares False: floored too
