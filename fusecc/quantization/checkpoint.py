"""A quantized checkpoint's tensor stream -> the same stream in fusecc's layouts.

    model.layers.0.self_attn.q_proj.qweight/.qzeros/.scales (AWQ or GPTQ)
        -> model.layers.0.self_attn.q_proj.qweight/.scales/.zeros   (fusecc int4/int8, [N, ...])
    model.layers.0.mlp.up_proj.weight (float8_e4m3fn) + .weight_scale / .weight_scale_inv (fp8)
        -> model.layers.0.mlp.up_proj.weight + .weight_scale        ([N, K], fp32 [N, G])

Names keep the checkpoint's module names (q_proj, ...), so the model's own `load_weights` then stacks
q|k|v and gate|up as it does for float checkpoints. Every other tensor passes through unchanged.
A quantized linear's parts are held until all have been seen (they are usually adjacent in a file).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from fusecc.quantization.config import QuantConfig
from fusecc.quantization.packing import awq_to_fusecc, expand_fp8_scale, gptq_to_fusecc

_INT_PARTS = ("qweight", "qzeros", "scales")


def convert_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], quant: QuantConfig
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    if quant.method == "gguf":  # converted tensor by tensor as the GGUF file is read (gguf_blocks.py)
        yield from weights
        return
    parts_needed = ("weight", quant.fp8_scale_name) if quant.kind == "fp8" else _INT_PARTS
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if quant.method == "gptq" and suffix == "g_idx":
            _check_g_idx(name, tensor, quant.group_size)
            continue
        if quant.kind == "fp8" and suffix == "input_scale":
            continue  # a static activation scale; dynamic per-token scales are computed instead
        if not _is_part(suffix, tensor, quant, parts_needed):
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if len(parts) == len(parts_needed):
            for ours, converted in _convert(prefix, pending.pop(prefix), quant).items():
                yield f"{prefix}.{ours}", converted
    if pending:
        prefix, parts = next(iter(pending.items()))
        missing = [p for p in parts_needed if p not in parts]
        raise ValueError(f"checkpoint quantized linear {prefix!r} lacks {', '.join(missing)} "
                         f"({len(pending)} linears incomplete)")


def _is_part(suffix: str, tensor: torch.Tensor, quant: QuantConfig, parts_needed) -> bool:
    if quant.kind == "fp8":  # a float weight of the same name (norms, embeddings) is not a part
        return suffix == quant.fp8_scale_name or (suffix == "weight" and tensor.dtype == torch.float8_e4m3fn)
    return suffix in parts_needed


def _convert(prefix: str, parts: dict[str, torch.Tensor], quant: QuantConfig) -> dict[str, torch.Tensor]:
    if quant.kind == "fp8":
        weight = parts["weight"]
        scale = expand_fp8_scale(parts[quant.fp8_scale_name], weight.shape[0], quant.group_size)
        return {"weight": weight, "weight_scale": scale}
    qweight, qzeros, scales = (parts[p] for p in _INT_PARTS)
    for p in _INT_PARTS:
        if parts[p].dim() != 2:
            raise ValueError(f"checkpoint tensor {prefix}.{p} has shape {tuple(parts[p].shape)}; expected 2-D")
    if quant.method == "awq":
        qweight, scales, zeros = awq_to_fusecc(qweight, qzeros, scales)
    else:
        qweight, scales, zeros = gptq_to_fusecc(qweight, qzeros, scales, quant.bits, quant.gptq_v1_zeros)
    return {"qweight": qweight, "scales": scales, "zeros": zeros}


def _check_g_idx(name: str, g_idx: torch.Tensor, group_size: int) -> None:
    """desc_act false checkpoints still carry g_idx: it must be the plain k // group order."""
    k = torch.arange(g_idx.numel(), device=g_idx.device)
    expected = torch.zeros_like(k) if group_size == -1 else k // group_size
    if not torch.equal(g_idx.long(), expected):
        raise ValueError(f"checkpoint tensor {name!r} reorders the input channels (act-order); "
                         f"gptq desc_act=true checkpoints are not supported")
