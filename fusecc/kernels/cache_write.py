"""Write new tokens' K/V into their paged-cache slots (in place).

    k, v:         [tokens, kv_heads, head_dim]
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: [tokens] int64, slot = block * block_size + offset; -1 skips the token (padding)

One program per token copies all its kv heads: a [KV_HEADS_PAD, HEAD_DIM_PAD] tile for k and one for v.

An fp8 cache (float8_e4m3fn, kv_cache_dtype "fp8") gets each value quantized on the way in:
x / k_scale (v_scale for V) in fp32, IEEE-rounded as torch divides, saturated to +-448 (e4m3 has no
infinity), rounded to nearest even e4m3 value — what torch's cast gives. The rounding is done in
fp32 arithmetic (_round_to_e4m3) and the cast then only re-encodes an exact value: Triton 3.6's
interpreter misrounds fp32 -> e4m3 casts (7.9 -> 4, subnormals truncated), so the kernel computes
the same bits on the GPU and in the interpreter and is tested bit for bit against torch on both.
The attention kernels multiply the scale back.
"""

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import check_kv_cache_dtype

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    kv_heads, k_scale, v_scale,
    HEAD_DIM: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, KV_HEADS_PAD)[:, None]
    offs_d = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (offs_h < kv_heads) & (offs_d < HEAD_DIM) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + offs_h * stride_kh + offs_d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h * stride_vh + offs_d * stride_vd, mask=mask)
    if FP8:
        k = _quantize_e4m3(k, k_scale)
        v = _quantize_e4m3(v, v_scale)
    tl.store(k_cache_ptr + page * stride_kcb + offset * stride_kcs + offs_h * stride_kch + offs_d * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + offset * stride_vcs + offs_h * stride_vch + offs_d * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_e4m3(x, scale):
    # the value an fp8 cache stores, still in fp32 (the store casts it exactly): x / scale,
    # saturated, rounded to the e4m3 grid
    y = tl.div_rn(x.to(tl.float32), scale)
    return _round_to_e4m3(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))


@triton.jit
def _round_to_e4m3(y):
    """y (fp32, |y| <= 448) rounded to the nearest e4m3 value, ties to even. e4m3 values in
    [2^e, 2^(e+1)) are 2^(e-3) apart (3 mantissa bits), and below 2^-6 (subnormals) 2^-9 apart.
    Adding M = 1.5 * 2^(e+20) puts y + M in [2^(e+20), 2^(e+21)), where fp32 values are 2^(e-3)
    apart, so the add rounds y to that spacing (IEEE: to nearest, ties to even) and `- M` is exact.
    A negative y that rounds to 0 gives +0 (torch: -0); equal values."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # unbiased exponent of |y|
    e = tl.maximum(e, -6)
    magic = (((e + 20 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e + 20)
    return (y + magic) - magic


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k/v [T, Hkv, D] -> k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T] (-1: skip).
    k_scale / v_scale: the quantization scales of fp8 caches (not used with float caches)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [tokens, kv_heads, head_dim]")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"write_kv_cache: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be "
                         f"[num_blocks, block_size, {k.shape[1]}, {k.shape[2]}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv_cache: slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}]")
    fp8 = check_kv_cache_dtype("write_kv_cache", k.dtype, k_cache, v_cache, k_scale, v_scale)
    T, Hkv, D = k.shape
    if T == 0:
        return
    _write_kv_cache_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), Hkv, float(k_scale), float(v_scale),
        HEAD_DIM=D, KV_HEADS_PAD=triton.next_power_of_2(Hkv), HEAD_DIM_PAD=triton.next_power_of_2(D),
        BLOCK_SIZE=k_cache.shape[1], FP8=fp8, num_warps=4,
    )
