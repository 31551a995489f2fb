"""Pure-torch references for the fusecc attention kernels.

Used by the custom ops' CPU path (fusecc/ops.py) and by the tests (called on float64 copies).
They compute in the input dtype's float32-or-wider upcast and return the input dtype, follow the
kernels' conventions exactly (bottom-right causal alignment, rows that see no key are 0), and are
written for clarity first but without Python loops over tokens, so the runtime's CPU tests stay fast.
"""

from typing import Optional

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
                        sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """q [..., Hq, Sq, D], k/v [..., Hkv, Sk, D] (Hq % Hkv == 0) -> [..., Hq, Sq, D].

    attn_mask broadcasts to [..., Hq, Sq, Sk]: bool keeps where True, float is added to the logits.
    sliding_window (with causal): query i (at position i + Sk - Sq) also hides keys at or before
    its position - window, as transformers' sliding-window mask; softcap: logits become
    softcap * tanh(logits / softcap) after scaling, before any mask (Gemma 2)."""
    Hq, Sq, D = q.shape[-3:]
    Hkv, Sk = k.shape[-3], k.shape[-2]
    scale = (D ** -0.5 if D > 0 else 1.0) if scale is None else scale  # D = 0: an empty result, any scale
    ct = _compute_dtype(q.dtype)
    group = Hq // Hkv
    # GQA: view q as [..., Hkv, group, Sq, D] so k/v broadcast instead of being repeated
    qg = q.to(ct).reshape(*q.shape[:-3], Hkv, group, Sq, D)
    kf, vf = k.to(ct).unsqueeze(-3), v.to(ct).unsqueeze(-3)
    logits = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # [..., Hkv, group, Sq, Sk]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    hidden = torch.zeros((Sq, Sk), dtype=torch.bool, device=q.device)  # keys a row may not see
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        hidden = hidden | (j > i + (Sk - Sq))
        if sliding_window:
            hidden = hidden | (j <= i + (Sk - Sq) - sliding_window)
        logits = logits.masked_fill(hidden, float("-inf"))
    if attn_mask is not None:
        # [..., Hq, Sq, Sk] -> [..., Hkv, group, Sq, Sk] like the logits
        mask = attn_mask.expand(*q.shape[:-3], Hq, Sq, Sk).reshape(*q.shape[:-3], Hkv, group, Sq, Sk)
        if mask.dtype == torch.bool:
            hidden = hidden | ~mask
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            hidden = hidden | (mask == float("-inf"))
            logits = logits + mask.to(ct)
    # Rows the causal structure or the mask hide completely are 0 (SDPA's convention); a NaN that
    # comes from q, k or v themselves stays NaN, as in eager
    empty = hidden.all(-1, keepdim=True)
    p = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(p, vf).reshape(*q.shape[:-1], v.shape[-1])
    return out.to(q.dtype)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = True,
                               scale: Optional[float] = None, sliding_window: Optional[int] = None,
                               softcap: Optional[float] = None) -> torch.Tensor:
    """Packed q [Tq, Hq, D], k/v [Tk, Hkv, D]; sequence b is rows cu[b]:cu[b+1] -> [Tq, Hq, D]."""
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        if cq[b + 1] == cq[b]:
            continue
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)  # [Hq, Sq, D]
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1)
        out[cq[b]:cq[b + 1]] = attention_reference(qs, ks, vs, causal=causal, scale=scale,
                                                   sliding_window=sliding_window, softcap=softcap).transpose(0, 1)
    return out


def gather_paged_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """cache [num_blocks, block_size, kv_heads, D], one sequence's table row -> its first `length`
    tokens as [length, kv_heads, D]."""
    block_size = cache.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:n_blocks].long()]  # [n_blocks, block_size, kv_heads, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


# ---- the paged KV cache, float or fp8 ----
# An fp8 cache (float8_e4m3fn) holds x / scale, saturated to +-448 (e4m3 has no infinity), with one
# scale per layer for K and one for V (vLLM's k_scale / v_scale); it is read back as fp8 * scale.
# A float cache holds x itself, and the scales are not used.

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x [..., D] as a cache of `cache_dtype` stores it (in fp32: x / scale, clamped, cast)."""
    if cache_dtype != torch.float8_e4m3fn:
        return x.to(cache_dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache_dtype)


def dequantize_kv(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache rows as attention reads them: fp8 rows -> fp32 rows * scale; float rows unchanged."""
    return rows.float() * scale if is_fp8_cache(rows) else rows


def _gather_heads_first(cache, block_table, length: int, scale: float) -> torch.Tensor:
    # one sequence's first `length` cached tokens, dequantized: [kv_heads, length, D]
    return dequantize_kv(gather_paged_kv(cache, block_table, length), scale).transpose(0, 1)


def paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, *,
                              scale: Optional[float] = None, sliding_window: Optional[int] = None,
                              softcap: Optional[float] = None, k_scale: float = 1.0,
                              v_scale: float = 1.0) -> torch.Tensor:
    """Decode: q [B, Hq, D], one new token per sequence attending to its context_lens[b] cached tokens.
    k_scale / v_scale: the dequantization scales of fp8 caches."""
    out = torch.zeros_like(q)
    for b, ctx in enumerate(context_lens.tolist()):
        if ctx == 0:
            continue
        kb = _gather_heads_first(k_cache, block_tables[b], ctx, k_scale)  # [Hkv, ctx, D]
        vb = _gather_heads_first(v_cache, block_tables[b], ctx, v_scale)
        out[b] = attention_reference(q[b][:, None, :], kb, vb, causal=True, scale=scale,
                                     sliding_window=sliding_window, softcap=softcap)[:, 0, :]
    return out


def paged_prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, *,
                                      scale: Optional[float] = None, sliding_window: Optional[int] = None,
                                      softcap: Optional[float] = None, k_scale: float = 1.0,
                                      v_scale: float = 1.0) -> torch.Tensor:
    """q [Tq, Hq, D] packed new tokens; sequence b's context (context_lens[b] tokens, its new tokens
    last) is in the paged cache. Query j of a sequence with n new tokens sits at ctx - n + j (causal)."""
    out = torch.zeros_like(q)
    cq = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        if cq[b + 1] == cq[b]:
            continue
        kb = _gather_heads_first(k_cache, block_tables[b], ctx, k_scale)
        vb = _gather_heads_first(v_cache, block_tables[b], ctx, v_scale)
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)
        out[cq[b]:cq[b + 1]] = attention_reference(qs, kb, vb, causal=True, scale=scale,
                                                   sliding_window=sliding_window, softcap=softcap).transpose(0, 1)
    return out


def write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0,
                             v_scale: float = 1.0) -> None:
    """In place: token t goes to slot slot_mapping[t] (= block * block_size + offset); -1 skips it.
    An fp8 cache gets the token quantized with its scale (quantize_kv)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize_kv(k[keep], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize_kv(v[keep], v_cache.dtype, v_scale)
