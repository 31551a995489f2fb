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

Sliding-window attention and logit soft-capping are not in the paged kernels yet: layers that ask
for them run torch references over the same paged cache below (correct on every device, slow on
GPU): `windowed_softcap_decode` for decode-only steps, without host syncs or data-dependent shapes,
so it compiles into one graph and replays from a CUDA graph (it gathers every sequence's whole
block-table width: [B, max_blocks * block_size, Hkv, D] per layer call); `windowed_softcap_attention`
for mixed steps, a loop over sequences (`.tolist()`: a graph break under torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.*)
from fusecc.kernels.reference import gather_paged_kv
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
    if (sliding_window or softcap) and md.decode_only:
        out = windowed_softcap_decode(q, k_cache, v_cache, md, scale, sliding_window, softcap)
    elif sliding_window or softcap:
        out = windowed_softcap_attention(q, k_cache, v_cache, md, scale, sliding_window, softcap)
    elif md.decode_only:
        out = torch.ops.fusecc.paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens, scale)
    else:
        out = torch.ops.fusecc.paged_prefill_attention(q, k_cache, v_cache, md.cu_seqlens_q, md.block_tables,
                                                       md.context_lens, md.max_seqlen_q, scale)
    return out[None], None  # [1, T, Hq, D]


def windowed_softcap_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               md: AttentionMetadata, scale: float, sliding_window: int | None,
                               softcap: float | None) -> torch.Tensor:
    """Torch reference for what the paged kernels lack: q [T, Hq, D] (packed by md.cu_seqlens_q)
    attends causally to its sequence's paged context, each query to the last `sliding_window`
    positions up to its own (transformers: key j visible from query i when i - window < j <= i),
    logits soft-capped as softcap * tanh(logits / softcap) after scaling (Gemma 2).
    Computes in fp32 (fp64 for fp64 inputs); rows of padding sequences (context 0) are 0."""
    out = torch.zeros_like(q)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    cu = md.cu_seqlens_q.tolist()
    hq = q.shape[1]
    for b, ctx in enumerate(md.context_lens.tolist()):
        n = cu[b + 1] - cu[b]
        if n == 0 or ctx == 0:
            continue
        kb = gather_paged_kv(k_cache, md.block_tables[b], ctx).to(ct)  # [ctx, Hkv, D]
        vb = gather_paged_kv(v_cache, md.block_tables[b], ctx).to(ct)
        group = hq // kb.shape[1]
        kb, vb = kb.repeat_interleave(group, dim=1), vb.repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        qs = q[cu[b]:cu[b + 1]].to(ct)  # [n, Hq, D]
        logits = torch.einsum("qhd,khd->hqk", qs, kb) * scale  # [Hq, n, ctx]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        visible = kpos <= qpos
        if sliding_window:
            visible = visible & (kpos > qpos - sliding_window)
        logits = logits.masked_fill(~visible, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[cu[b]:cu[b + 1]] = torch.einsum("hqk,khd->qhd", p, vb).to(q.dtype)
    return out


def windowed_softcap_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            md: AttentionMetadata, scale: float, sliding_window: int | None,
                            softcap: float | None) -> torch.Tensor:
    """Decode-only steps (q [B, Hq, D], one token per sequence at position context_len - 1), as
    windowed_softcap_attention but vectorised over sequences; rows with context 0 (CUDA-graph
    padding) are 0."""
    B, hq, D = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kpos = torch.arange(md.block_tables.shape[1] * block_size, device=q.device)  # [K] every slot of the table
    slots = md.block_tables.long()[:, kpos // block_size] * block_size + kpos % block_size  # [B, K]
    keys = k_cache.flatten(0, 1)[slots].to(ct)  # [B, K, Hkv, D]
    values = v_cache.flatten(0, 1)[slots].to(ct)
    qg = q.to(ct).reshape(B, hkv, hq // hkv, D)  # GQA: the q heads of a kv head side by side
    logits = torch.einsum("bhgd,bkhd->bhgk", qg, keys) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    qpos = md.context_lens.long()[:, None] - 1  # [B, 1]
    visible = kpos[None, :] <= qpos  # [B, K]
    if sliding_window:
        visible = visible & (kpos[None, :] > qpos - sliding_window)
    logits = logits.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row that sees no key (context 0) is 0
    return torch.einsum("bhgk,bkhd->bhgd", p, values).reshape(B, hq, D).to(q.dtype)
