"""Sliding-window attention and logit soft-capping in the paged kernels (decode and prefill), through
the Triton interpreter here and on the GPU, and in the CPU references the ops run, against a dense
float64 reference computed one query at a time from the un-paged K/V."""

import pytest
import torch

from fusecc.kernels import paged_attention, paged_prefill_attention
from fusecc.kernels.reference import paged_attention_reference, paged_prefill_attention_reference
from fusecc.runtime.models.attention import AttentionMetadata

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


CASES = [(5, None), (None, 0.7), (3, 2.0), (None, None), (40, None)]  # 40: wider than every context


def prefill(q, kc, vc, md, scale, window, softcap, impl):
    if impl == "kernel":
        return paged_prefill_attention(q, kc, vc, md.cu_seqlens_q, md.block_tables, md.context_lens, md.max_seqlen_q,
                                       scale=scale, sliding_window=window, softcap=softcap)
    return paged_prefill_attention_reference(q, kc, vc, md.cu_seqlens_q, md.block_tables, md.context_lens,
                                             scale=scale, sliding_window=window, softcap=softcap)


def decode(q, kc, vc, md, scale, window, softcap, impl, num_splits=None):
    if impl == "kernel":
        return paged_attention(q, kc, vc, md.block_tables, md.context_lens, scale=scale, sliding_window=window,
                               softcap=softcap, num_splits=num_splits)
    return paged_attention_reference(q, kc, vc, md.block_tables, md.context_lens, scale=scale,
                                     sliding_window=window, softcap=softcap)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("window,softcap", CASES)
def test_mixed_step_matches_float64_reference(window, softcap, impl):
    # a decode, a first chunk, a later chunk (its window starts mid-context), a prefill shorter than the window;
    # 21 new tokens: the kernel's query tiles (16 rows in the interpreter) start at different window edges
    q, kc, vc, md, dense = paged_step([1, 6, 21, 2], [9, 6, 30, 2])
    out = prefill(q, kc, vc, md, 0.3, window, softcap, impl)
    torch.testing.assert_close(out.double(), dense_reference(q, md, dense, 0.3, window, softcap),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("window,softcap", CASES)
def test_decode_step_matches_float64_reference_and_zeroes_padding_rows(window, softcap, impl):
    q, kc, vc, md, dense = paged_step([1, 1, 1], [9, 1, 13], seed=1)
    out = decode(q, kc, vc, md, 0.3, window, softcap, impl)
    torch.testing.assert_close(out.double(), dense_reference(q, md, dense, 0.3, window, softcap),
                               rtol=1e-5, atol=1e-5)
    # a CUDA-graph padding row: context 0, table of zeros -> output 0, others unchanged
    md.context_lens = torch.tensor([9, 1, 13, 0], dtype=torch.int32)
    md.block_tables = torch.cat([md.block_tables, torch.zeros_like(md.block_tables[:1])])
    padded = decode(torch.cat([q, torch.randn(1, HQ, D)]), kc, vc, md, 0.3, window, softcap, impl)
    assert padded[3].abs().max() == 0
    torch.testing.assert_close(padded[:3], out)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_window_is_shared_out_among_splits(num_splits):
    # the splits divide the window, not the whole context: with 8 splits of a 3-key window most are
    # empty and must merge with weight 0
    q, kc, vc, md, dense = paged_step([1, 1], [30, 7], seed=2)
    out = decode(q, kc, vc, md, 0.3, 3, 1.5, "kernel", num_splits=num_splits)
    torch.testing.assert_close(out.double(), dense_reference(q, md, dense, 0.3, 3, 1.5), rtol=1e-5, atol=1e-5)


def test_fp16_kernel_within_half_precision_of_reference():
    q, kc, vc, md, dense = paged_step([1, 6, 21, 2], [9, 6, 30, 2], seed=3)
    q16, k16, v16 = q.half(), kc.half(), vc.half()
    out = prefill(q16, k16, v16, md, 0.3, 5, 0.7, "kernel")
    dense16 = [(k.half().float(), v.half().float()) for k, v in dense]
    torch.testing.assert_close(out.double(), dense_reference(q16.float(), md, dense16, 0.3, 5, 0.7),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bad", [dict(sliding_window=0), dict(sliding_window=2.5), dict(softcap=-1.0),
                                 dict(softcap=0.0)])
def test_bad_window_or_softcap_is_an_error_naming_it(bad):
    q, kc, vc, md, _ = paged_step([1], [4])
    with pytest.raises(ValueError, match=next(iter(bad))):
        paged_attention(q, kc, vc, md.block_tables, md.context_lens, **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(256, None), (None, 50.0), (512, 30.0)])
def test_gpu_bf16_kernels_at_real_sizes(window, softcap):
    from tests.kernels.test_paged_attention import _paged_cache  # noqa: PLC0415

    torch.manual_seed(0)
    ctx_lens, q_lens = [1000, 37, 3000, 512], [1, 37, 700, 1]
    k_cache, v_cache, tables, ctx = _paged_cache(ctx_lens, 16, 8, 128, torch.bfloat16, device="cuda")
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    f64 = [t.double() for t in (q, k_cache, v_cache)]
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, max(q_lens), sliding_window=window,
                                  softcap=softcap)
    ref = paged_prefill_attention_reference(*f64, cu, tables, ctx, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    qd = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = paged_attention(qd, k_cache, v_cache, tables, ctx, sliding_window=window, softcap=softcap)
    ref = paged_attention_reference(qd.double(), *f64[1:], tables, ctx, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
