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

FP8 KV cache (kv_cache_dtype "fp8"): the caches are float8_e4m3fn and each layer has a K and a V
scale (k_scale / v_scale, 1.0 unless the checkpoint gives `self_attn.k_scale` / `v_scale` tensors,
vLLM's names): the cache holds k / k_scale, and the attention kernels multiply it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.*)
from fusecc.quantization.config import FP8_MIN_CAPABILITY  # Triton's e4m3 conversions: Ada, Hopper, later
from fusecc.runtime.config import KV_CACHE_DTYPES


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
        # dequantization scales of an fp8 cache (python floats: constants of the compiled graph)
        self.k_scale, self.v_scale = 1.0, 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                md: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]
        k_cache, v_cache = kv_cache
        kv_scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        torch.ops.fusecc.write_kv_cache(k, v, k_cache, v_cache, md.slot_mapping, **kv_scales)
        if md.decode_only:
            return torch.ops.fusecc.paged_attention(q, k_cache, v_cache, md.block_tables, md.context_lens, self.scale,
                                                    **kv_scales)
        return torch.ops.fusecc.paged_prefill_attention(q, k_cache, v_cache, md.cu_seqlens_q, md.block_tables,
                                                        md.context_lens, md.max_seqlen_q, self.scale, **kv_scales)


# ---- the KV cache's dtype and scales ----

def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """EngineConfig.kv_cache_dtype -> the pool's dtype; fp8 on a CUDA GPU without e4m3 is refused
    here, at start-up, naming its compute capability."""
    if name == "auto":
        return model_dtype
    assert name in KV_CACHE_DTYPES, name  # EngineConfig checked it
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise ValueError(f"kv_cache_dtype={name!r} needs a GPU with FP8 (e4m3) support (compute capability "
                             f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+); "
                             f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return torch.float8_e4m3fn


# checkpoint tensor suffix -> the PagedAttention attributes it sets (older checkpoints: one kv_scale)
_KV_SCALE_NAMES = {".self_attn.k_scale": ("k_scale",), ".self_attn.v_scale": ("v_scale",),
                   ".self_attn.kv_scale": ("k_scale", "v_scale")}


def take_kv_scales(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass `weights` through, setting each layer's PagedAttention k_scale / v_scale from the
    checkpoint's `model.layers.N.self_attn.{k,v}_scale` scalars (not parameters: used only by an
    fp8 cache) on the way. A scale that is not one positive finite number is refused."""
    for name, tensor in weights:
        suffix = next((s for s in _KV_SCALE_NAMES if name.endswith(s)), None)
        if suffix is None:
            yield name, tensor
            continue
        attn = model.get_submodule(name[:-len(suffix)] + ".self_attn.attn")
        if tensor.numel() != 1 or not (float(tensor) > 0 and float(tensor) < float("inf")):
            raise ValueError(f"checkpoint tensor {name!r} must be one positive finite scale, got "
                             f"{tuple(tensor.shape)} {tensor.flatten()[:4].tolist()}")
        for attr in _KV_SCALE_NAMES[suffix]:
            setattr(attn, attr, float(tensor))
