"""Write new tokens' K/V into their paged-cache slots (in place).

    k, v:         [tokens, kv_heads, head_dim]
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: [tokens] int64, slot = block * block_size + offset; -1 skips the token (padding)

One program per token copies all its kv heads: a [KV_HEADS_PAD, HEAD_DIM_PAD] tile for k and one for v.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    kv_heads,
    HEAD_DIM: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
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
    tl.store(k_cache_ptr + page * stride_kcb + offset * stride_kcs + offs_h * stride_kch + offs_d * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + offset * stride_vcs + offs_h * stride_vch + offs_d * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k/v [T, Hkv, D] -> k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T] (-1: skip)."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)} and v {tuple(v.shape)} must both be [tokens, kv_heads, head_dim]")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"write_kv_cache: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} must be "
                         f"[num_blocks, block_size, {k.shape[1]}, {k.shape[2]}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"write_kv_cache: slot_mapping {tuple(slot_mapping.shape)} must be [{k.shape[0]}]")
    T, Hkv, D = k.shape
    if T == 0:
        return
    _write_kv_cache_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), Hkv,
        HEAD_DIM=D, KV_HEADS_PAD=triton.next_power_of_2(Hkv), HEAD_DIM_PAD=triton.next_power_of_2(D),
        BLOCK_SIZE=k_cache.shape[1], num_warps=4,
    )
