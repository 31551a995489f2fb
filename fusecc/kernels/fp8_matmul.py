"""W8A8 FP8 matmul (e4m3 weights and activations, fp32 accumulation; GPUs with FP8: sm_89+).

    xq[m, :], sx[m] = dynamic per-token quantization of x[m, :]  (sx = amax |x[m]| / 448)
    out[m, n] = sx[m] * sum_g sw[n, g] * (xq[m, g-th K block] . wq[n, g-th K block])   (+ bias)

Weight layout (output channel first, like quant_matmul.py):
    weight       float8_e4m3fn [N, K]
    weight_scale fp32 [N, ceil(K / group)]: group 128 for 128x128-block checkpoints (the block's scale
                 repeated over its 128 rows at load), or [N, 1] per output channel (group_size -1).
A per-tensor checkpoint scale is expanded to per-channel at load (exact).

Paths: M <= 16 the split-K decode path, larger M the tensor-core prefill path (quant_launch.py);
on sm_90+ with per-channel scales and bf16 activations the prefill path is `torch._scaled_mm`
(cuBLASLt row-wise scaling), whose block-scaled variants torch 2.11 does not offer on sm_90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.launch import launch_tuned
from fusecc.kernels.quant_launch import (DECODE_MAX_ROWS, choose_split_k, decode_configs, finish_splits,
                                         k_per_split, m_bucket, prefill_configs, program_tile,
                                         split_align, store_output_tile)
from fusecc.kernels.quant_matmul import group_constexpr
from fusecc.triton_support import interpreting

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# block-scaled weights need every K tile inside one 128-wide block
_MAX_BLOCK_K = 128


@triton.jit(do_not_specialize=["M"])  # per-step sizes: kernels/launch.py
def _fp8_matmul_kernel(
    x_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, out_ptr,
    M, N, K, k_split,
    stride_xm, stride_wn, stride_swn, stride_os, stride_om, stride_on,
    M_BUCKET,  # autotune key only
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    pid_k, offs_m, offs_n, m_ok, n_ok, k_lo, k_hi = program_tile(M, N, K, k_split, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BM, BK] e4m3
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)  # [BN, BK] e4m3
        sw = tl.load(sw_ptr + offs_n * stride_swn + k0 // GROUP_SIZE, mask=n_ok, other=0.0)  # [BN]
        acc += tl.dot(a, tl.trans(b)) * sw[None, :]
    acc *= tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    store_output_tile(acc, out_ptr, b_ptr, pid_k, stride_os, stride_om, stride_on, offs_m, offs_n, m_ok, n_ok,
                      PARTIAL, HAS_BIAS)


_KEY = ["M_BUCKET", "N", "K", "GROUP_SIZE"]
_decode_kernel = triton.autotune(configs=decode_configs(_MAX_BLOCK_K), key=_KEY,
                                 cache_results=True)(_fp8_matmul_kernel)
_prefill_kernel = triton.autotune(configs=prefill_configs(_MAX_BLOCK_K), key=_KEY,
                                  cache_results=True)(_fp8_matmul_kernel)


@triton.jit
def _quantize_per_token_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """One program per row: amax over the row, then the row divided by amax / 448 and cast to e4m3."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) * (1.0 / 448.0), 1e-12)  # as quantize_fp8_per_token
    tl.store(scale_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        # div_rn: IEEE division, as torch divides (Triton's `/` on fp32 may be the approximate one)
        q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)
        tl.store(xq_ptr + m * stride_qm + offs, q.to(xq_ptr.dtype.element_ty), mask=offs < K)


def quantize_fp8_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_per_token in one launch (the torch version is four: abs, amax, div, cast). Under the
    interpreter the torch version runs: Triton 3.6's interpreted fp32 -> e4m3 cast rounds values just
    below a power of two down a whole binade (-124.7 -> -64)."""
    if interpreting():
        return quantize_fp8_per_token(x)
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        _quantize_per_token_kernel[(M,)](x, xq, scale, K, x.stride(0), xq.stride(0),
                                         BLOCK_K=min(triton.next_power_of_2(K), 4096), num_warps=4)
    return xq, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq float8_e4m3fn [M, K], scale fp32 [M]) with x ~= xq * scale[:, None]."""
    xf = x.float()
    # times the fp32 reciprocal, not `/ FP8_MAX`: CUDA divides a tensor by a scalar that way and the CPU
    # does not, so the kernel below, the CPU and the GPU agree bit for bit only on the product
    scale = (xf.abs().amax(dim=-1) * (1.0 / FP8_MAX)).clamp(min=1e-12)
    xq = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, split_k: int | None = None,
               use_scaled_mm: bool | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ (weight * scale) [N, K].T -> [M, N] in x's dtype; activations are
    quantized per token here. split_k / use_scaled_mm: path overrides (tests)."""
    M, K = x.shape
    N = weight.shape[0]
    _check(weight, weight_scale, group_size, K)
    if x.stride(1) != 1:
        x = x.contiguous()
    xq, sx = quantize_fp8_per_token_triton(x)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if use_scaled_mm is None:
        use_scaled_mm = M > DECODE_MAX_ROWS and scaled_mm_supported(x, weight, group_size)
    if use_scaled_mm:
        # cuBLASLt row-wise scaling: scale_a [M, 1], scale_b [1, N]; the weight read column-major
        res = torch._scaled_mm(xq, weight.t(), scale_a=sx[:, None], scale_b=weight_scale.view(1, N),
                               out_dtype=x.dtype)
        return res + bias if bias is not None else res
    group = group_constexpr(group_size, K)
    consts = dict(GROUP_SIZE=group, HAS_BIAS=bias is not None)
    bias_arg = bias if bias is not None else sx
    decode = M <= DECODE_MAX_ROWS
    configs = decode_configs(_MAX_BLOCK_K) if decode else prefill_configs(_MAX_BLOCK_K)
    splits, step = 1, K
    if decode:
        align = split_align(configs)
        step = k_per_split(K, choose_split_k(M, N, K, align, x.device, split_k), align)
        splits = triton.cdiv(K, step)
    target = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch_tuned(_decode_kernel if decode else _prefill_kernel, grid, (
        xq, sx, weight, weight_scale, bias_arg, target, M, N, K, step,
        xq.stride(0), weight.stride(0), weight_scale.stride(0),
        target.stride(0) if splits > 1 else 0, target.stride(-2), target.stride(-1), m_bucket(M),
    ), dict(consts, PARTIAL=splits > 1), configs[0])
    return finish_splits(target, bias, out) if splits > 1 else out


def scaled_mm_supported(x: torch.Tensor, weight: torch.Tensor, group_size: int) -> bool:
    """cuBLASLt row-wise FP8 (torch._scaled_mm): sm_90+, bf16 output, per-channel scales, dims % 16."""
    return (x.is_cuda and group_size == -1 and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0)


def _check(weight, weight_scale, group_size: int, K: int) -> None:
    N = weight.shape[0]
    if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (N, K) or weight.stride(1) != 1:
        raise ValueError(f"fp8 weight must be float8_e4m3fn [N, K] = [{N}, {K}] (row-major), got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if group_size != -1 and (group_size % _MAX_BLOCK_K or group_size <= 0):
        raise ValueError(f"fp8 weight scale groups must be -1 (per channel) or a multiple of {_MAX_BLOCK_K}, "
                         f"got {group_size}")
    groups = 1 if group_size == -1 else triton.cdiv(K, group_size)
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (N, groups):
        raise ValueError(f"fp8 weight_scale must be float32 [N, groups] = [{N}, {groups}], got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")


# ---- torch reference (CPU runs and tests) ----

def fp8_matmul_reference(x: torch.Tensor, weight, weight_scale, group_size: int, bias=None) -> torch.Tensor:
    """The same math in fp32 torch: per-token activation quantization, dequantized weight, matmul."""
    K = x.shape[1]
    xq, sx = quantize_fp8_per_token(x)
    g = torch.arange(K, device=x.device) // (K if group_size == -1 else group_size)
    w = weight.float() * weight_scale[:, g]
    out = (xq.float() * sx[:, None]) @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
