"""torch.library custom ops owned by fusecc.

Each op has a real implementation, a fake (meta) implementation so Dynamo and AOTAutograd
trace it without graph breaks, and — where a hand-written kernel backs it — a pure-torch
reference used on CPU and in tests.

`fusecc::sdpa` exists so that capture can keep `scaled_dot_product_attention` whole:
SDPA is CompositeImplicitAutograd, so AOTAutograd would otherwise lower it to a
backend-specific kernel op (`_scaled_dot_product_flash_attention_for_cpu`, ...) chosen at
trace time. Wrapped in an opaque custom op it survives capture as one node that the
attention-matching pass can rewrite into a fusecc kernel, or leave as the exact SDPA call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.library.custom_op("fusecc::sdpa", mutates_args=())
def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Exactly `F.scaled_dot_product_attention` without dropout."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa,
    ).contiguous()


@sdpa.register_fake
def _sdpa_fake(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    # out: [*batch, heads, seq_q, v_head_dim]
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


# ---- attention kernels (fusecc/kernels/) ----
# CUDA tensors run the Triton kernels; CPU tensors run the pure-torch references of
# fusecc/kernels/reference.py (same conventions: bottom-right causal, empty rows are 0).

import fusecc.kernels as _kernels  # noqa: E402
from fusecc.kernels import reference as _ref  # noqa: E402


@torch.library.custom_op("fusecc::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D] contiguous (GQA, bottom-right causal).

    attn_mask: broadcastable to [B, Hq, Sq, Sk]; bool (keep where True) or additive float. Rows with
    nothing to attend to are 0 — what `fusecc::sdpa` (SDPA, torch >= 2.5) returns for them too."""
    if q.is_cuda:
        return _kernels.flash_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask)
    return _ref.attention_reference(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask).contiguous()


@flash_attention.register_fake
def _flash_attention_fake(q, k, v, causal=False, scale=None, attn_mask=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("fusecc::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Packed q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_* [batch + 1] int32 -> [Tq, Hq, D]."""
    if q.is_cuda:
        return _kernels.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         causal=causal, scale=scale)
    return _ref.varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale)


@varlen_attention.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, scale=None):
    return q.new_empty(q.shape)


# The paged ops take fp8 caches (float8_e4m3fn) as well as caches in q's dtype: an fp8 cache
# holds x / scale (k_scale for K, v_scale for V, one each per layer), the write quantizes and the
# attention kernels dequantize in registers. The scales are not used with a float cache.


@torch.library.custom_op("fusecc::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: Optional[float] = None, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Decode: q [B, Hq, D], caches [num_blocks, block_size, Hkv, D], block_tables [B, max_blocks] int32,
    context_lens [B] int32 -> [B, Hq, D]. sliding_window / softcap: see kernels/paged_attention.py."""
    options = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    if q.is_cuda:
        return _kernels.paged_attention(q, k_cache, v_cache, block_tables, context_lens, **options)
    return _ref.paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, **options)


@paged_attention.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_tables, context_lens, scale=None, sliding_window=None,
                          softcap=None, k_scale=1.0, v_scale=1.0):
    return q.new_empty(q.shape)


@torch.library.custom_op("fusecc::paged_prefill_attention", mutates_args=())
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                            max_seqlen_q: int, scale: Optional[float] = None, sliding_window: Optional[int] = None,
                            softcap: Optional[float] = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """New tokens q [Tq, Hq, D] (packed by cu_seqlens_q) attending causally to their paged context;
    context_lens includes the new tokens (already written to the cache) -> [Tq, Hq, D]."""
    options = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, k_scale=k_scale, v_scale=v_scale)
    if q.is_cuda:
        return _kernels.paged_prefill_attention(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens,
                                                max_seqlen_q, **options)
    return _ref.paged_prefill_attention_reference(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens,
                                                  **options)


@paged_prefill_attention.register_fake
def _paged_prefill_attention_fake(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, max_seqlen_q,
                                  scale=None, sliding_window=None, softcap=None, k_scale=1.0, v_scale=1.0):
    return q.new_empty(q.shape)


@torch.library.custom_op("fusecc::write_kv_cache", mutates_args=("k_cache", "v_cache"))
def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """In place: k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slot_mapping [T] int64
    (-1 skips); into an fp8 cache as x / scale saturated to +-448."""
    if k.is_cuda:
        _kernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return
    _ref.write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@write_kv_cache.register_fake
def _write_kv_cache_fake(k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    return None


# ---- mixture of experts (fusecc/kernels/fused_moe.py) ----

from fusecc.kernels import fused_moe as _moe  # noqa: E402


@torch.library.custom_op("fusecc::fused_moe", mutates_args=())
def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts of a MoE block: hidden_states [T, hidden], w13 [E, 2 * inter, hidden] (gate | up),
    w2 [E, hidden, inter], topk_weights/topk_ids [T, top_k] -> [T, hidden] =
    sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, k].
    CUDA runs the Triton grouped GEMMs; CPU a loop over the experts that received tokens."""
    if hidden_states.is_cuda:
        return _moe.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids)
    return _moe.fused_moe_reference(hidden_states, w13, w2, topk_weights, topk_ids)


@fused_moe.register_fake
def _fused_moe_fake(hidden_states, w13, w2, topk_weights, topk_ids):
    return hidden_states.new_empty(hidden_states.shape)


@torch.library.custom_op("fusecc::fused_moe_quantized", mutates_args=())
def fused_moe_quantized(hidden_states: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor,
                        w13_zeros: Optional[torch.Tensor], w2: torch.Tensor, w2_scales: torch.Tensor,
                        w2_zeros: Optional[torch.Tensor], topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        weight_format: str, group_size: int) -> torch.Tensor:
    """fusecc::fused_moe with quantized expert weights (weight_format "int8" | "int4" | "fp8", layouts of
    fusecc/kernels/moe_expert_weights.py; scales/zeros [E, N, groups]); fp8 is W8A8 (each projection's
    input rows quantized per row). CUDA runs the Triton kernels dequantizing in registers; CPU the loop."""
    quants = {"w13_quant": _moe.ExpertQuant(weight_format, group_size, w13_scales, w13_zeros),
              "w2_quant": _moe.ExpertQuant(weight_format, group_size, w2_scales, w2_zeros)}
    if hidden_states.is_cuda:
        return _moe.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids, **quants)
    return _moe.fused_moe_reference(hidden_states, w13, w2, topk_weights, topk_ids, **quants)


@fused_moe_quantized.register_fake
def _fused_moe_quantized_fake(hidden_states, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, topk_weights,
                              topk_ids, weight_format, group_size):
    return hidden_states.new_empty(hidden_states.shape)


# ---- q/k norms and rotary embedding (fusecc/kernels/qk_rope.py) ----

from fusecc.kernels import qk_rope as _qk_rope  # noqa: E402


@torch.library.custom_op("fusecc::qk_norm_rope", mutates_args=())
def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, num_heads: int,
                 num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and k heads of a fused qkv projection's output [T, (Hq + 2 Hkv) * D], each RMS-normalized
    with its weight (when given: Qwen3's q_norm / k_norm) and rotated (rotate_half RoPE, cos/sin tables
    [positions, D] indexed by `positions`) -> q [T, Hq, D], k [T, Hkv, D]. CUDA runs one Triton kernel
    (power-of-two head_dim); otherwise the torch ops of the native modules."""
    if qkv.is_cuda and head_dim & (head_dim - 1) == 0 and qkv.stride(-1) == 1:
        return _qk_rope.qk_norm_rope(qkv, positions, cos, sin, q_weight, k_weight, eps, num_heads, num_kv_heads,
                                     head_dim)
    q, k = _qk_rope.qk_norm_rope_reference(qkv, positions, cos, sin, q_weight, k_weight, eps, num_heads,
                                           num_kv_heads, head_dim)
    return q.contiguous(), k.contiguous()  # a custom op's outputs may not alias its inputs


@qk_norm_rope.register_fake
def _qk_norm_rope_fake(qkv, positions, cos, sin, q_weight, k_weight, eps, num_heads, num_kv_heads, head_dim):
    T = qkv.shape[0]
    return qkv.new_empty((T, num_heads, head_dim)), qkv.new_empty((T, num_kv_heads, head_dim))


# ---- MoE routing (fusecc/kernels/moe_routing.py) ----

from fusecc.kernels import moe_routing as _routing  # noqa: E402


@torch.library.custom_op("fusecc::moe_route", mutates_args=())
def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(router_logits, fp32) -> its top_k (weights fp32, ids int64, [T, top_k]), renormalized to sum
    1 when asked. CUDA runs one Triton kernel; CPU the torch ops themselves."""
    _routing.check_routing(router_logits, top_k)
    if router_logits.is_cuda:
        return _routing.route_topk(router_logits, top_k, renormalize)
    return _routing.route_topk_reference(router_logits, top_k, renormalize)


@moe_route.register_fake
def _moe_route_fake(router_logits, top_k, renormalize):
    shape = (router_logits.shape[0], top_k)
    return (router_logits.new_empty(shape, dtype=torch.float32),
            router_logits.new_empty(shape, dtype=torch.int64))


# ---- quantized linears (fusecc/kernels/quant_matmul.py, fp8_matmul.py) ----
# One opaque call per linear: Dynamo and the fusecc backend keep it as an extern call, so the packed
# weight is never unpacked into a float tensor in the graph. CPU tensors run the torch references.

from fusecc.kernels import fp8_matmul as _fp8  # noqa: E402
from fusecc.kernels import quant_matmul as _qmm  # noqa: E402


@torch.library.custom_op("fusecc::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """x [*, K] @ dequant(qweight)[N, K].T (+ bias) -> [*, N]; int4/int8 layouts of quant_matmul.py."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = _qmm.weight_only_matmul(x2, qweight, scales, zeros, bits, group_size, bias)
    else:
        out = _qmm.weight_only_matmul_reference(x2, qweight, scales, zeros, bits, group_size, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@weight_only_linear.register_fake
def _weight_only_linear_fake(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("fusecc::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
               group_size: int) -> torch.Tensor:
    """x [*, K] quantized per token to fp8, @ (weight * weight_scale)[N, K].T (+ bias) -> [*, N]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        out = _fp8.fp8_matmul(x2, weight, weight_scale, group_size, bias)
    else:
        out = _fp8.fp8_matmul_reference(x2, weight, weight_scale, group_size, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, weight_scale, bias, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
