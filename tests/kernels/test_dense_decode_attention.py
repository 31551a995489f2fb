"""flash_attention with one query row runs the split-KV dense decode kernel
(fusecc/kernels/dense_decode_attention.py); checked against a float64 reference.

CPU: the interpreter (4 "SMs", so the split heuristic picks several splits) plus explicit split
counts; GPU (@pytest.mark.gpu): bf16 at static-cache sizes. Outputs are NaN-poisoned.
"""

import pytest
import torch

from fusecc.kernels import flash_attention
from fusecc.kernels.attention_tile import LOG2E
from fusecc.kernels.dense_decode_attention import dense_decode_attention
from fusecc.kernels.attention_routing import _mask_view
from fusecc.kernels.reference import attention_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _inputs(B, Hq, Hkv, Sk, D, dtype, device="cpu"):
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device)
    return q, k, v


def _static_cache_mask(B, Sk, filled, kind, dtype, device="cpu"):
    """HF's static-cache decode mask [B, 1, 1, Sk]: keys < filled[b] visible, the unused tail hidden."""
    keep = torch.arange(Sk, device=device)[None, :] < torch.tensor(filled, device=device)[:, None]
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))


def _decode(q, k, v, mask=None, num_splits=None, scale=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    if num_splits is None:
        return flash_attention(q, k, v, causal=True, attn_mask=mask, scale=scale, out=out)
    view, kind = _mask_view(mask, (q.shape[0], q.shape[1], 1, k.shape[2]), q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dense_decode_attention(q, k, v, out, scale * LOG2E, view, kind, num_splits=num_splits)


def _reference(q, k, v, mask=None, scale=None):
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    return attention_reference(q.double(), k.double(), v.double(), attn_mask=ref_mask, scale=scale)


# (B, Hq, Hkv, Sk, D, dtype, num_splits): None = the heuristic (interpreter: several splits)
CASES = [
    (1, 8, 2, 70, 32, torch.float32, None),     # GQA 4, ragged tail, heuristic splits
    (2, 4, 4, 33, 16, torch.float16, 1),        # MHA, one split: the kernel stores the output itself
    (1, 4, 1, 50, 24, torch.float32, 3),        # MQA, padded head dim, last split short
    (1, 2, 2, 20, 16, torch.float32, 4),        # more splits than 16-key tiles: one split is empty
]


@pytest.mark.parametrize("B,Hq,Hkv,Sk,D,dtype,splits", CASES)
def test_matches_reference(B, Hq, Hkv, Sk, D, dtype, splits):
    torch.manual_seed(0)
    q, k, v = _inputs(B, Hq, Hkv, Sk, D, dtype)
    out = _decode(q, k, v, num_splits=splits)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("kind", ["bool", "-inf"])
@pytest.mark.parametrize("splits", [1, 3])
def test_static_cache_mask(kind, splits):
    # the shape of a transformers StaticCache decode step: the cache's unused tail is masked off,
    # so whole splits see nothing and must not disturb the merge
    torch.manual_seed(1)
    B, Hq, Hkv, Sk, D = 2, 8, 2, 64, 16
    q, k, v = _inputs(B, Hq, Hkv, Sk, D, torch.float32)
    k[1, :, 40:] = 1e4  # garbage in the hidden tail must not leak into sequence 1
    mask = _static_cache_mask(B, Sk, [64, 17], kind, torch.float32)
    out = _decode(q, k, v, mask=mask, num_splits=splits, scale=0.2)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, scale=0.2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bool", "-inf"])
@pytest.mark.parametrize("per_head", [False, True])
def test_hidden_keys_outside_the_visible_range_are_not_read(kind, per_head):
    # left padding [0, 16) and an unused tail [48, 80) hidden from every head: their K/V are never
    # loaded (NaN there would poison p·v even at weight 0), and the result is attention over [16, 48).
    # per_head: each head of a KV group sees part of [16, 48); the group must read their union
    torch.manual_seed(6)
    B, Hq, Hkv, Sk, D = 1, 4, 2, 80, 16
    q, k, v = _inputs(B, Hq, Hkv, Sk, D, torch.float32)
    keep = torch.zeros(B, Hq if per_head else 1, 1, Sk, dtype=torch.bool)
    if per_head:
        keep[:, 0::2, :, 16:30] = True
        keep[:, 1::2, :, 25:48] = True
    else:
        keep[..., 16:48] = True
    keep[..., 20] = False  # a hidden key inside the range is masked as usual
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    k[:, :, :16] = float("nan")
    v[:, :, :16] = float("nan")
    k[:, :, 48:] = float("nan")
    v[:, :, 48:] = float("nan")
    for splits in (1, 2, 5):
        out = _decode(q, k, v, mask=mask, num_splits=splits)
        ref = _reference(q, k[:, :, 16:48], v[:, :, 16:48], keep[..., 16:48])
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", ["zero", "-0.0", "one key biased", "nan key"])
def test_plain_range_drops_the_mask_only_when_it_changes_nothing(bias):
    # after the hidden tail is cut off, a float mask of zeros (or -0.0) inside the range is left out
    # of the sweep; one nonzero or NaN bias inside the range must keep the masked sweep
    torch.manual_seed(7)
    B, Hq, Hkv, Sk, D = 2, 4, 2, 70, 16
    q, k, v = _inputs(B, Hq, Hkv, Sk, D, torch.float32)
    mask = torch.zeros(B, 1, 1, Sk)
    mask[..., 50:] = float("-inf")
    if bias == "-0.0":
        mask[..., :50] = -0.0
    elif bias == "one key biased":
        mask[1, ..., 33] = 3.0
    elif bias == "nan key":
        mask[0, ..., 7] = float("nan")
    k[:, :, 50:] = float("nan")  # never read: hidden from every head
    v[:, :, 50:] = float("nan")
    for splits in (1, 3):
        out = _decode(q, k, v, mask=mask, num_splits=splits)
        ref = _reference(q, k[:, :, :50], v[:, :, :50], mask[..., :50])
        torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4, equal_nan=True)
        if bias == "nan key":
            assert out[0].isnan().all() and not out[1].isnan().any()


def test_per_head_mask_and_fully_masked_head():
    # a full-shape mask reads a different row per q head of a packed GQA group; a head whose keys
    # are all hidden comes out 0, as SDPA returns
    torch.manual_seed(2)
    q, k, v = _inputs(1, 4, 2, 40, 16, torch.float32)
    mask = torch.rand(1, 4, 1, 40) > 0.4
    mask[0, 1] = False
    out = _decode(q, k, v, mask=mask, num_splits=2)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask), atol=1e-4, rtol=1e-4)


def test_strided_cache_views():
    # q as a transposed projection view; k/v as views into a larger cache (only the first Sk slots)
    torch.manual_seed(3)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, 1, Hq, D).transpose(1, 2)
    cache = torch.randn(2, B, Hkv, 48, D)
    k, v = cache[0, :, :, :30], cache[1, :, :, :30]
    out = _decode(q, k, v, num_splits=2)
    torch.testing.assert_close(out.double(), _reference(q, k, v), atol=1e-4, rtol=1e-4)


def test_empty_cache_gives_zeros():
    q, k, v = _inputs(1, 2, 1, 0, 16, torch.float32)
    out = _decode(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("B,D,Sk", [(1, 128, 264), (1, 64, 8192), (32, 64, 264), (8, 128, 1000)])
@pytest.mark.parametrize("kind", [None, "bool", "-inf"])
def test_gpu_bf16(B, D, Sk, kind):
    torch.manual_seed(0)
    q, k, v = _inputs(B, 32, 8, Sk, D, torch.bfloat16, "cuda")
    filled = [max(1, Sk - 8 - 13 * b) for b in range(B)]
    mask = None if kind is None else _static_cache_mask(B, Sk, filled, kind, torch.bfloat16, "cuda")
    out = _decode(q, k, v, mask=mask)
    ref_mask = None if mask is None else (mask if mask.dtype == torch.bool else mask.float())
    ref = attention_reference(q.float(), k.float(), v.float(), attn_mask=ref_mask)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
