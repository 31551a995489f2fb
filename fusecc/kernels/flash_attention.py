"""Dense (prefill) attention: tiled online softmax in SDPA layout.

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
On Hopper, unmasked fp16/bf16 calls with head_dim 64/128 and aligned strides run the same loop with
TMA descriptor loads (flash_attention_tma.py), or, at head_dim 128 on sm_90, a warp-specialized
Gluon kernel with FA3's ping-pong schedule (flash_attention_gluon.py). A single query row (seq_q == 1, a static-cache
decode step) goes to dense_decode_attention.py instead.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import (LOG2E, attn_rows, check_head_dim, first_prefill_config, head_dim_pad,
                                           launch_tuned, prefill_configs, prune_prefill_configs, softmax_scale)
from fusecc.kernels.dense_decode_attention import dense_decode_attention
from fusecc.kernels.flash_attention_gluon import gluon_prefill_eligible, launch_gluon_prefill
from fusecc.kernels.flash_attention_tma import launch_tma_prefill, tma_prefill_eligible


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
                    mask_ptr + b * stride_mb + h * stride_mh, stride_mq, stride_mk,
                    BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, False, 1, MASK_KIND)

    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=io_mask)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q kᵀ · scale [+ causal mask] [+ attn_mask]) v for q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]
    -> [B, Hq, Sq, D].

    `scale` defaults to 1/sqrt(D). `attn_mask` broadcasts to [B, Hq, Sq, Sk]: bool keeps where True,
    a float mask is added to the scaled logits. `out` (optional, [B, Hq, Sq, D]) is written in place
    and returned.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention expects 4-d [batch, heads, seq, head_dim] tensors, got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if k.shape != v.shape or Bk != B or Dk != D:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[{B}, kv_heads, seq_k, {D}] to match q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"flash_attention: q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"flash_attention: q/k/v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(D)
    if out is None:
        out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, Sq, D) or out.dtype != q.dtype:
        raise ValueError(f"flash_attention: out must be {(B, Hq, Sq, D)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    mask, mask_kind = _mask_view(attn_mask, (B, Hq, Sq, Sk), q)
    if out.numel() == 0:
        return out
    scale = softmax_scale(scale, D)
    if Sq == 1:
        # a decode step (static KV cache): split-KV over the keys instead of one mostly empty
        # query tile per head; causal is moot (the one query sees every key)
        return dense_decode_attention(q, k, v, out, scale * LOG2E, mask, mask_kind)

    if gluon_prefill_eligible(q, k, v, out, mask_kind):
        launch_gluon_prefill(q, k, v, out, causal, scale * LOG2E)
        return out
    if tma_prefill_eligible(q, k, v, out, mask_kind):
        launch_tma_prefill(q, k, v, out, causal, scale * LOG2E)
        return out

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), Hq, B)

    d_pad = head_dim_pad(D)
    launch_tuned(_flash_attention_kernel, grid, (
        q, k, v, out, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask.stride(),
        Hq // Hkv, Sq, Sk, scale * LOG2E,
        triton.next_power_of_2(max(Sq, Sk, 1)),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, CAUSAL=bool(causal), MASK_KIND=mask_kind),
        first_prefill_config(d_pad))
    return out


def _mask_view(attn_mask: Optional[torch.Tensor], shape: tuple, q: torch.Tensor):
    """(tensor the kernel reads, MASK_KIND). The mask becomes a [B, Hq, Sq, Sk] *view* (expand:
    stride 0 on broadcast dims, nothing copied); bool is reinterpreted as uint8 (same bytes)."""
    if attn_mask is None:
        return q.new_empty((1, 1, 1, 1)), 0
    if attn_mask.device != q.device:
        raise ValueError(f"flash_attention: attn_mask is on {attn_mask.device}, q on {q.device}")
    if attn_mask.dtype == torch.bool:
        kind = 1
    elif attn_mask.dtype in (torch.float16, torch.bfloat16, torch.float32):
        kind = 2
    else:
        raise ValueError(f"flash_attention: attn_mask must be bool or fp16/bf16/fp32, got {attn_mask.dtype}")
    try:
        mask = attn_mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"flash_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                         f"[batch, q_heads, seq_q, seq_k] = {list(shape)}") from None
    return (mask.view(torch.uint8) if kind == 1 else mask), kind
