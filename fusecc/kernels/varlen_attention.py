"""Variable-length (packed) prefill attention: many sequences of different lengths in one launch.

    q:   [total_q, q_heads,  head_dim]   sequence b owns rows cu_seqlens_q[b] : cu_seqlens_q[b+1]
    k,v: [total_k, kv_heads, head_dim]   sequence b owns rows cu_seqlens_k[b] : cu_seqlens_k[b+1]
    out: [total_q, q_heads,  head_dim]

Causal masking is aligned bottom-right per sequence (query i sees keys <= i + len_k - len_q).
The same kernel, with PAGED=True, reads K/V through a block table instead (paged_prefill_attention.py):
then sequence b's keys are its first context_lens[b] cache slots, and the cache may be fp8
(float8_e4m3fn: tiles converted to q's dtype in registers, k_scale in the logit scale, v_scale on
the output).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.attention_tile import (LOG2E, attn_rows, check_head_dim, first_prefill_config, head_dim_pad,
                                           prefill_configs, prune_prefill_configs, softmax_scale, tuning_class,
                                           window_and_softcap)
from fusecc.kernels.launch import launch_tuned


@triton.autotune(configs=prefill_configs(), key=["HEAD_DIM_PAD", "CAUSAL", "PAGED", "SEQ_BUCKET"],
                 prune_configs_by={"early_config_prune": prune_prefill_configs}, cache_results=True)
@triton.jit(do_not_specialize=["stride_table"])  # per-step sizes: kernels/launch.py
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_q_ptr, cu_k_ptr,          # [batch + 1] int32; cu_k unused when PAGED
    table_ptr, ctx_ptr,          # PAGED only: block_tables [batch, max_blocks] int32, context_lens [batch]
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,   # PAGED: stride_kt is the slot stride inside a page
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_kpage, stride_vpage, stride_table,
    group, qk_scale, window, softcap_log2, v_scale,
    SEQ_BUCKET,  # autotune key only: tuning_class(max_seqlen_q)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    kvh = h // group
    q_start = tl.load(cu_q_ptr + b).to(tl.int64)
    seq_q = (tl.load(cu_q_ptr + b + 1) - q_start).to(tl.int32)
    if PAGED:
        seq_k = tl.load(ctx_ptr + b).to(tl.int32)
        k_base = k_ptr + kvh * stride_kh
        v_base = v_ptr + kvh * stride_vh
        table = table_ptr + b.to(tl.int64) * stride_table
    else:
        k_start = tl.load(cu_k_ptr + b).to(tl.int64)
        seq_k = (tl.load(cu_k_ptr + b + 1) - k_start).to(tl.int32)
        k_base = k_ptr + k_start * stride_kt + kvh * stride_kh
        v_base = v_ptr + k_start * stride_vt + kvh * stride_vh
        table = table_ptr
    # the grid is sized for the longest sequence: tiles past this one's end compute nothing
    # (attn_bounds gives an empty range) and store nothing
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = (q_start + offs_m.to(tl.int64))[:, None]
    io_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows * stride_qt + h * stride_qh + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    out = attn_rows(q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    table, stride_kpage, stride_vpage,
                    start_m, seq_q, seq_k, qk_scale,
                    k_ptr, 0, 0,  # no attention mask
                    window, softcap_log2,
                    BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, CAUSAL, PAGED, PAGE_SIZE, 0, WINDOW, SOFTCAP)
    out = out * v_scale  # an fp8 V cache's scale (1.0 otherwise); k_scale is in qk_scale

    tl.store(o_ptr + rows * stride_ot + h * stride_oh + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=io_mask)


def check_packed(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8_kv: bool = False) -> None:
    """q [tokens, Hq, D], k/v [..., Hkv, D] with Hq % Hkv == 0 and matching dtypes (fp8_kv: k/v may
    also both be float8_e4m3fn, a paged fp8 cache)."""
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be [tokens, heads, head_dim], got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and "
                         f"q's head_dim {q.shape[-1]}")
    hq, hkv = q.shape[1], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"{name}: q heads ({hq}) must be a multiple of kv heads ({hkv})")
    kv_dtypes = (q.dtype, torch.float8_e4m3fn) if fp8_kv else (q.dtype,)
    if (k.dtype != v.dtype or k.dtype not in kv_dtypes
            or q.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(f"{name}: q/k/v must share one of fp16/bf16/fp32{' (or fp8 k/v)' if fp8_kv else ''}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(q.shape[-1])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     scale: Optional[float] = None, sliding_window: Optional[int] = None,
                     softcap: Optional[float] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Packed attention: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_* [batch + 1] int32 -> [Tq, Hq, D].

    max_seqlen_q sizes the grid (it must be >= every query length); max_seqlen_k is accepted for
    API compatibility with FlashAttention's varlen call. sliding_window (causal only): query i sees
    keys j with i - window < j <= i (bottom-right aligned positions); softcap: logits become
    softcap * tanh(logits / softcap) after scaling. `out` (optional) is written in place.
    """
    check_packed("varlen_attention", q, k, v)
    if k.dim() != 3:
        raise ValueError(f"varlen_attention: k/v must be [tokens, kv_heads, head_dim], got {tuple(k.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError(f"varlen_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must both be [batch + 1]")
    T, Hq, D = q.shape
    out = _alloc_out(q, out, "varlen_attention")
    batch = cu_seqlens_q.shape[0] - 1
    if T == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out
    scale = softmax_scale(scale, D)
    if sliding_window and not causal:
        raise ValueError("varlen_attention: sliding_window needs causal=True")
    cu_q = cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k.to(torch.int32)
    launch_varlen(q, k, v, out, cu_q, cu_k, cu_q, cu_q, k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), 0, 0, 0, batch, int(max_seqlen_q), scale,
                  causal=bool(causal), paged=False, page_size=1, sliding_window=sliding_window, softcap=softcap)
    return out


def _alloc_out(q: torch.Tensor, out: Optional[torch.Tensor], name: str) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"{name}: out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    return out


def launch_varlen(q, k, v, out, cu_q, cu_k, table, ctx,
                  stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                  stride_kpage, stride_vpage, stride_table, batch, max_seqlen_q, scale, *,
                  causal, paged, page_size, sliding_window=None, softcap=None, k_scale=1.0, v_scale=1.0):
    """Launch _varlen_attention_kernel (shared by the dense-packed and the paged wrappers)."""
    Hq, D = q.shape[1], q.shape[2]
    window, softcap_log2 = window_and_softcap(sliding_window, softcap)
    Hkv = k.shape[-2]

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), Hq, batch)

    d_pad = head_dim_pad(D)
    launch_tuned(_varlen_attention_kernel, grid, (
        q, k, v, out, cu_q, cu_k, table, ctx,
        *q.stride(), stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, *out.stride(),
        stride_kpage, stride_vpage, stride_table,
        Hq // Hkv, scale * k_scale * LOG2E, window, softcap_log2, v_scale, tuning_class(max_seqlen_q),
    ), dict(HEAD_DIM=D, HEAD_DIM_PAD=d_pad, CAUSAL=causal, PAGED=paged, PAGE_SIZE=page_size,
            WINDOW=bool(window), SOFTCAP=softcap_log2 != 0.0), first_prefill_config(d_pad))
