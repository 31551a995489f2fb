"""fusecc's paged attention as a transformers attention function ("fusecc_paged").

transformers' modeling code computes q/k/v (projections, q/k norms, rotary, partial rotary) and
calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, scaling=...,
sliding_window=..., softcap=..., **kwargs)`. Registered under that interface, this function gets
the step's flat token batch as one row (batch 1):

    query [1, Hq, T, D], key/value [1, Hkv, T, D]   T = every scheduled token of every sequence
    returns ([1, T, Hq, D], None)                     as transformers' sdpa/flash functions do

It writes the layer's K/V into the paged cache and attends per sequence with fusecc's kernels
(`fusecc::paged_attention` for decode-only steps, `fusecc::paged_prefill_attention` otherwise).
The mask transformers builds is not used: "fusecc_paged" has no mask function registered, so
transformers passes None, and causality comes from AttentionMetadata.

The step's caches and metadata reach this function through `module.fusecc_step`, a StepContext the
wrapper (transformers_backend.py) owns and fills for the duration of one forward. Not kwargs:
some decoder layers (StableLM's, in transformers 5.17) do not forward **kwargs to their attention
module, so kwargs cannot carry them for every family (vLLM uses a forward context for the same reason).

An fp8 KV cache (kv_cache_dtype "fp8") is quantized by the same write and dequantized by the same
kernels, with scales 1.0 (the ops' defaults): this path loads no checkpoint k_scale / v_scale.

Sliding-window attention (Mistral, Gemma 2/3 local layers) and logit soft-capping (Gemma 2) are
arguments of the same kernels: a layer's `sliding_window` and `softcap` pass straight through.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.*)
from fusecc.runtime.models.attention import AttentionMetadata

ATTN_IMPLEMENTATION = "fusecc_paged"


@dataclass
class StepContext:
    """What the attention function needs for one forward; set by the wrapper, read per layer.

    probe: when not None, the forward is a shape probe: each layer records
    layer_idx -> (kv_heads, head_dim) there and attends nowhere (no cache exists yet)."""
    kv_caches: list | None = None  # per layer (k_cache, v_cache), [num_blocks, block_size, Hkv, D]
    md: AttentionMetadata | None = None
    probe: dict | None = field(default=None)


def fusecc_paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    step: StepContext = module.fusecc_step
    layer = module.layer_idx
    if step.probe is not None:
        step.probe[layer] = (key.shape[1], key.shape[-1], value.shape[-1])
        return torch.zeros_like(query).transpose(1, 2), None
    assert query.shape[0] == 1, f"fusecc_paged attention runs a flat batch (batch 1), got {query.shape[0]}"
    md = step.md
    # [1, H, T, D] -> [T, H, D]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    k_cache, v_cache = step.kv_caches[layer]
    torch.ops.fusecc.write_kv_cache(k.contiguous(), v.contiguous(), k_cache, v_cache, md.slot_mapping)
    scale = q.shape[-1] ** -0.5 if scaling is None else float(scaling)
    q = q.contiguous()
    options = dict(sliding_window=sliding_window or None, softcap=softcap or None)
    if md.decode_only:
        out = torch.ops.fusecc.paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens, scale, **options)
    else:
        out = torch.ops.fusecc.paged_prefill_attention(q, k_cache, v_cache, md.cu_seqlens_q, md.block_tables,
                                                       md.context_lens, md.max_seqlen_q, scale, **options)
    return out[None], None  # [1, T, Hq, D]
