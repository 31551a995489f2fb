"""Decode attention over a dense (static) KV cache: one query row per (batch, head), split-KV.

    q:    [batch, q_heads,  1,     head_dim]     (SDPA layout, any strides)
    k, v: [batch, kv_heads, seq_k, head_dim]     e.g. transformers' StaticCache tensors, any strides
    mask: optional view [batch, q_heads, 1, seq_k] (flash_attention.py's `_mask_view`: bool as
          uint8, or an additive float bias; stride 0 on broadcast dims)
    out:  [batch, q_heads, 1, head_dim]

This is what `flash_attention` runs when seq_q == 1: a static-cache decode step. The prefill kernel
would spend a whole 64–128-row query tile on one row and start only batch·q_heads programs (32 at
batch 1: a quarter of an H100's SMs), each sweeping the full cache alone. Here, as in the paged
decode kernel, one program owns the q heads of a KV group (packed into a >= 16-row tile, so the
scores still go through tl.dot and every K/V load serves the whole group) over one key range, and
split_kv.py merges the ranges. Causal masking is moot with one query: aligned bottom-right, it
sees every key. The explicit mask (HF's padding/causal mask over the static cache's unused tail)
is read per (head row, key), so a split whose keys are all masked contributes nothing.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import attn_inner, head_dim_pad, launch_tuned
from fusecc.kernels.split_kv import (choose_num_splits, decode_configs, merge_splits, num_sms, split_buffers,
                                     store_split_partial)


@triton.autotune(configs=decode_configs(),
                 key=["HEAD_DIM_PAD", "GROUP_PAD", "SPLIT", "MASK_KIND", "WORK_BUCKET", "CTX_BUCKET"],
                 cache_results=True)
@triton.jit
def _dense_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_od,
    stride_mb, stride_mh, stride_mk,
    q_heads, group, seq_k, num_splits, qk_scale,
    WORK_BUCKET, CTX_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    # equal splits, each a whole number of BLOCK_N tiles: only the last one has a ragged tail
    split_len = tl.cdiv(tl.cdiv(seq_k, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    n_keys = tl.maximum(tl.minimum(seq_k - lo, split_len), 0)
    hi = lo + n_keys
    full_end = lo + (n_keys // BLOCK_N) * BLOCK_N

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kvh * group + offs_g  # [GROUP_PAD] q heads of this KV group
    rows_ok = offs_g < group
    io_mask = rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    # The tile's rows are heads, so the mask's "row" stride is its head stride and the rows that
    # exist are the `group` heads: attn_inner reads mask[b, heads[r], 0, n].
    m_base = mask_ptr + b * stride_mb + (kvh * group) * stride_mh
    acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               k_base, 0, 0, lo, full_end, hi, offs_g, qk_scale,
                               m_base, stride_mh, stride_mk, offs_g, group,
                               BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, False, False, 1, MASK_KIND)
    acc, l_i, m_i = attn_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               k_base, 0, 0, full_end, hi, hi, offs_g, qk_scale,
                               m_base, stride_mh, stride_mk, offs_g, group,
                               BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, True, False, 1, MASK_KIND)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SPLIT:
        store_split_partial(part_o_ptr, part_lse_ptr, out, l_i, m_i, b, heads, rows_ok, split,
                            q_heads, num_splits, HEAD_DIM_PAD)
    else:
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=io_mask)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           qk_scale: float, mask: torch.Tensor, mask_kind: int,
                           num_splits: Optional[int] = None) -> torch.Tensor:
    """Kernel launch for flash_attention's seq_q == 1 case; the caller has validated shapes and
    dtypes, turned `scale` into the base-2 `qk_scale` and the mask into `(mask view, kind)`.
    num_splits overrides the split heuristic (tests)."""
    B, Hq, _, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, Sk, num_sms(q.device))
    d_pad = head_dim_pad(D)
    split = num_splits > 1
    part_o, part_lse = split_buffers(B, Hq, num_splits, d_pad, q.device) if split else (out, out)
    group = Hq // Hkv
    launch_tuned(_dense_decode_kernel, (num_splits, Hkv, B), (
        q, k, v, out, mask, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        mask.stride(0), mask.stride(1), mask.stride(3),
        Hq, group, Sk, num_splits, qk_scale,
        triton.next_power_of_2(B * Hkv), triton.next_power_of_2(max(Sk, 1)),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            MASK_KIND=mask_kind, SPLIT=split), decode_configs()[0])
    if split:
        merge_splits(part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(3), D)
    return out
