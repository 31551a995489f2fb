"""fusecc attention custom ops: schema/fake/real consistency (opcheck) and graph-break-free tracing.

On CPU the ops run the pure-torch references; on CUDA the Triton kernels (GPU test at the end).
"""

import pytest
import torch

import fusecc.ops  # noqa: F401  (registers the ops)
from fusecc.kernels.reference import attention_reference

ops = torch.ops.fusecc


def _paged(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(12, 4, 2, 16, generator=g).to(device, dtype)
    v_cache = torch.randn(12, 4, 2, 16, generator=g).to(device, dtype)
    tables = torch.randperm(12, generator=g)[:9].reshape(3, 3).to(device, torch.int32)
    ctx = torch.tensor([5, 0, 12], dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, ctx


def _cases():
    q4, k4 = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 9, 16)
    v4 = torch.randn(1, 2, 9, 16)
    q3, k3, v3 = torch.randn(7, 4, 16), torch.randn(9, 2, 16), torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    k_cache, v_cache, tables, ctx = _paged()
    prefill_ctx = torch.tensor([5, 0, 12], dtype=torch.int32)
    cu_new = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    slots = torch.tensor([3, -1, 17, 40, 8, -1, 0], dtype=torch.int64)
    return [
        (ops.flash_attention, (q4, k4, v4, True, None)),
        (ops.flash_attention, (q4, k4, v4, False, 0.2)),
        (ops.flash_attention, (q4, k4, v4, False, None, torch.rand(1, 1, 6, 9) > 0.3)),  # bool, broadcast heads
        (ops.flash_attention, (q4, k4, v4, True, 0.3, torch.randn(6, 9))),  # additive float, 2-d
        (ops.varlen_attention, (q3, k3, v3, cu_q, cu_k, 4, 4, True, None)),
        (ops.paged_attention, (torch.randn(3, 4, 16), k_cache, v_cache, tables, ctx, None)),
        (ops.paged_prefill_attention, (q3, k_cache, v_cache, cu_new, tables, prefill_ctx, 5, None)),
        (ops.write_kv_cache, (k3[:7], v3[:7], k_cache.clone(), v_cache.clone(), slots)),
    ]


@pytest.mark.parametrize("i", range(8))
def test_opcheck(i):
    torch.manual_seed(0)
    op, args = _cases()[i]
    torch.library.opcheck(op, args)


def test_cpu_op_matches_reference_semantics():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    out = ops.flash_attention(q, k, v, True)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))  # rows that see no key


def test_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    k_cache, v_cache, tables, ctx = _paged()

    def step(x, k_new, v_new, slots, q_dec):
        y = ops.flash_attention(x, x, x, True, None) * 2
        ops.write_kv_cache(k_new, v_new, k_cache, v_cache, slots)
        z = ops.paged_attention(q_dec, k_cache, v_cache, tables, ctx, None)
        return y.sum() + z.sum()

    args = (torch.randn(1, 2, 5, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16),
            torch.tensor([1, 30]), torch.randn(3, 4, 16))
    eager_caches = (k_cache.clone(), v_cache.clone())
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(*args)
    k_after, v_after = k_cache.clone(), v_cache.clone()
    k_cache.copy_(eager_caches[0])
    v_cache.copy_(eager_caches[1])
    want = step(*args)
    torch.testing.assert_close(got, want)
    assert torch.equal(k_after, k_cache) and torch.equal(v_after, v_cache)
    assert torch.equal(k_cache.view(-1, 2, 16)[30], args[1][1])


@pytest.mark.gpu
def test_gpu_ops_dispatch_to_kernels():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(lambda a, b: ops.flash_attention(a, b, b, True, None), fullgraph=True)(q, k)
    ref = attention_reference(q.float(), k.float(), k.float(), causal=True)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
