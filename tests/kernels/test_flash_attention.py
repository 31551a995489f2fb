"""fusecc.kernels.flash_attention against a float64 torch reference.

CPU: the Triton interpreter, fp32/fp16, tiny shapes. GPU (@pytest.mark.gpu): bf16, real sizes.
Outputs are NaN-poisoned before each call, so an element the kernel never writes fails the check.
"""

import pytest
import torch

from fusecc.kernels import flash_attention
from fusecc.kernels.reference import attention_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, device="cpu"):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device)
    return q, k, v


def _run(q, k, v, causal, scale=None):
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    res = flash_attention(q, k, v, causal=causal, scale=scale, out=out)
    assert res.data_ptr() == out.data_ptr()
    return out


# (B, Hq, Hkv, Sq, Sk, D, causal, dtype)
CPU_CASES = [
    (1, 2, 2, 32, 32, 16, False, torch.float32),
    (1, 2, 2, 32, 32, 16, True, torch.float32),
    (2, 4, 2, 33, 47, 32, True, torch.float32),    # GQA, seq_q < seq_k, ragged tails
    (1, 4, 1, 47, 20, 24, True, torch.float16),    # MQA, seq_q > seq_k (early rows see nothing), padded D
    (1, 2, 2, 40, 17, 40, False, torch.float32),   # seq_q > seq_k non-causal, padded D (40 -> 64)
    (2, 2, 1, 1, 37, 32, True, torch.float16),     # one query row (decode-like)
    (1, 2, 2, 17, 64, 16, False, torch.float16),
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,dtype", CPU_CASES)
def test_matches_reference(B, Hq, Hkv, Sq, Sk, D, causal, dtype):
    torch.manual_seed(0)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype)
    out = _run(q, k, v, causal)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_rows_that_see_nothing_are_zero():
    # seq_q > seq_k, causal bottom-right: query i sees keys <= i - (Sq - Sk); the first Sq - Sk rows see none
    torch.manual_seed(1)
    q, k, v = _inputs(1, 2, 2, 30, 10, 16, torch.float32)
    out = _run(q, k, v, causal=True)
    assert torch.equal(out[:, :, :20], torch.zeros_like(out[:, :, :20]))
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_transposed_views_and_scale():
    # HF layout: [B, S, H, D] projections viewed as [B, H, S, D] without a copy
    torch.manual_seed(2)
    B, S, H, D = 2, 24, 4, 32
    q = torch.randn(B, S, H, D).transpose(1, 2)
    kv = torch.randn(B, S, 2, 2, D)  # k and v interleaved in one buffer
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    out = _run(q, k, v, causal=True, scale=0.3)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_rejects_bad_shapes():
    q = torch.randn(1, 3, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="4-d"):
        flash_attention(q[0], k[0], k[0])
    with pytest.raises(ValueError, match="non-negative scale"):
        flash_attention(k, k, k, scale=-1.0)


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1024, 1024), (2048, 2048), (300, 1500), (1500, 700)])
def test_gpu_bf16(D, causal, Sq, Sk):
    torch.manual_seed(0)
    Hq, Hkv = (32, 8) if D <= 128 else (8, 2)
    q, k, v = _inputs(1, Hq, Hkv, Sq, Sk, D, torch.bfloat16, "cuda")
    out = _run(q, k, v, causal)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
