"""The TMA (tensor descriptor) prefill kernel against a float64 reference.

On CPU the Triton interpreter runs the descriptor kernel on CPU tensors once `device_has_tma` says
yes; each test checks the descriptor kernel really ran (or, for ineligible calls, did not).
Outputs are NaN-poisoned, so rows the descriptor store drops wrongly fail the check.
"""

import pytest
import torch

from fusecc.kernels import flash_attention_gluon, flash_attention_tma
from fusecc.kernels.reference import attention_reference
from tests.kernels.prefill_launches import poisoned_run, record_launches

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def tma_launches(monkeypatch):
    """Pretend the device has TMA (CPU only) and count descriptor-kernel launches."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(flash_attention_tma, "device_has_tma", lambda device: True)
    return record_launches(monkeypatch, "launch_tma_prefill", run_on_cpu=True)


# (B, Hq, Hkv, Sq, Sk, causal, dtype); head_dim 64 (the descriptor kernel's dims are 64 and 128)
CASES = [
    (1, 2, 2, 32, 32, False, torch.float16),
    (1, 2, 2, 40, 40, True, torch.float16),     # ragged last tile: OOB rows load 0, stores dropped
    (2, 4, 2, 19, 45, True, torch.float16),     # GQA, seq_q < seq_k, causal bottom-right
    (1, 4, 1, 37, 20, True, torch.float16),     # MQA, seq_q > seq_k: the first rows see nothing -> 0
    (2, 2, 1, 23, 50, False, torch.float16),
]


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,causal,dtype", CASES)
def test_descriptor_kernel_matches_reference(tma_launches, B, Hq, Hkv, Sq, Sk, causal, dtype):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, Hq, Sq, 64, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Sk, 64, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Sk, 64, dtype=dtype, device=device)
    out = poisoned_run(q, k, v, causal)
    assert len(tma_launches) == 1
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_hf_transposed_views_use_descriptors(tma_launches):
    # [B, S, H, D] projections viewed as [B, H, S, D]: heads and batch are not one collapsible
    # dimension, which a rank-4 descriptor handles without a copy
    torch.manual_seed(1)
    B, S, H, D = 2, 27, 4, 64
    q = torch.randn(B, S, H, D, dtype=torch.float16).transpose(1, 2)
    kv = torch.randn(B, S, 2, 2, D, dtype=torch.float16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    if torch.cuda.is_available():
        q, k, v = q.cuda(), k.cuda(), v.cuda()
    out = poisoned_run(q, k, v, causal=True, scale=0.2)
    assert len(tma_launches) == 1
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, scale=0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_ineligible_calls_take_the_pointer_kernel(tma_launches):
    torch.manual_seed(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(1, 2, 20, 64, device=device)
    # fp32, an odd head dim, a mask, a misaligned row stride: none may reach the descriptor kernel
    poisoned_run(q, q, q, causal=True)
    h = torch.randn(1, 2, 20, 80, dtype=torch.float16, device=device)
    poisoned_run(h, h, h, causal=True)
    h = q.half()
    poisoned_run(h, h, h, causal=False, attn_mask=torch.ones(20, 20, dtype=torch.bool, device=device))
    odd = torch.randn(1, 2, 20, 65, dtype=torch.float16, device=device)[..., :64]  # row stride 65 * 2 bytes
    out = poisoned_run(odd, odd, odd, causal=False)
    # no keys (a descriptor cannot have an empty dimension), and K/V expanded over heads (stride 0)
    h = torch.randn(1, 2, 20, 64, dtype=torch.float16, device=device)
    empty = h[:, :, :0]
    assert torch.equal(poisoned_run(h, empty, empty, causal=False), torch.zeros_like(h))
    kv = torch.randn(1, 1, 20, 64, dtype=torch.float16, device=device).expand(1, 2, 20, 64)
    torch.testing.assert_close(poisoned_run(h, kv, kv, causal=True).double(),
                               attention_reference(h.double(), kv.double(), kv.double(), causal=True),
                               atol=2e-3, rtol=2e-3)
    assert tma_launches == []
    ref = attention_reference(odd.double(), odd.double(), odd.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(1024, 1024), (300, 1500), (1500, 700)])
def test_gpu_bf16_hf_layout(tma_launches, monkeypatch, D, causal, Sq, Sk):
    # at head_dim 128 an sm_90 device runs the Gluon kernel (test_flash_attention_gluon.py); the
    # descriptor kernel is what other TMA devices run, so it is tested here with Gluon off
    monkeypatch.setattr(flash_attention_gluon, "device_is_hopper", lambda device: False)
    torch.manual_seed(0)
    q = torch.randn(2, Sq, 32, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(2, Sk, 8, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v = torch.randn(2, Sk, 8, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    out = poisoned_run(q, k, v, causal)
    assert len(tma_launches) == (1 if torch.cuda.get_device_capability()[0] >= 9 else 0)
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    assert not out.isnan().any()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
