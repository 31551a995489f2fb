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


# ---- explicit attention masks (MASK_KIND): bool keep-masks and additive float biases ----

def _mask(kind, shape, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=g) > 0.3
    if kind == "bool":
        return keep
    bias = torch.randn(shape, generator=g).to(dtype)
    return bias.masked_fill(~keep, float("-inf") if kind == "-inf" else torch.finfo(dtype).min)


# (B, Hq, Hkv, Sq, Sk, D, causal, dtype, mask kind, mask shape)
MASK_CASES = [
    (2, 4, 2, 19, 23, 16, False, torch.float32, "bool", (2, 1, 19, 23)),      # HF shape: heads broadcast
    (1, 2, 2, 33, 33, 32, True, torch.float16, "bool", (1, 1, 33, 33)),       # mask and causal together
    (2, 4, 1, 17, 40, 24, False, torch.float32, "-inf", (2, 4, 17, 40)),      # full-shape float, padded D
    (2, 2, 2, 20, 20, 16, False, torch.float16, "finfo", (20, 20)),           # 2-d float, finfo.min fill
    (1, 2, 1, 9, 31, 16, False, torch.float32, "bool", (1, 1, 1, 31)),        # key-padding mask (seq_q broadcast)
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,causal,dtype,kind,mshape", MASK_CASES)
def test_masked_matches_reference(B, Hq, Hkv, Sq, Sk, D, causal, dtype, kind, mshape):
    torch.manual_seed(0)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype)
    mask = _mask(kind, mshape, dtype)
    out = torch.full((B, Hq, Sq, D), float("nan"), dtype=dtype)
    flash_attention(q, k, v, causal=causal, attn_mask=mask, out=out)
    ref_mask = mask if mask.dtype == torch.bool else mask.double()
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, attn_mask=ref_mask)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_mask_is_read_in_place_not_copied():
    # An expanded mask (stride 0 on batch and heads) and a transposed one are read through strides.
    torch.manual_seed(4)
    q, k, v = _inputs(3, 4, 2, 16, 24, 16, torch.float32)
    base = torch.rand(24, 16) > 0.2
    mask = base.t()[None, None].expand(3, 4, 16, 24)
    assert mask.stride()[:2] == (0, 0) and not mask.is_contiguous()
    out = _run_masked(q, k, v, mask)
    ref = attention_reference(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def _run_masked(q, k, v, mask, causal=False):
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    return flash_attention(q, k, v, causal=causal, attn_mask=mask, out=out)


@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo"])
def test_fully_masked_rows_match_sdpa(kind):
    # SDPA returns 0 for a row whose keys are all masked off (bool False / -inf); a finite
    # finfo.min row is not empty: every logit rounds to the minimum and v is averaged uniformly.
    torch.manual_seed(5)
    q, k, v = _inputs(1, 2, 2, 12, 20, 16, torch.float32)
    mask = _mask(kind, (1, 1, 12, 20), torch.float32)
    mask[..., 4, :] = False if kind == "bool" else mask.new_tensor(float("-inf") if kind == "-inf" else torch.finfo(torch.float32).min)
    out = _run_masked(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
    if kind == "finfo":
        torch.testing.assert_close(out[0, :, 4], v[0].mean(1), atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(out[0, :, 4], torch.zeros_like(out[0, :, 4]))


def test_rejects_bad_masks():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(q, q, q, attn_mask=torch.ones(1, 3, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or fp16/bf16/fp32"):
        flash_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo"])
@pytest.mark.parametrize("D,Sq,Sk", [(64, 1024, 1024), (128, 700, 1500), (80, 1500, 700)])
def test_gpu_bf16_masked(kind, D, Sq, Sk):
    torch.manual_seed(0)
    q, k, v = _inputs(2, 16, 4, Sq, Sk, D, torch.bfloat16, "cuda")
    mask = _mask(kind, (2, 1, Sq, Sk), torch.bfloat16).cuda()
    mask[..., 7, :] = False if kind == "bool" else mask.new_tensor(float("-inf") if kind == "-inf" else torch.finfo(torch.bfloat16).min)
    out = _run_masked(q, k, v, mask)
    ref = attention_reference(q.float(), k.float(), v.float(), attn_mask=mask if kind == "bool" else mask.float())
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
    # A fully masked row: SDPA's math definition gives 0 for bool/-inf rows, the mean of v for
    # finfo.min. (Its CUDA backends disagree there: on H100, cuDNN — the default for bf16 with a
    # mask — returns other values for all-False bool rows, and 0 for finfo.min rows.)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if kind == "finfo":
        assert _rel_err(out[:, :, 7], sdpa[:, :, 7].float()) < 1e-2
    else:
        assert torch.equal(out[:, :, 7], torch.zeros_like(out[:, :, 7])) and (sdpa[:, :, 7] == 0).all()


def test_reference_keeps_nan_from_inputs_and_zeroes_only_hidden_rows():
    # the CPU path of the attention ops: a NaN in q is a NaN row, as in eager softmax; a row the
    # causal structure hides completely is 0 (found by a miscompile hunt: nan_to_num made both 0)
    from fusecc.kernels.reference import attention_reference

    q, k, v = torch.ones(1, 1, 3, 8), torch.ones(1, 1, 2, 8), torch.ones(1, 1, 2, 8)
    q[0, 0, 2] = float("nan")
    out = attention_reference(q, k, v, causal=True)  # seq_q > seq_k: row 0 sees no key
    assert torch.equal(out[0, 0, 0], torch.zeros(8))
    assert torch.equal(out[0, 0, 1], torch.ones(8))
    assert torch.isnan(out[0, 0, 2]).all()
