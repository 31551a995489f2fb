"""Tiny fp32 Hugging Face checkpoints written in the test (save_pretrained), with a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 128
WORDS = [f"w{i}" for i in range(3, VOCAB)]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i for i, w in enumerate(WORDS, start=3)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_config(arch: str):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.1)
    if arch == "llama":  # llama3 rope scaling, untied head
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "qwen2":  # q/k/v bias, tied embeddings
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "qwen3":  # q/k RMSNorm, explicit head_dim
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=256, tie_word_embeddings=False)
    raise KeyError(arch)


def save_tiny_checkpoint(arch: str, path: Path, seed: int = 0, num_hidden_layers: int = 2, **save_kwargs):
    """Returns the transformers model (the oracle) after writing it and the tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config.num_hidden_layers = num_hidden_layers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if getattr(model.model.layers[0].self_attn.q_proj, "bias", None) is not None:
        with torch.no_grad():  # biases start at 0: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    tiny_tokenizer().save_pretrained(path)
    return model


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt (stops at EOS, which it includes)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def prompts(n: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (L,), generator=g).tolist()) for L in lengths]


@pytest.fixture(autouse=False)
def single_thread():
    """Tiny models on a busy 2-core machine: intra-op threads only add synchronisation (~1 ms per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_engine(engine, prompts_and_params, after_step=None) -> dict:
    """Add (request_id, prompt, params) triples, step to completion; returns the final output per id.
    after_step(engine), when given, runs after every step (invariant checks)."""
    for rid, prompt, params in prompts_and_params:
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        if after_step is not None:
            after_step(engine)
    return final
