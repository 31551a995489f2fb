"""fusecc.kernels.fp8_matmul (W8A8 e4m3) against a float64 reference: activations quantized per token
(scale = amax |x[m]| / 448, as the module documents), weights dequantized per channel or per 128 K-block."""

import pytest
import torch

from fusecc.kernels.fp8_matmul import (fp8_matmul, quantize_fp8_per_token, quantize_fp8_per_token_triton,
                                       scaled_mm_supported)


def reference(x, w8, scale, group):
    K = x.shape[1]
    sx = x.float().abs().amax(-1, keepdim=True) / 448
    xq = (x.float() / sx).to(torch.float8_e4m3fn)  # the fp8 rounding itself is the format's
    col_group = torch.arange(K) // (K if group == -1 else group)
    w = w8.double() * scale.double()[:, col_group]
    return (xq.double() * sx.double()) @ w.to(x.device).t()


def make(N, K, group, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w8 = (torch.randn(N, K, generator=g) * 2).to(torch.float8_e4m3fn)
    groups = 1 if group == -1 else -(-K // group)
    return w8.to(device), (torch.rand(N, groups, generator=g) * 0.05 + 0.01).to(device)


@pytest.mark.parametrize("group", [-1, 128])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_reference(group, M, dtype):
    N, K = 40, 320  # K: two full 128-blocks and a short one
    w8, scale = make(N, K, group)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = fp8_matmul(x, w8, scale, group, bias)
    ref = reference(x, w8, scale, group) + bias.double()
    assert out.dtype == dtype and out.shape == (M, N)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("split_k", [1, 3])
def test_decode_split_k(split_k):
    w8, scale = make(33, 384, 128, seed=1)
    x = torch.randn(2, 384)
    ref = reference(x, w8, scale, 128)
    torch.testing.assert_close(fp8_matmul(x, w8, scale, 128, split_k=split_k).double(), ref,
                               rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_rejects_bad_block_size():
    w8, scale = make(16, 128, 128)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_matmul(torch.randn(1, 128), w8, scale, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [-1, 128])
@pytest.mark.parametrize("M", [1, 16, 333, 4096])
def test_gpu_bf16_real_sizes(group, M):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm_89+")
    w8, scale = make(4096, 4096, group, device="cuda")
    x = torch.randn(M, 4096, device="cuda").bfloat16()
    ref = reference(x, w8, scale, group)
    out = fp8_matmul(x, w8, scale, group)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    if group == -1 and M > 16 and torch.cuda.get_device_capability() >= (9, 0):
        assert scaled_mm_supported(x, w8, group)  # the large-M path on sm_90 is cuBLASLt's
        triton_out = fp8_matmul(x, w8, scale, group, use_scaled_mm=False)
        torch.testing.assert_close(triton_out.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
def test_gpu_per_token_quantization_kernel_equals_torch():
    x = torch.randn(37, 5000, device="cuda").bfloat16() * 3
    xq, scale = quantize_fp8_per_token_triton(x)
    xq_ref, scale_ref = quantize_fp8_per_token(x)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    assert torch.equal(xq.view(torch.uint8), xq_ref.view(torch.uint8))
