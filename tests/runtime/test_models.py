"""Our compact models against transformers: logits of a flat batch of mixed-length prompts."""

import pytest
import torch

from fusecc.runtime import loader
from fusecc.runtime.models.attention import AttentionMetadata
from fusecc.runtime.models.llama import rope_inv_freq
from fusecc.runtime.models.registry import MODELS, model_class
from tests.runtime.hf_checkpoints import save_tiny_checkpoint, single_thread, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def prefill_metadata(lengths, block_size, num_blocks):
    """Each sequence's prompt in fresh consecutive blocks."""
    tables, slots, first = [], [], 0
    width = max(-(-n // block_size) for n in lengths)
    for n in lengths:
        nb = -(-n // block_size)
        tables.append(list(range(first, first + nb)) + [0] * (width - nb))
        slots += [first * block_size + i for i in range(n)]
        first += nb
    assert first <= num_blocks
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
                             context_lens=torch.tensor(lengths, dtype=torch.int32), cu_seqlens_q=cu,
                             max_seqlen_q=max(lengths), decode_only=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_transformers(arch, tmp_path):
    hf = save_tiny_checkpoint(arch, tmp_path)
    model = loader.load_model(tmp_path, torch.float32, "cpu")
    assert type(model) is MODELS[hf.config.architectures[0]]
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 1, 33]
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    kv_heads, head_dim = model.kv_shape
    caches = [(torch.zeros(16, 8, kv_heads, head_dim), torch.zeros(16, 8, kv_heads, head_dim)) for _ in range(2)]
    md = prefill_metadata(lengths, 8, 16)
    with torch.no_grad():
        hidden = model(torch.cat(prompts), torch.cat([torch.arange(n) for n in lengths]), caches, md)
        logits = model.compute_logits(hidden)
        for p, start in zip(prompts, md.cu_seqlens_q.tolist()):
            expected = hf(p[None]).logits[0]
            torch.testing.assert_close(logits[start:start + len(p)], expected, rtol=1e-4, atol=1e-4)
        # one decode step per sequence through the decode kernel path, against the full recompute
        nxt = torch.randint(3, 128, (len(lengths),), generator=g)
        slots, tables, ctx = [], [], []
        for i, n in enumerate(lengths):
            table = md.block_tables[i].tolist()
            slots.append(table[n // 8] * 8 + n % 8 if n % 8 else None)
            if slots[-1] is None:  # the next token opens a new block: give it an unused one
                table[n // 8] = 15 - i
                slots[-1] = table[n // 8] * 8
            tables.append(table)
            ctx.append(n + 1)
        dmd = AttentionMetadata(slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
                                context_lens=torch.tensor(ctx, dtype=torch.int32),
                                cu_seqlens_q=torch.arange(len(lengths) + 1, dtype=torch.int32), max_seqlen_q=1,
                                decode_only=True)
        out = model.compute_logits(model(nxt, torch.tensor(lengths), caches, dmd))
        for i, p in enumerate(prompts):
            expected = hf(torch.cat([p, nxt[i:i + 1]])[None]).logits[0, -1]
            torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_names_it_and_the_supported_list():
    config = tiny_config("llama")
    config.architectures = ["GPTNeoXForCausalLM"]
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        model_class(config)


def test_unsupported_rope_type_is_a_clear_error():
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        rope_inv_freq(config, 16)


def test_llama3_rope_scaling_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = tiny_config("llama")
    expected = LlamaRotaryEmbedding(config).inv_freq
    torch.testing.assert_close(rope_inv_freq(config, 16), expected.float())
    assert not torch.allclose(expected, 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16)))
