"""fusecc/kernels/qk_rope.py (per-head q/k RMSNorm and rotary embedding in one kernel) against the native
modules' torch ops, in the interpreter and on a GPU; the fusecc::qk_norm_rope op."""

import pytest
import torch

from fusecc.kernels.qk_rope import qk_norm_rope, qk_norm_rope_reference


def rope_tables(positions: int, head_dim: int):
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32),
                        1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def case(tokens, hq, hkv, d, dtype, norm, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    positions = torch.randint(0, 50, (tokens,), generator=g).to(device)
    cos, sin = (t.to(device) for t in rope_tables(64, d))
    qw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device) if norm else None
    kw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device) if norm else None
    return qkv, positions, cos, sin, qw, kw, 1e-6, hq, hkv, d


# heads over one program, two (a q/k boundary inside the second), and a partial last group
@pytest.mark.parametrize("tokens,hq,hkv,d", [(5, 4, 2, 16), (3, 6, 6, 32), (1, 8, 1, 64), (2, 12, 5, 16)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_modules(tokens, hq, hkv, d, norm, dtype):
    args = case(tokens, hq, hkv, d, dtype, norm, seed=d + hq)
    q, k = qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    assert q.shape == (tokens, hq, d) and k.shape == (tokens, hkv, d) and q.dtype == dtype
    # fp16: every rounding as the modules'; fp32: the norm's sum in another order
    tol = dict(rtol=0, atol=0) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q, rq, **tol)
    torch.testing.assert_close(k, rk, **tol)


def test_op_on_cpu_is_the_modules_ops():
    import fusecc.ops  # noqa: F401  (registers fusecc::qk_norm_rope)

    args = case(4, 4, 2, 16, torch.float32, True)
    q, k = torch.ops.fusecc.qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    assert torch.equal(q, rq) and torch.equal(k, rk) and q.is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,norm", [(32, 4, True), (32, 8, False), (16, 16, True)])
def test_gpu_bf16_matches_the_modules(hq, hkv, norm):
    import fusecc.ops  # noqa: F401

    args = case(37, hq, hkv, 128, torch.bfloat16, norm, device="cuda")
    q, k = torch.ops.fusecc.qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    # the same roundings; rsqrt's last bit may differ between the kernel and torch: at most one bf16 step
    for out, ref in ((q, rq), (k, rk)):
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
        assert (out != ref).float().mean().item() < 0.01
