"""Quantized MoE experts: the stacked expert weights of a MoE block in int8, int4 or fp8.

A MoE model's experts module (fusecc/runtime/models/moe.py: MoEExperts) holds two 3-D parameters,

    gate_up_proj [experts, 2 * inter, hidden]     down_proj [experts, hidden, inter]

and is called as experts(x, topk_weights, topk_ids). With quantization="int8" | "int4" | "fp8" it is
replaced at load by a QuantizedMoEExperts holding the same weights in the layouts of
fusecc/kernels/moe_expert_weights.py, quantized as the linears are (packing.py: int8 symmetric per
output channel, int4 asymmetric in groups of 128 along the input, fp8 e4m3 per output channel with
per-token activation scales), each expert's rows on their own; its call is `fusecc::fused_moe_quantized`.
A quantized checkpoint (AWQ, GPTQ, fp8) gets an empty QuantizedMoEExperts in its format that its
per-expert tensors fill, converted as the linears' are.
The router (`gate`) stays in the model dtype, as vLLM keeps it.
"""

from __future__ import annotations

import torch
from torch import nn

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.fused_moe_quantized)
from fusecc.quantization.config import QuantConfig
from fusecc.quantization.linear import quantize_weight


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def is_experts_module(module: nn.Module) -> bool:
    """A MoE experts module in fusecc's layout (3-D gate_up_proj and down_proj parameters)."""
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and params["gate_up_proj"].dim() == 3
            and params["down_proj"].dim() == 3)


class QuantizedMoEExperts(nn.Module):
    """Stacked quantized expert weights; forward as MoEExperts's."""

    def __init__(self, weight_format: str, group_size: int, gate_up: tuple, down: tuple) -> None:
        super().__init__()
        self.weight_format, self.group_size = weight_format, group_size
        self.num_experts, self.intermediate = gate_up[0].shape[0], gate_up[0].shape[1] // 2
        self.gate_up_proj, self.gate_up_scales = _param(gate_up[0]), _param(gate_up[1])
        self.gate_up_zeros = _param(gate_up[2]) if gate_up[2] is not None else None
        self.down_proj, self.down_scales = _param(down[0]), _param(down[1])
        self.down_zeros = _param(down[2]) if down[2] is not None else None

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusecc.fused_moe_quantized(
            x, self.gate_up_proj, self.gate_up_scales, self.gate_up_zeros, self.down_proj, self.down_scales,
            self.down_zeros, topk_weights, topk_ids, self.weight_format, self.group_size)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, intermediate={self.intermediate}, format={self.weight_format}, "
                f"group_size={self.group_size}")


def quantize_expert_weights(w: torch.Tensor, quant: QuantConfig, row_amax: torch.Tensor | None = None) -> tuple:
    """w [E, N, K] float -> (weights, scales [E, N, groups], zeros or None) in moe_expert_weights.py's
    layout; every expert's rows quantized as a linear's rows are (round to nearest). row_amax [E, N, 1]:
    the full rows' max |w| when w holds some of their columns (tensor parallelism)."""
    E, N, K = w.shape
    amax = row_amax.reshape(E * N, 1) if row_amax is not None else None
    parts = list(quantize_weight(w.reshape(E * N, K), quant, amax).values())  # weights, scales[, zeros]
    q, scales, zeros = (parts + [None])[:3]

    def stacked(t):
        return t.reshape(E, N, -1).contiguous() if t is not None else None

    return stacked(q), stacked(scales), stacked(zeros)


@torch.no_grad()
def quantize_experts(experts: nn.Module, quant: QuantConfig) -> QuantizedMoEExperts:
    """`experts`' float weights quantized round-to-nearest (quantization="int8" | "int4" | "fp8")."""
    return QuantizedMoEExperts(expert_weight_format(quant), quant.group_size,
                               quantize_expert_weights(experts.gate_up_proj, quant),
                               quantize_expert_weights(experts.down_proj, quant))


def expert_weight_format(quant: QuantConfig) -> str:
    """The fused MoE kernels' weight format of `quant` (moe_expert_weights.py): "fp8", "int8" or "int4"."""
    return "fp8" if quant.kind == "fp8" else f"int{quant.bits}"


def empty_expert_parts(num_experts: int, intermediate: int, hidden: int, quant: QuantConfig, device) -> tuple:
    """(weight format, gate_up parts, down parts), each parts (weights, scales, zeros or None) uninitialised
    in moe_expert_weights.py's layout for `quant`: what QuantizedMoEExperts takes."""
    fp8 = quant.kind == "fp8"

    def parts(N: int, K: int) -> tuple:
        groups = 1 if quant.group_size == -1 else -(-K // quant.group_size)
        if fp8:
            w = torch.empty(num_experts, N, K, dtype=torch.float8_e4m3fn, device=device)
        elif quant.bits == 4:
            w = torch.empty(num_experts, N, -(-K // 8), dtype=torch.int32, device=device)
        else:
            w = torch.empty(num_experts, N, K, dtype=torch.int8, device=device)
        scales = torch.empty(num_experts, N, groups, dtype=torch.float32, device=device)
        zeros = (torch.empty(num_experts, N, groups, dtype=torch.float32, device=device)
                 if quant.zero_point and not fp8 else None)
        return w, scales, zeros

    return expert_weight_format(quant), parts(2 * intermediate, hidden), parts(hidden, intermediate)


def empty_quantized_experts(experts: nn.Module, quant: QuantConfig) -> QuantizedMoEExperts:
    """The quantized module that takes `experts`' place, its tensors uninitialised (a quantized
    checkpoint's per-expert tensors fill them: fusecc/runtime/models/moe.py)."""
    E, two_inter, H = experts.gate_up_proj.shape
    weight_format, gate_up, down = empty_expert_parts(E, two_inter // 2, H, quant, experts.gate_up_proj.device)
    return QuantizedMoEExperts(weight_format, quant.group_size, gate_up, down)


def replace_experts(model: nn.Module, make) -> int:
    """Swap each experts module for `make(experts)`; returns how many were swapped."""
    names = [name for name, m in model.named_modules() if is_experts_module(m)]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, make(getattr(owner, attr)))
    return len(names)
