"""Decode attention over a paged KV cache: split-KV (flash-decoding) with an LSE merge.

    q:            [batch, q_heads, head_dim]          one new token per sequence
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    block_tables: [batch, max_blocks] int32           page ids of each sequence, in order
    context_lens: [batch] int32                       cached tokens per sequence (the new one included)
    out:          [batch, q_heads, head_dim]

Decode reads every cached K/V byte once and does little math on it: it is bandwidth-bound, and at
batch 1 a program per (sequence, kv head) would leave most SMs idle. So each (sequence, kv head)
is split into NUM_SPLITS key ranges, one program each, chosen from batch·kv_heads vs the SM count.
Each program packs the q heads of its KV group into one tile ([GROUP_PAD >= 16, head_dim]) so the
GQA heads share every K/V load and the scores go through tl.dot (tensor cores), writes its
normalized partial output and its log-sum-exp (base 2); split_kv.py merges the splits.
With one split the first kernel writes the output directly and the merge is skipped.

fp8 caches (float8_e4m3fn, holding k / k_scale and v / v_scale): half the bytes to read; tiles are
converted to q's dtype in registers, k_scale goes into the logit scale and v_scale onto the output.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import (LOG2E, check_head_dim, head_dim_pad, kv_scales, softmax_scale,
                                           tuning_class, window_and_softcap)
from fusecc.kernels.launch import launch_tuned, num_sms
from fusecc.kernels.split_kv import choose_num_splits, decode_configs, decode_split, merge_splits, split_buffers


@triton.autotune(configs=decode_configs(),
                 key=["HEAD_DIM_PAD", "GROUP_PAD", "PAGE_SIZE", "SPLIT", "WORK_BUCKET", "CTX_BUCKET"],
                 cache_results=True)
@triton.jit(do_not_specialize=["stride_table"])  # per-step sizes: kernels/launch.py
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, table_ptr, ctx_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kpage, stride_kslot, stride_kh, stride_kd,
    stride_vpage, stride_vslot, stride_vh, stride_vd,
    stride_table, stride_ob, stride_oh, stride_od,
    q_heads, group, num_splits, qk_scale, window, softcap_log2, v_scale,
    WORK_BUCKET, CTX_BUCKET,  # autotune keys only: tuning_class of batch * kv_heads and of the table's keys
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    split = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    k_base = k_ptr + kvh * stride_kh
    # splits of this sequence's own context (the block table's capacity only sized the grid)
    decode_split(q_ptr, stride_qb, stride_qh, stride_qd,
                 k_base, v_ptr + kvh * stride_vh, stride_kslot, stride_kd, stride_vslot, stride_vd,
                 table_ptr + b * stride_table, stride_kpage, stride_vpage,
                 k_base, 0, 0,  # no attention mask
                 o_ptr, stride_ob, stride_oh, stride_od, part_o_ptr, part_lse_ptr,
                 b, kvh, split, tl.load(ctx_ptr + b), q_heads, group, num_splits, qk_scale, window, softcap_log2,
                 v_scale, HEAD_DIM, HEAD_DIM_PAD, GROUP_PAD, True, PAGE_SIZE, 0, SPLIT, BLOCK_N, WINDOW, SOFTCAP)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, *,
                    scale: Optional[float] = None, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, k_scale: float = 1.0, v_scale: float = 1.0,
                    num_splits: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention: q [B, Hq, D] over paged caches [num_blocks, block_size, Hkv, D] -> [B, Hq, D].

    sliding_window: the query sees only its sequence's last `sliding_window` keys (itself included);
    softcap: logits become softcap * tanh(logits / softcap) after scaling (Gemma 2).
    k_scale / v_scale: the dequantization scales of fp8 (float8_e4m3fn) caches; unused with caches in q's dtype.
    num_splits overrides the split-KV heuristic (tests); `out` is written in place and returned.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: q must be [batch, heads, head_dim] and both caches "
                         f"[num_blocks, block_size, kv_heads, head_dim]; got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    B, Hq, D = q.shape
    _, page_size, Hkv, Dk = k_cache.shape
    if Dk != D or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} needs head_dim {D} and a kv-head count dividing "
                         f"{Hq}; caches are {tuple(k_cache.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"paged_attention: block_tables {tuple(block_tables.shape)} must be [{B}, max_blocks] "
                         f"and context_lens {tuple(context_lens.shape)} [{B}]")
    k_scale, v_scale = kv_scales("paged_attention", q, k_cache, v_cache, k_scale, v_scale)
    check_head_dim(D)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"paged_attention: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if B == 0:
        return out
    scale = softmax_scale(scale, D)
    window, softcap_log2 = window_and_softcap(sliding_window, softcap)
    table = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    ctx = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    group = Hq // Hkv
    capacity = block_tables.shape[1] * page_size
    if window:
        capacity = min(capacity, window)  # the keys one query reads at most
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, capacity, num_sms(q.device))
    d_pad = head_dim_pad(D)
    split = num_splits > 1
    if split:
        part_o, part_lse = split_buffers(B, Hq, num_splits, d_pad, q.device)
    else:
        part_o = part_lse = out  # unused
    launch_tuned(_paged_decode_kernel, (num_splits, Hkv, B), (
        q, k_cache, v_cache, out, part_o, part_lse, table, ctx,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), table.stride(0), *out.stride(),
        Hq, group, num_splits, scale * k_scale * LOG2E, window, softcap_log2, v_scale,
        tuning_class(B * Hkv), tuning_class(capacity),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, GROUP_PAD=max(16, triton.next_power_of_2(group)),
            PAGE_SIZE=page_size, SPLIT=split, WINDOW=bool(window), SOFTCAP=softcap_log2 != 0.0),
        decode_configs()[0])
    if split:
        merge_splits(part_o, part_lse, out, *out.stride(), D)
    return out
