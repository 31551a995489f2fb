"""Per-step attention metadata and the paged attention layer the models share.

One forward runs a FLAT batch of new tokens from several sequences (decodes first, then prefill
chunks), all against the paged KV cache:

    tokens:        d0 d1 d2 | p0 p0 p0 p0 | p1 p1          (3 decodes, 2 prefill chunks)
    cu_seqlens_q:  [0, 1, 2, 3, 7, 9]
    context_lens:  [ctx_d0, ctx_d1, ctx_d2, ctx_p0, ctx_p1]  cached + new tokens, per sequence
    block_tables:  [5, max_blocks] int32 (rows padded with 0; context_lens bounds the reads)
    slot_mapping:  [9] int64 cache slot of each new token (-1: padding, not written)

Each layer writes the new K/V into its cache first, then attends: a decode-only step (every
sequence has exactly one new token) uses the split-KV decode kernel `fusecc::paged_attention`;
any other step uses `fusecc::paged_prefill_attention`, in which a decode is a 1-token query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.*)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    max_seqlen_q: int
    # True: one new token per sequence (num_tokens == num_seqs), the decode kernel runs.
    decode_only: bool
    num_decodes: int = 0  # leading sequences that are decodes (informational for mixed steps)


class PagedAttention(torch.nn.Module):
    """Writes k/v of the new tokens into this layer's cache, then attends over the cached context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                md: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]
        k_cache, v_cache = kv_cache
        torch.ops.fusecc.write_kv_cache(k, v, k_cache, v_cache, md.slot_mapping)
        if md.decode_only:
            return torch.ops.fusecc.paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens, self.scale)
        return torch.ops.fusecc.paged_prefill_attention(q, k_cache, v_cache, md.cu_seqlens_q, md.block_tables,
                                                        md.context_lens, md.max_seqlen_q, self.scale)
