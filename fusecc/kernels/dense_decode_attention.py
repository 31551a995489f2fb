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
is read per (head row, key), so a split whose keys are all masked contributes nothing; first, each
program narrows its key range to the keys some row can see (split_kv.visible_key_range), so the
unused tail of a static cache (whatever its max_cache_len) costs a scan of its mask, not a read of
its K/V. That takes a bool or -inf mask (SDPA-path models): a finite finfo.min bias (HF's eager
path) hides nothing exactly, so nothing is skipped there.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import head_dim_pad
from fusecc.kernels.launch import launch_tuned, num_sms
from fusecc.kernels.split_kv import choose_num_splits, decode_configs, decode_split, merge_splits, split_buffers


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
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    decode_split(q_ptr, stride_qb, stride_qh, stride_qd,
                 k_base, v_ptr + b * stride_vb + kvh * stride_vh, stride_ks, stride_kd, stride_vs, stride_vd,
                 k_base, 0, 0,  # no block table
                 mask_ptr + b * stride_mb + (kvh * group) * stride_mh, stride_mh, stride_mk,
                 o_ptr, stride_ob, stride_oh, stride_od, part_o_ptr, part_lse_ptr,
                 b, kvh, split, seq_k, q_heads, group, num_splits, qk_scale, 0, 1.0, 1.0,  # no window/cap, v_scale 1
                 HEAD_DIM, HEAD_DIM_PAD, GROUP_PAD, False, 1, MASK_KIND, SPLIT, BLOCK_N, False, False)


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
