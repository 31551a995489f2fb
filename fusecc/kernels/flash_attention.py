"""Dense (prefill) attention, the pointer kernel: tiled online softmax in SDPA layout.

    q:   [batch, q_heads,  seq_q, head_dim]
    k,v: [batch, kv_heads, seq_k, head_dim]     q_heads % kv_heads == 0 (GQA/MQA, no repeat)
    out: [batch, q_heads,  seq_q, head_dim]     contiguous

    attn_mask (optional): bool [B|1, H|1, seq_q, seq_k] (keep where True) or an additive float bias
                          of that shape, any broadcastable shape (read through strides, stride 0 on
                          broadcast dims: an `expand`ed mask is never materialised)

Causal masking is aligned bottom-right (as FlashAttention): query i sees keys <= i + seq_k - seq_q;
rows that see nothing (seq_q > seq_k, or every key masked off) are 0, as SDPA returns for a fully
masked row (a row whose bias is all -inf; a finite bias such as finfo.min leaves the row uniform).
Any strides are accepted (HF's transposed views run without a copy); a last-dim stride of 1 is
what makes the loads wide.

One program owns BLOCK_M query rows of one (batch, head); the key loop lives in attention_tile.py.
Which kernel runs a call (this one, the TMA or Gluon variants on Hopper, or split-KV decode for
one query row) is decided in attention_routing.py, which also checks the arguments.
"""

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import (LOG2E, attn_rows, first_prefill_config, head_dim_pad, prefill_configs,
                                           prune_prefill_configs)
from fusecc.kernels.launch import launch_tuned


@triton.autotune(configs=prefill_configs(), key=["HEAD_DIM_PAD", "CAUSAL", "MASK_KIND", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_prefill_configs}, cache_results=True)
@triton.jit
def _flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    group, seq_q, seq_k, qk_scale,
    SEQ_BUCKET,  # autotune key only: power-of-two bucket of max(seq_q, seq_k)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool (as uint8), 2 additive float (attention_tile.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        # the last query tiles see the most keys: start them first so the tail of the grid is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // group
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qs + offs_d[None, :] * stride_qd
    io_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptrs, mask=io_mask, other=0.0)

    out = attn_rows(q, k_ptr + b * stride_kb + kvh * stride_kh, v_ptr + b * stride_vb + kvh * stride_vh,
                    stride_ks, stride_kd, stride_vs, stride_vd,
                    k_ptr, 0, 0,  # no block table
                    start_m, seq_q, seq_k, qk_scale,
                    mask_ptr + b * stride_mb + h * stride_mh, stride_mq, stride_mk, 0, 1.0,  # no window, no softcap
                    BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, False, 1, MASK_KIND, False, False)

    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=io_mask)


def launch_pointer_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                           mask: torch.Tensor, mask_kind: int, causal: bool, qk_scale: float) -> None:
    """Checked arguments (attention_routing.flash_attention); `qk_scale` includes log2(e)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), Hq, B)

    d_pad = head_dim_pad(D)
    launch_tuned(_flash_attention_kernel, grid, (
        q, k, v, out, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask.stride(),
        Hq // Hkv, Sq, Sk, qk_scale,
        triton.next_power_of_2(max(Sq, Sk, 1)),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, CAUSAL=bool(causal), MASK_KIND=mask_kind),
        first_prefill_config(d_pad))
