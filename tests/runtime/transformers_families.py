"""Tiny random configs of decoder families that have no native fusecc model (fp32, 2 layers, hidden 64),
for the transformers-backed model path (fusecc/runtime/models/transformers_backend.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.runtime.hf_checkpoints import VOCAB, tiny_tokenizer

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
              initializer_range=0.1)
# what each config exercises beyond Llama
SLIDING = dict(sliding_window=8)  # shorter than the test prompts, so windows matter


def family_config(name: str):
    import transformers as t

    if name == "gemma":  # embeddings scaled by sqrt(hidden), GeGLU, (1 + w) RMSNorm
        return t.GemmaConfig(**COMMON, head_dim=16)
    if name == "gemma2":  # sliding/full layers, attention and final logit soft-capping, query_pre_attn_scalar
        return t.Gemma2Config(**COMMON, **SLIDING, head_dim=16, query_pre_attn_scalar=24,
                              attn_logit_softcapping=0.5, final_logit_softcapping=3.0)
    if name == "gemma3":  # text: sliding/full layers, q/k norm, query_pre_attn_scalar
        return t.Gemma3TextConfig(**COMMON, **SLIDING, head_dim=16, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention"])
    if name == "phi3":  # fused qkv / gate_up in the checkpoint
        return t.Phi3Config(**COMMON)
    if name == "olmo2":  # post-norms, q/k norm over all heads
        return t.Olmo2Config(**COMMON)
    if name == "granite":  # attention/embedding/residual multipliers, logits divided by logits_scaling
        return t.GraniteConfig(**COMMON, attention_multiplier=0.2, embedding_multiplier=2.0,
                               residual_multiplier=0.5, logits_scaling=4.0)
    if name == "stablelm":  # LayerNorm, partial rotary (25% of head_dim)
        c = {k: v for k, v in COMMON.items()}
        return t.StableLmConfig(**c, partial_rotary_factor=0.25)
    if name == "gpt_neox":  # parallel residual, partial rotary, MHA
        return t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    if name == "cohere":  # LayerNorm, parallel block, logits multiplied by logit_scale
        return t.CohereConfig(**COMMON, logit_scale=0.5)
    if name == "mixtral":  # MoE, 4 experts top-2, sliding window
        return t.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    if name == "qwen3_moe":  # MoE, 4 experts top-2, q/k norm
        return t.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if name == "falcon":  # attention of its own (no AttentionInterface in transformers 5.17): refused
        return t.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              bos_token_id=1, eos_token_id=2)
    if name == "mamba":  # recurrent state: refused
        return t.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, bos_token_id=1, eos_token_id=2)
    if name == "t5":  # encoder-decoder: refused
        return t.T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
    raise KeyError(name)


FAMILIES = ("gemma", "gemma2", "gemma3", "phi3", "olmo2", "granite", "stablelm", "gpt_neox", "cohere")
# native fusecc models now (tests/runtime/test_moe_models.py): "auto" no longer picks the transformers path for
# them, model_impl="transformers" still runs them (with fusecc::fused_moe through the moe_matching pass)
NATIVE_FAMILIES = ("mixtral", "qwen3_moe")


def save_family_checkpoint(name: str, path: Path, seed: int = 0):
    """Write a tiny random checkpoint + tokenizer to `path`; returns the transformers model (the oracle)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    config = family_config(name)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    # eager: transformers' reference attention (sdpa ignores Gemma 2's attention soft-capping)
    model = auto.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():  # zero-initialised biases and norm weights would hide mistakes
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model
