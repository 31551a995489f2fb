"""The FP8 KV cache: the cache-write kernel's quantization and the paged kernels' in-register
dequantization, against float64 references.

The quantization reference is torch's e4m3 cast of x / scale (fp32) clamped to +-448 (round to
nearest even). The kernel rounds to the e4m3 grid in fp32 before its cast (cache_write.py), so it
must match torch bit for bit (up to the sign of a zero) through the interpreter as on the GPU. The
attention tests read caches written by torch, so they test the dequantization alone: float64
attention over cache * scale is the reference.
"""

import pytest
import torch

from fusecc.kernels import paged_attention, paged_prefill_attention, write_kv_cache
from fusecc.kernels.reference import (attention_reference, gather_paged_kv, paged_attention_reference,
                                      paged_prefill_attention_reference, write_kv_cache_reference)

FP8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _e4m3_values() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties: round to even), values past
    448 (must saturate) and randn over seven decades (subnormals included), as fp32."""
    grid = torch.arange(127, dtype=torch.uint8).view(FP8).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2000, generator=g) * torch.logspace(-4, 3, 2000)
    x = torch.cat([grid, mids, spread, torch.tensor([449.0, 464.0, 480.0, 1e4])])
    return torch.cat([x, -x])


def _check_write(dtype, Hkv, D, k_scale, v_scale, device, num_blocks=None, block_size=16, min_tokens=1):
    values = _e4m3_values()
    per_token = Hkv * D
    T = max(min_tokens, -(-values.numel() // per_token))
    x = values.repeat(-(-T * per_token // values.numel()))[:T * per_token]
    kv = torch.stack([x[torch.randperm(x.numel())], x], 0).view(2, T, Hkv, D).transpose(0, 1)
    kv = kv.to(dtype).to(device)
    k, v = kv[:, 0] * k_scale, kv[:, 1] * v_scale  # strided, as slices of a fused projection
    num_blocks = num_blocks or -(-2 * T // block_size)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]
    slots[::7] = -1
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(FP8)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=device).to(FP8)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    write_kv_cache_reference(k, v, k_ref, v_ref, slots, k_scale, v_scale)
    # float compare: equal values (the kernel writes +0 where torch writes -0); untouched slots too
    assert torch.equal(k_cache.float(), k_ref.float()) and torch.equal(v_cache.float(), v_ref.float())
    kept = slots >= 0
    expected = (k[kept].float() / k_scale).clamp(-448, 448).to(FP8).float()
    assert torch.equal(k_cache.view(-1, Hkv, D)[slots[kept]].float(), expected)
    assert k_cache.float().abs().max() == 448  # saturated, not NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Hkv,D,k_scale,v_scale", [(2, 32, 1.0, 1.0), (3, 24, 0.37, 2.5)])
def test_write_quantizes_like_torch(dtype, Hkv, D, k_scale, v_scale):
    _check_write(dtype, Hkv, D, k_scale, v_scale, "cpu")


def _fp8_paged_cache(context_lens, block_size, Hkv, D, device="cpu", extra_blocks=3):
    """fp8 caches written by torch (values on the e4m3 grid up to ~+-200), shuffled pages."""
    B = len(context_lens)
    max_blocks = max((c + block_size - 1) // block_size for c in context_lens) + 1
    num_blocks = B * max_blocks + extra_blocks
    k_cache = (torch.randn(num_blocks, block_size, Hkv, D) * 40).to(FP8).to(device)
    v_cache = (torch.randn(num_blocks, block_size, Hkv, D) * 40).to(FP8).to(device)
    tables = torch.randperm(num_blocks)[:B * max_blocks].reshape(B, max_blocks).to(torch.int32).to(device)
    return k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32, device=device)


def _dequantized_rows(cache, table, length, scale):
    # [Hkv, length, D] float64: what the kernel must read
    return (gather_paged_kv(cache, table, length).double() * scale).transpose(0, 1)


# k_scale small enough that q.k of raw e4m3 values (up to ~200) would overflow fp16 logits without it
K_SCALE, V_SCALE = 0.01, 0.03


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("Hq,Hkv,D,dtype", [(8, 2, 32, torch.float32), (4, 4, 24, torch.float16)])
def test_decode_dequantizes(num_splits, Hq, Hkv, D, dtype, device="cpu"):
    torch.manual_seed(0)
    k_cache, v_cache, tables, ctx = _fp8_paged_cache([0, 1, 37, 64], 8, Hkv, D, device)
    q = torch.randn(len(ctx), Hq, D, device=device).to(dtype)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, k_scale=K_SCALE, v_scale=V_SCALE,
                          num_splits=num_splits, softcap=None)
    ref = torch.zeros(q.shape, dtype=torch.float64)
    for b, n in enumerate(ctx.tolist()):
        if n:
            kb, vb = (_dequantized_rows(c, tables[b], n, s).cpu() for c, s in ((k_cache, K_SCALE), (v_cache, V_SCALE)))
            ref[b] = attention_reference(q[b].cpu().double()[:, None], kb, vb)[:, 0]
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    scale_of_out = ref.abs().max().item()
    torch.testing.assert_close(out.cpu().double(), ref, atol=TOL[dtype] * scale_of_out, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_dequantizes(dtype, device="cpu", window=None):
    torch.manual_seed(2)
    q_lens, ctx_lens = [0, 20, 30, 1], [9, 20, 64, 45]
    k_cache, v_cache, tables, ctx = _fp8_paged_cache(ctx_lens, 8, 2, 32, device)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 4, 32, device=device).to(dtype)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, max(q_lens), k_scale=K_SCALE,
                                  v_scale=V_SCALE, sliding_window=window)
    # the CPU op path: the reference dequantizes the same way
    ref = paged_prefill_attention_reference(q.cpu().double(), k_cache.cpu(), v_cache.cpu(), cu.cpu(), tables.cpu(),
                                            ctx.cpu(), k_scale=K_SCALE, v_scale=V_SCALE, sliding_window=window)
    cq = cu.tolist()
    for b, n in enumerate(ctx.tolist()):  # ... which is float64 attention over cache * scale
        if cq[b + 1] > cq[b]:
            kb, vb = (_dequantized_rows(c, tables[b], n, s).cpu() for c, s in ((k_cache, K_SCALE), (v_cache, V_SCALE)))
            direct = attention_reference(q[cq[b]:cq[b + 1]].cpu().double().transpose(0, 1), kb, vb, causal=True,
                                         sliding_window=window).transpose(0, 1)
            torch.testing.assert_close(ref[cq[b]:cq[b + 1]].double(), direct, rtol=1e-6, atol=1e-6)
    scale_of_out = ref.abs().max().item()
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=TOL[dtype] * scale_of_out, rtol=TOL[dtype])


def test_decode_reference_dequantizes():
    k_cache, v_cache, tables, ctx = _fp8_paged_cache([5, 20], 4, 2, 16)
    q = torch.randn(2, 4, 16, dtype=torch.float64)
    out = paged_attention_reference(q, k_cache, v_cache, tables, ctx, k_scale=K_SCALE, v_scale=V_SCALE)
    kb, vb = _dequantized_rows(k_cache, tables[1], 20, K_SCALE), _dequantized_rows(v_cache, tables[1], 20, V_SCALE)
    torch.testing.assert_close(out[1], attention_reference(q[1][:, None], kb, vb)[:, 0])


def test_bad_caches_are_refused():
    k_cache, v_cache, tables, ctx = _fp8_paged_cache([5], 4, 2, 16)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="positive finite k_scale"):
        paged_attention(q, k_cache, v_cache, tables, ctx, k_scale=0.0)
    with pytest.raises(ValueError, match="must both be"):
        paged_attention(q, k_cache, v_cache.float(), tables, ctx)
    with pytest.raises(ValueError, match="must both be torch.float32 or float8_e4m3fn"):
        write_kv_cache(q[:, :2], q[:, :2], k_cache.half(), v_cache.half(), torch.zeros(1, dtype=torch.int64))


# ---- GPU: bf16 at real sizes (Llama-8B heads), the kernel's cast exact ----

@pytest.mark.gpu
def test_gpu_write_exact():
    _check_write(torch.bfloat16, 8, 128, 0.37, 2.5, "cuda", num_blocks=512, min_tokens=4000)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_decode_bf16(num_splits):
    torch.manual_seed(0)
    k_cache, v_cache, tables, ctx = _fp8_paged_cache([1, 700, 4096, 2000], 16, 8, 128, "cuda")
    q = torch.randn(4, 32, 128, device="cuda").to(torch.bfloat16)
    out = paged_attention(q, k_cache, v_cache, tables, ctx, k_scale=K_SCALE, v_scale=V_SCALE, num_splits=num_splits)
    ref = paged_attention_reference(q.double(), k_cache, v_cache, tables, ctx, k_scale=K_SCALE, v_scale=V_SCALE)
    torch.testing.assert_close(out.double(), ref, atol=TOL[torch.bfloat16] * ref.abs().max().item(),
                               rtol=TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_prefill_bf16():
    torch.manual_seed(1)
    q_lens, ctx_lens = [512, 1, 300], [512, 900, 2048]
    k_cache, v_cache, tables, ctx = _fp8_paged_cache(ctx_lens, 16, 8, 128, "cuda")
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, device="cuda").to(torch.bfloat16)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, tables, ctx, max(q_lens), k_scale=K_SCALE, v_scale=V_SCALE)
    ref = paged_prefill_attention_reference(q.double(), k_cache, v_cache, cu, tables, ctx, k_scale=K_SCALE,
                                            v_scale=V_SCALE)
    torch.testing.assert_close(out.double(), ref, atol=TOL[torch.bfloat16] * ref.abs().max().item(),
                               rtol=TOL[torch.bfloat16])
