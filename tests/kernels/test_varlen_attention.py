"""fusecc.kernels.varlen_attention (packed sequences) against a float64 torch reference."""

import pytest
import torch

from fusecc.kernels import varlen_attention
from fusecc.kernels.reference import varlen_attention_reference

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _case(len_q, len_k, Hq, Hkv, D, dtype, causal, device="cpu"):
    q = torch.randn(sum(len_q), Hq, D, dtype=dtype, device=device)
    k = torch.randn(sum(len_k), Hkv, D, dtype=dtype, device=device)
    v = torch.randn(sum(len_k), Hkv, D, dtype=dtype, device=device)
    cq, ck = _cu(len_q, device), _cu(len_k, device)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, cq, ck, max(len_q), max(len_k), causal=causal, out=out)
    return out, (q, k, v, cq, ck)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_with_empty_sequence(causal, dtype):
    torch.manual_seed(0)
    len_q = [5, 0, 17, 33, 1]
    out, (q, k, v, cq, ck) = _case(len_q, len_q, 4, 2, 32, dtype, causal)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck, causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_seq_q_differs_from_seq_k_and_padded_head_dim():
    # per sequence: q shorter than k (chunk after a prefix), q longer than k (rows that see nothing), empty k
    torch.manual_seed(1)
    len_q, len_k = [4, 20, 3, 9], [19, 6, 0, 9]
    out, (q, k, v, cq, ck) = _case(len_q, len_k, 2, 1, 24, torch.float32, True)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck, causal=True)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[cq[2]:cq[3]], torch.zeros_like(out[cq[2]:cq[3]]))  # sequence with no keys


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_bf16(D, causal):
    torch.manual_seed(0)
    len_q = [1000, 17, 0, 2048, 513, 1]
    out, (q, k, v, cq, ck) = _case(len_q, len_q, 32, 8, D, torch.bfloat16, causal, "cuda")
    ref = varlen_attention_reference(q.float(), k.float(), v.float(), cq, ck, causal=causal)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
