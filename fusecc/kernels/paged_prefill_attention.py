"""New query tokens attending causally to a paged KV context (chunked prefill, prefix-cache hits).

    q:            [total_q, q_heads, head_dim]   packed new tokens, sequence b owns cu_seqlens_q[b]:[b+1]
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    block_tables: [batch, max_blocks] int32;  context_lens: [batch] int32
    out:          [total_q, q_heads, head_dim]

context_lens[b] INCLUDES the new tokens, already written to the cache (write_kv_cache first), so
query j of a sequence with n new tokens sits at absolute position ctx - n + j and sees keys
0..ctx - n + j. This is _varlen_attention_kernel with PAGED=True (the key loop gathers rows through
the block table); this file only holds the host wrapper. The caches may be fp8 (float8_e4m3fn,
holding k / k_scale and v / v_scale), dequantized in registers.
"""

from typing import Optional

import torch

from fusecc.kernels.attention_tile import kv_scales, softmax_scale
from fusecc.kernels.varlen_attention import _alloc_out, check_packed, launch_varlen


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, max_seqlen_q: int, *,
                            scale: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, k_scale: float = 1.0, v_scale: float = 1.0,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of packed new tokens q [Tq, Hq, D] over paged caches -> [Tq, Hq, D].

    max_seqlen_q sizes the grid (>= every sequence's new-token count). sliding_window: query j at
    position p sees keys p - window < key <= p; softcap: logits become softcap * tanh(logits /
    softcap) after scaling. k_scale / v_scale: the dequantization scales of fp8 caches (unused with
    caches in q's dtype). `out` is written in place.
    """
    check_packed("paged_prefill_attention", q, k_cache, v_cache, fp8_kv=True)
    k_scale, v_scale = kv_scales("paged_prefill_attention", q, k_cache, v_cache, k_scale, v_scale)
    if k_cache.dim() != 4:
        raise ValueError(f"paged_prefill_attention: caches must be [num_blocks, block_size, kv_heads, head_dim], "
                         f"got {tuple(k_cache.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"paged_prefill_attention: block_tables {tuple(block_tables.shape)} must be "
                         f"[{batch}, max_blocks] and context_lens {tuple(context_lens.shape)} [{batch}]")
    out = _alloc_out(q, out, "paged_prefill_attention")
    T, Hq, D = q.shape
    if T == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out
    scale = softmax_scale(scale, D)
    table = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    ctx = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    cu_q = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    launch_varlen(q, k_cache, v_cache, out, cu_q, cu_q, table, ctx,
                  k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
                  v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
                  k_cache.stride(0), v_cache.stride(0), table.stride(0),
                  batch, int(max_seqlen_q), scale, causal=True, paged=True, page_size=k_cache.shape[1],
                  sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    return out
