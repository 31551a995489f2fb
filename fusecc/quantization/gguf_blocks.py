"""GGUF (llama.cpp) block-quantized tensors -> fusecc's weight-only layouts, where the conversion is exact.

    Q8_0  blocks of 32 weights: fp16 d, 32 int8 q;  w = d * q
          -> int8 [N, K], scales d (fp32) [N, K/32], no zeros                       exact
    Q4_0  blocks of 32: fp16 d, 16 bytes, byte j = q[j] | q[j + 16] << 4;  w = d * (q - 8)
          -> int4 [N, K/8] (fusecc packing), scales d [N, K/32], zeros 8           exact
    Q4_1  fp16 d, fp16 m, 16 bytes;  w = d * q + m: (q - z) * s needs z = -m / d, which fp32 does not
          hold exactly                                                             dequantized
    K-quants (Q4_K, Q5_K, Q6_K, ...), Q5_0/Q5_1, IQ*: super-blocks or codebooks     dequantized

"Exact": the kernel's fp32 (q - z) * s is bit for bit what gguf.dequantize computes (one fp32 product
of the same integers and the same fp16 scale). A file loads quantized when every decoder linear
(attn_q/k/v/output, ffn_gate/up/down) has the same one of the exact types, since a model has one
quantization format; otherwise every tensor is dequantized, as before.
"""

from __future__ import annotations

import numpy as np
import torch

from fusecc.quantization.config import QuantConfig
from fusecc.quantization.packing import pack_int4

LINEAR_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
BLOCK = 32
_Q4_0, _Q8_0 = 2, 8  # GGMLQuantizationType values
_EXACT = {_Q8_0: (8, False), _Q4_0: (4, True)}  # type -> (bits, zero points)


def is_decoder_linear(name: str) -> bool:
    """GGUF tensor names `blk.N.attn_q.weight` and the like."""
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blk" and parts[2] in LINEAR_TENSORS and parts[3] == "weight"


def gguf_quant_config(types: dict[str, int]) -> QuantConfig | None:
    """The fusecc format a GGUF file's decoder linears load into, or None (dequantize them)."""
    kinds = {int(t) for name, t in types.items() if is_decoder_linear(name)}
    if len(kinds) != 1 or next(iter(kinds)) not in _EXACT:
        return None
    bits, zeros = _EXACT[next(iter(kinds))]
    return QuantConfig("gguf", bits, BLOCK, zero_point=zeros, from_checkpoint=True)


def gguf_to_fusecc(data: np.ndarray, ggml_type: int) -> dict[str, np.ndarray]:
    """One Q8_0 / Q4_0 tensor, uint8 [N, K/32 * block bytes] as GGUFReader gives it -> {"qweight",
    "scales"(, "zeros")} in fusecc's layout, output rows first (so transformers' q/k row permutation
    applies to each as to the dequantized weight)."""
    N = data.shape[0]
    per_block = 2 + (BLOCK if ggml_type == _Q8_0 else BLOCK // 2)
    blocks = data.reshape(N, -1, per_block)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)  # [N, K/32]
    payload = np.ascontiguousarray(blocks[..., 2:])
    if ggml_type == _Q8_0:
        return {"qweight": payload.view(np.int8).reshape(N, -1), "scales": scales}
    assert ggml_type == _Q4_0, ggml_type
    q = np.concatenate([payload & 0xF, payload >> 4], axis=-1).reshape(N, -1)  # [N, K] values 0..15
    return {"qweight": pack_int4(torch.from_numpy(q.astype(np.int64))).numpy(), "scales": scales,
            "zeros": np.full_like(scales, 8.0)}
