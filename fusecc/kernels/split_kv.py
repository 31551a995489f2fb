"""Split-KV (flash-decoding) pieces shared by the decode kernels (paged and dense).

A decode step has one query row per (sequence, head) and reads every cached K/V byte once: it is
bandwidth-bound, and at small batch a program per (sequence, kv head) leaves most SMs idle. So each
(sequence, kv head) is split into `num_splits` key ranges, one program each; every program writes
its normalized partial output and its log-sum-exp (base 2), and `merge_splits` combines them:

    out = sum_s 2^(lse_s - max lse) * o_s / sum_s 2^(lse_s - max lse)

With one split the decode kernel writes the output itself and no merge runs.
"""

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import attn_normalize, attn_span
from fusecc.triton_support import interpreting

# keep a split at least this many keys long: shorter ones cost more in the merge than they save.
# Short splits matter at small batch·context, where a program's serial chain of dependent loads
# (block table -> K -> V), not bandwidth, sets the time (measured: 256-key splits left batch 8 x 1k at 42% of copy)
MIN_KEYS_PER_SPLIT = 128
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128


def decode_configs():
    """Key-tile configs of the decode kernels (the query tile is the GQA group, not a choice); the
    first is the hand-picked one launched when not autotuning."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (64, 4, 1): loads straight to registers, no cp.async ring; short splits gain most from it
    # (H200, 32 MB of K/V at batch 1 x 8k and batch 8 x 1k: 15.1-15.7 us vs 17.1-17.7 with the others)
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4), (64, 4, 1)]]


def choose_num_splits(batch: int, kv_heads: int, max_context: int, sm_count: int) -> int:
    """Enough programs for ~PROGRAMS_PER_SM per SM, each split >= MIN_KEYS_PER_SPLIT keys of the longest context.

    max_context is an upper bound known on the host (no device sync to read the real lengths)."""
    work = batch * kv_heads
    if work >= sm_count:
        return 1
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count, work)
    useful = triton.cdiv(max(max_context, 1), MIN_KEYS_PER_SPLIT)
    return max(1, min(want, useful, MAX_SPLITS))


def split_buffers(batch: int, q_heads: int, num_splits: int, head_dim_pad: int, device: torch.device):
    """(part_o [batch, q_heads, num_splits, head_dim_pad] fp32, part_lse [batch, q_heads, num_splits] fp32)."""
    part_o = torch.empty((batch, q_heads, num_splits, head_dim_pad), dtype=torch.float32, device=device)
    part_lse = torch.empty((batch, q_heads, num_splits), dtype=torch.float32, device=device)
    return part_o, part_lse


@triton.jit
def store_split_partial(part_o_ptr, part_lse_ptr, out, l_i, m_i, b, heads, rows_ok, split, q_heads, num_splits,
                        HEAD_DIM_PAD: tl.constexpr):
    """Write one program's normalized partial output `out [R, HEAD_DIM_PAD]` and its base-2 LSE for the
    q heads `heads [R]` of sequence `b` (rows_ok masks padding rows). A split that saw no key has
    l = 0: its LSE is -inf, so the merge gives it weight 0."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row = (b * q_heads + heads) * num_splits + split
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], out, mask=rows_ok[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(part_lse_ptr + row, lse, mask=rows_ok)


@triton.jit
def visible_key_range(m_base, stride_mh, stride_mk, group, lo, hi, MASK_KIND: tl.constexpr):
    """(first, last + 1, plain): the keys of [lo, hi) that one of the group's `group` heads may
    see, and whether every head sees every key of that range unbiased (True, or a 0 bias).

    Keys outside the range are hidden from every head (False, or a -inf bias), so not loading their
    K/V changes nothing: a static cache's unused tail and left padding are such ranges, and cost a
    scan of the mask (a few bytes a key) instead of a read of K and V (4 * head_dim bytes). A finite
    bias (HF's finfo.min) is not hidden (see attention_tile.py). Nothing visible: an empty range.
    `plain` lets the sweep leave the mask out (H200, batch 32, 4096 keys, hand-picked config: the
    per-tile mask read and select cost a fifth of the bandwidth).

    The scan reads SCAN keys of one head row at a time, and one row only when the mask is broadcast
    over heads (stride 0, HF's [batch, 1, 1, keys]): its loads are a serial chain, so few and wide
    (H200, batch 32, a 4096-key cache with 300 keys used: 40 us with [16, 64] steps, 15-18 us with these)."""
    SCAN: tl.constexpr = 1024
    first = hi
    last = lo
    n_plain = tl.zeros([], tl.int32)
    rows = tl.where(stride_mh == 0, 1, group)
    for r in range(0, rows):
        for start in range(lo, hi, SCAN):
            offs_n = start + tl.arange(0, SCAN)
            ok = offs_n < hi
            ptrs = m_base + r * stride_mh + offs_n.to(tl.int64) * stride_mk
            if MASK_KIND == 1:
                visible = ok & (tl.load(ptrs, mask=ok, other=0) != 0)
                unbiased = visible
            else:
                bias = tl.load(ptrs, mask=ok, other=float("-inf"))
                visible = ok & (bias != float("-inf"))
                unbiased = ok & (bias == 0.0)
            first = tl.minimum(first, tl.min(tl.where(visible, offs_n, hi)))
            last = tl.maximum(last, tl.max(tl.where(visible, offs_n + 1, lo)))
            n_plain += tl.sum(unbiased.to(tl.int32))
    last = tl.maximum(last, first)
    # each row counts at most last - first unbiased keys (they are visible, so inside the range)
    return first, last, n_plain == rows * (last - first)


@triton.jit
def decode_split(q_ptr, stride_qb, stride_qh, stride_qd,
                 k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                 table, stride_kpage, stride_vpage,
                 m_base, stride_mh, stride_mk,
                 o_ptr, stride_ob, stride_oh, stride_od, part_o_ptr, part_lse_ptr,
                 b, kvh, split, n_keys_total, q_heads, group, num_splits, qk_scale, window, softcap_log2, v_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP_PAD: tl.constexpr,
                 PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KIND: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """One program of a split-KV decode kernel: the q heads of KV head `kvh` of sequence `b`, packed
    into one [GROUP_PAD, HEAD_DIM_PAD] tile, over key range `split` of `n_keys_total` keys.

    k_base/v_base point at key 0 of this (sequence, kv head), or for PAGED at page 0 slot 0 of this
    kv head with `table` this sequence's block-table row (see attention_tile.attn_inner). With
    MASK_KIND != 0, m_base is mask[b, first head of the group, 0, 0]: the tile's rows are heads,
    so the mask's row stride is its head stride. Writes the normalized partial output and LSE
    (SPLIT) or the output itself.
    WINDOW: the query (position n_keys_total - 1) sees only the last `window` keys, so the splits
    share those out: no mask, no load outside the window. SOFTCAP: see attention_tile.attn_inner.
    v_scale: an fp8 V cache's scale, applied to the normalized output (the merge is linear in the
    partial outputs, so scaling each is scaling the result); 1.0 otherwise. (k_scale is in qk_scale.)"""
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kvh * group + offs_g  # [GROUP_PAD] q heads of this KV group
    rows_ok = offs_g < group

    # equal splits, each a whole number of BLOCK_N tiles: only the last one has a ragged tail
    first_key = 0
    if WINDOW:
        first_key = tl.maximum(n_keys_total - window, 0)
    split_len = tl.cdiv(tl.cdiv(n_keys_total - first_key, num_splits), BLOCK_N) * BLOCK_N
    lo = first_key + split * split_len
    hi = lo + tl.maximum(tl.minimum(n_keys_total - lo, split_len), 0)
    plain = True
    if MASK_KIND != 0:
        lo, hi, plain = visible_key_range(m_base, stride_mh, stride_mk, group, lo, hi, MASK_KIND)
    full_end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    io_mask = rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0)

    if plain:
        # no mask, or one that neither hides nor biases a key of [lo, hi) for any head (a static
        # cache's mask once its tail is cut off): the unmasked sweep, no mask tile per K tile
        acc, l_i, m_i = attn_span(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  table, stride_kpage, stride_vpage, lo, full_end, hi, hi, offs_g, qk_scale,
                                  m_base, stride_mh, stride_mk, offs_g, group, window, softcap_log2,
                                  GROUP_PAD, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, PAGED, PAGE_SIZE, 0,
                                  False, SOFTCAP)
    else:
        acc, l_i, m_i = attn_span(q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                  table, stride_kpage, stride_vpage, lo, full_end, hi, hi, offs_g, qk_scale,
                                  m_base, stride_mh, stride_mk, offs_g, group, window, softcap_log2,
                                  GROUP_PAD, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, PAGED, PAGE_SIZE, MASK_KIND,
                                  False, SOFTCAP)
    out = attn_normalize(acc, l_i) * v_scale
    if SPLIT:
        store_split_partial(part_o_ptr, part_lse_ptr, out, l_i, m_i, b, heads, rows_ok, split,
                            q_heads, num_splits, HEAD_DIM_PAD)
    else:
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh, stride_od, q_heads, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < num_splits
    row = (b * q_heads + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    # all splits empty (context 0, or every key masked): weights 0, output 0
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    denom = tl.sum(w, 0)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def merge_splits(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor,
                 stride_ob: int, stride_oh: int, stride_od: int, head_dim: int) -> None:
    """out[b, h, :head_dim] (addressed through the given strides) <- the LSE-weighted merge of the splits."""
    batch, q_heads, splits, d_pad = part_o.shape
    _merge_splits_kernel[(q_heads, batch)](
        part_o, part_lse, out, stride_ob, stride_oh, stride_od, q_heads, splits,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4,
    )
