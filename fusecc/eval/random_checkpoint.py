"""A random-weight Llama checkpoint folder of a given shape, with a byte-level tokenizer: a model
that both fusecc's engine and transformers load from the same files, where no real one is at hand
(the GPU machine has no registry; tests need seconds, not a 93 MB model).

    path = save_random_llama(folder, TINY_SHAPE, seed=0)    # config.json, model.safetensors, tokenizer
    LLM(str(path)); AutoModelForCausalLM.from_pretrained(path)

The tokenizer is byte-level BPE without merges: ids 0..255 are the UTF-8 bytes (as fusecc's
embedded byte tokenizer), 256 "<s>", 257 "</s>"; a model with a larger vocabulary (the Llama-3
shape's 128256) predicts over all of it, though text only ever uses the first 258 ids.
Random weights make perplexity meaningless as quality (near the vocabulary size) but not as a
check that two implementations compute the same distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch

# the embedded default model's shape (fusecc/runtime/default_model.py default_config)
TINY_SHAPE = dict(vocab_size=258, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
BYTE_VOCAB = 258


def byte_level_tokenizer():
    """A transformers fast tokenizer: one token per UTF-8 byte (ids 0..255), <s> 256, </s> 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def save_random_llama(folder: str | Path, shape: dict, seed: int = 0, initializer_range: float = 0.1,
                      max_position_embeddings: int = 4096, dtype: torch.dtype = torch.float32) -> Path:
    """Write a seeded random LlamaForCausalLM of `shape` (LlamaConfig fields) as `dtype` safetensors
    and the byte-level tokenizer to `folder`; returns the folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape.get("vocab_size", BYTE_VOCAB) < BYTE_VOCAB:
        raise ValueError(f"save_random_llama: vocab_size must be >= {BYTE_VOCAB} (the byte tokenizer's), "
                         f"got {shape['vocab_size']}")
    folder = Path(folder)
    config = LlamaConfig(**{"vocab_size": BYTE_VOCAB, **shape}, architectures=["LlamaForCausalLM"],
                         max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                         initializer_range=initializer_range, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    with torch.random.fork_rng(devices=[]):  # neither depends on nor disturbs the caller's random state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()  # created in dtype: 8B fits
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder
