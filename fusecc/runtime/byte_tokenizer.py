"""A byte-level tokenizer for the embedded default model: no files, no downloads.

    ids 0..255   the UTF-8 bytes
    256          BOS "<s>"   (prepended by encode(add_special_tokens=True))
    257          EOS "</s>"

Chat template (apply_chat_template), one block per message, then the assistant header:

    <|system|>\\nYou are terse.\\n<|user|>\\nHi\\n<|assistant|>\\n
"""

from __future__ import annotations

BOS_ID, EOS_ID = 256, 257
VOCAB_SIZE = 258


class ByteTokenizer:
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    pad_token_id = EOS_ID
    bos_token, eos_token = "<s>", "</s>"
    vocab_size = VOCAB_SIZE
    all_special_ids = [BOS_ID, EOS_ID]
    name_or_path = "fusecc-byte-tokenizer"

    def __len__(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS_ID] + ids if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for t in token_ids:
            t = int(t)
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                out += (self.bos_token if t == BOS_ID else self.eos_token).encode()
        # incomplete UTF-8 sequences decode to U+FFFD, as with BPE tokenizers mid-character
        return out.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_ids):
        return [self.decode([t], skip_special_tokens=False) for t in token_ids]

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True, add_generation_prompt: bool = True,
                            **_: object):
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text) if tokenize else text
