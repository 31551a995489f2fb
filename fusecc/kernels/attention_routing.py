"""Dense attention in SDPA layout: the entry point that checks a call and picks its kernel.

    q:   [batch, q_heads,  seq_q, head_dim]
    k,v: [batch, kv_heads, seq_k, head_dim]     q_heads % kv_heads == 0 (GQA/MQA, no repeat)
    out: [batch, q_heads,  seq_q, head_dim]

    attn_mask (optional): bool [B|1, H|1, seq_q, seq_k] (keep where True) or an additive float bias
                          of that shape, any broadcastable shape (read through strides, stride 0 on
                          broadcast dims: an `expand`ed mask is never materialised)

Causal masking is aligned bottom-right (as FlashAttention); rows that see nothing are 0.
The kernels, in the order they are tried:
- one query row (seq_q == 1, a static-cache decode step): split-KV decode (dense_decode_attention.py);
- sm_90, unmasked fp16/bf16, head_dim 128, TMA-friendly strides: the warp-specialized Gluon kernel
  with FA3's ping-pong schedule (flash_attention_gluon.py);
- Hopper, unmasked fp16/bf16, head_dim 64/128, aligned strides: TMA descriptor loads
  (flash_attention_tma.py);
- everything else: the pointer kernel (flash_attention.py).
"""

from typing import Optional

import torch

from fusecc.kernels.attention_tile import LOG2E, check_head_dim, softmax_scale
from fusecc.kernels.dense_decode_attention import dense_decode_attention
from fusecc.kernels.flash_attention import launch_pointer_prefill
from fusecc.kernels.flash_attention_gluon import gluon_prefill_eligible, launch_gluon_prefill
from fusecc.kernels.flash_attention_tma import launch_tma_prefill, tma_prefill_eligible


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
    elif tma_prefill_eligible(q, k, v, out, mask_kind):
        launch_tma_prefill(q, k, v, out, causal, scale * LOG2E)
    else:
        launch_pointer_prefill(q, k, v, out, mask, mask_kind, causal, scale * LOG2E)
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
