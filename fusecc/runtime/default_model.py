"""The embedded default model: a small Llama built in code with seeded random weights and the
byte-level tokenizer, so `fusecc.LLM()` and the server run anywhere with no files. Its output is
noise, but every part of the engine (paged KV, batching, compilation, sampling) runs for real."""

from __future__ import annotations

import torch

from fusecc.runtime.byte_tokenizer import VOCAB_SIZE, ByteTokenizer

DEFAULT_MODEL_NAME = "fusecc-default-tiny-llama"
SEED = 0


def default_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )


def build_default_model(dtype: torch.dtype, device, max_positions: int | None = None):
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM

    config = default_config()
    # nn.Linear / nn.Embedding initialisers draw from torch's global generator: fork it so
    # building the default model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build_model(LlamaForCausalLM, config, dtype, "cpu", max_positions, weights=None)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(0.05)  # keep logits O(1): sampling looks like sampling
    return model.to(device), config
