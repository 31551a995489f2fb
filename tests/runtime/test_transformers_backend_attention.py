"""The "fusecc_paged" attention function's sliding-window / soft-capping paths (transformers_attention.py)
against a dense float64 reference computed per token from the un-paged K/V."""

import pytest
import torch

from fusecc.runtime.models.attention import AttentionMetadata
from fusecc.runtime.models.transformers_attention import windowed_softcap_attention, windowed_softcap_decode

BLOCK, HQ, HKV, D = 4, 4, 2, 8


def paged_step(new_tokens: list[int], contexts: list[int], seed: int = 0):
    """Random K/V of each sequence's whole context scattered over shuffled cache blocks, q for its
    last new_tokens[b] tokens -> (q [T, Hq, D], k_cache, v_cache, md, per-sequence dense k/v)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // BLOCK) for c in contexts) + 1  # one spare column: reads must stop at context_lens
    num_blocks = width * len(contexts) + 1
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.randn(num_blocks, BLOCK, HKV, D, generator=g)  # garbage outside the contexts
    v_cache = torch.randn(num_blocks, BLOCK, HKV, D, generator=g)
    tables, dense, slots = torch.zeros(len(contexts), width, dtype=torch.int32), [], []
    for b, ctx in enumerate(contexts):
        tables[b] = torch.tensor(order[b * width:(b + 1) * width], dtype=torch.int32)
        k, v = torch.randn(ctx, HKV, D, generator=g), torch.randn(ctx, HKV, D, generator=g)
        for j in range(ctx):
            k_cache[tables[b, j // BLOCK], j % BLOCK] = k[j]
            v_cache[tables[b, j // BLOCK], j % BLOCK] = v[j]
        dense.append((k, v))
    cu = [0]
    for n in new_tokens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], HQ, D, generator=g)
    md = AttentionMetadata(slot_mapping=torch.full((cu[-1],), -1), block_tables=tables,
                           context_lens=torch.tensor(contexts, dtype=torch.int32),
                           cu_seqlens_q=torch.tensor(cu, dtype=torch.int32), max_seqlen_q=max(new_tokens),
                           decode_only=all(n == 1 for n in new_tokens))
    return q, k_cache, v_cache, md, dense


def dense_reference(q, md, dense, scale, window, softcap) -> torch.Tensor:
    """float64, one query at a time: the keys it may see, scaled, capped, softmaxed."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu = md.cu_seqlens_q.tolist()
    for b, (k, v) in enumerate(dense):
        ctx, n = k.shape[0], cu[b + 1] - cu[b]
        for j in range(n):
            pos = ctx - n + j
            lo = max(0, pos - window + 1) if window else 0
            for h in range(HQ):
                kh, vh = k[lo:pos + 1, h // (HQ // HKV)].double(), v[lo:pos + 1, h // (HQ // HKV)].double()
                s = kh @ q[cu[b] + j, h].double() * scale
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                out[cu[b] + j, h] = torch.softmax(s, 0) @ vh
    return out


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 0.7), (3, 2.0), (None, None)])
def test_mixed_step_matches_float64_reference(window, softcap):
    # a decode, a first chunk, a later chunk, a prefill shorter than the window
    q, kc, vc, md, dense = paged_step([1, 6, 5, 2], [9, 6, 14, 2])
    out = windowed_softcap_attention(q, kc, vc, md, 0.3, window, softcap)
    torch.testing.assert_close(out.double(), dense_reference(q, md, dense, 0.3, window, softcap),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 0.7), (3, 2.0), (None, None)])
def test_decode_step_matches_float64_reference_and_zeroes_padding_rows(window, softcap):
    q, kc, vc, md, dense = paged_step([1, 1, 1], [9, 1, 13], seed=1)
    out = windowed_softcap_decode(q, kc, vc, md, 0.3, window, softcap)
    torch.testing.assert_close(out.double(), dense_reference(q, md, dense, 0.3, window, softcap),
                               rtol=1e-5, atol=1e-5)
    # a CUDA-graph padding row: context 0, table of zeros -> output 0, others unchanged
    md.context_lens = torch.tensor([9, 1, 13, 0], dtype=torch.int32)
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1])])
    padded = windowed_softcap_decode(torch.cat([q, torch.randn(1, HQ, D)]), kc, vc, md, 0.3, window, softcap)
    assert padded[3].abs().max() == 0
    torch.testing.assert_close(padded[:3], out)
