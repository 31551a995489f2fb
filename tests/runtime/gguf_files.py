"""Tiny GGUF files written with the `gguf` package, as llama.cpp's convert_hf_to_gguf.py writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def tiny_hf_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per head (its rope pairs adjacent dims); transformers undoes this
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, architecture: str = "llama", quantize: dict | None = None) -> Path:
    """`model` (a transformers Llama) as a GGUF file (no tokenizer metadata: tests pass tokenizer=); quantize: {gguf tensor name: GGMLQuantizationType}."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(2)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            t = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            tensors[f"blk.{i}.{ours}.weight"] = t
    for name, t in tensors.items():
        kind = (quantize or {}).get(name)
        if kind is None:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)  # shape from the bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
