"""Paged attention: decode (split-KV + merge) and paged prefill, against float64 torch references.

Block tables are random permutations of the cache's pages, context lengths ragged (0 and 1 included).
"""

import pytest
import torch

from fusecc.kernels import paged_attention, paged_prefill_attention
from fusecc.kernels.reference import paged_attention_reference, paged_prefill_attention_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _paged_cache(context_lens, block_size, Hkv, D, dtype, device="cpu", extra_blocks=3):
    """Caches with shuffled pages; block table rows padded with unrelated (valid) page ids."""
    B = len(context_lens)
    max_blocks = max((c + block_size - 1) // block_size for c in context_lens) + 1
    num_blocks = B * max_blocks + extra_blocks
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(dtype)
    tables = torch.randperm(num_blocks, device=device)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, ctx


def _f64(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("Hq,Hkv,D,dtype", [
    (8, 2, 32, torch.float32),    # GQA 4 -> 16-row tile
    (4, 4, 16, torch.float16),    # MHA
    (4, 1, 24, torch.float32),    # MQA, padded head dim
])
def test_decode(num_splits, Hq, Hkv, D, dtype):
    torch.manual_seed(0)
    k_cache, v_cache, tables, ctx = _paged_cache([0, 1, 37, 64, 100], 8, Hkv, D, dtype)
    q = torch.randn(len(ctx), Hq, D).to(dtype)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, tables, ctx, num_splits=num_splits, out=out)
    ref = paged_attention_reference(*_f64(q, k_cache, v_cache), tables, ctx)
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # empty context -> 0
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_more_splits_than_keys():
    # 8 splits of a 5-token context: most splits are empty and must merge as weight 0
    torch.manual_seed(1)
    k_cache, v_cache, tables, ctx = _paged_cache([5, 20], 4, 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, tables, ctx, num_splits=8, scale=0.5, out=out)
    ref = paged_attention_reference(*_f64(q, k_cache, v_cache), tables, ctx, scale=0.5)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_with_prefix(dtype):
    # per sequence: new tokens q_len, context ctx (prefix + new): no new tokens, full prefill,
    # chunk after a cached prefix, single token
    torch.manual_seed(2)
    q_lens, ctx_lens = [0, 20, 30, 1, 7], [9, 20, 64, 45, 7]
    k_cache, v_cache, tables, ctx = _paged_cache(ctx_lens, 8, 2, 32, dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), 4, 32).to(dtype)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, max(q_lens), out=out)
    ref = paged_prefill_attention_reference(*_f64(q, k_cache, v_cache), cu, tables, ctx)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_padded_head_dim_mqa():
    torch.manual_seed(3)
    q_lens, ctx_lens = [5, 13], [21, 13]
    k_cache, v_cache, tables, ctx = _paged_cache(ctx_lens, 4, 1, 40, torch.float32)
    cu = torch.tensor([0, 5, 18], dtype=torch.int32)
    q = torch.randn(18, 2, 40)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, 13, out=out)
    ref = paged_prefill_attention_reference(*_f64(q, k_cache, v_cache), cu, tables, ctx)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[8192] * 8, [32768], [1, 4000, 777, 0, 2048, 16, 9000, 100]])
@pytest.mark.parametrize("D", [128, 64])
def test_gpu_decode_bf16(context_lens, D):
    torch.manual_seed(0)
    k_cache, v_cache, tables, ctx = _paged_cache(context_lens, 16, 8, D, torch.bfloat16, "cuda")
    q = torch.randn(len(context_lens), 32, D, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    paged_attention(q, k_cache, v_cache, tables, ctx, out=out)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, ctx)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_prefill_bf16():
    torch.manual_seed(0)
    q_lens, ctx_lens = [512, 1, 1024, 0, 300], [2048, 700, 1024, 50, 4000]
    k_cache, v_cache, tables, ctx = _paged_cache(ctx_lens, 16, 8, 128, torch.bfloat16, "cuda")
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, max(q_lens), out=out)
    ref = paged_prefill_attention_reference(q.float(), k_cache.float(), v_cache.float(), cu, tables, ctx)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
