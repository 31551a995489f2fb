"""Tiny (CPU) and realistic (GPU) transformers decoder models built in code, random weights."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def build(family: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          vocab: int = 128, dtype=torch.float32, device="cpu", seed: int = 0):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=hidden * 2, max_position_embeddings=512)
    if family == "llama":
        config = tf.LlamaConfig(num_key_value_heads=kv_heads, **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(num_key_value_heads=kv_heads, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    return model
