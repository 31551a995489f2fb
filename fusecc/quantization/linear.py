"""Quantized replacements of nn.Linear: one custom-op call each (fusecc/ops.py), so eager, Dynamo and the
fusecc backend all see a single extern call per linear.

Their tensors are parameters (requires_grad False) named as the checkpoint formats are converted
(packing.py) and laid out output-channel first, so a model's `load_weights` stacks q|k|v and gate|up
into them exactly as it stacks float weights (narrowing dim 0):

    WeightOnlyLinear: qweight int32 [N, K/8] (int4) | int8 [N, K];  scales fp32 [N, G];  zeros fp32 [N, G] | None
    Fp8Linear:        weight float8_e4m3fn [N, K];                   weight_scale fp32 [N, G]
    both:             bias [N] in the model dtype | None
"""

from __future__ import annotations

import torch
from torch import nn

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.weight_only_linear / fp8_linear)
from fusecc.quantization.config import QuantConfig
from fusecc.quantization.packing import quantize_fp8, quantize_int4, quantize_int8


def _groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _weight_only_params(in_features: int, out_features: int, bits: int, group_size: int, has_zeros: bool,
                        device) -> dict[str, nn.Parameter | None]:
    packed = (out_features, -(-in_features // 8)) if bits == 4 else (out_features, in_features)
    groups = _groups(in_features, group_size)
    return {"qweight": _param(packed, torch.int32 if bits == 4 else torch.int8, device),
            "scales": _param((out_features, groups), torch.float32, device),
            "zeros": _param((out_features, groups), torch.float32, device) if has_zeros else None}


def _fp8_params(in_features: int, out_features: int, group_size: int, device) -> dict[str, nn.Parameter]:
    return {"weight": _param((out_features, in_features), torch.float8_e4m3fn, device),
            "weight_scale": _param((out_features, _groups(in_features, group_size)), torch.float32, device)}


def quantized_weight_parameters(in_features: int, out_features: int, quant: QuantConfig,
                                device=None) -> dict[str, nn.Parameter | None]:
    """The (uninitialised) parameters holding a [out_features, in_features] weight in `quant`'s format,
    by the names of the module docstring; a module registers them (tensor-parallel linears too)."""
    if quant.kind == "fp8":
        return _fp8_params(in_features, out_features, quant.group_size, device)
    return _weight_only_params(in_features, out_features, quant.bits, quant.group_size, quant.zero_point, device)


def quantized_matmul(x: torch.Tensor, module: nn.Module, bias: torch.Tensor | None, quant: QuantConfig) -> torch.Tensor:
    """x @ W.T (+ bias) for a module holding quantized_weight_parameters: one custom-op call."""
    if quant.kind == "fp8":
        return torch.ops.fusecc.fp8_linear(x, module.weight, module.weight_scale, bias, quant.group_size)
    return torch.ops.fusecc.weight_only_linear(x, module.qweight, module.scales, module.zeros, bias, quant.bits,
                                               quant.group_size)


class WeightOnlyLinear(nn.Module):
    """W4A16 / W8A16: int weights, float activations (fusecc/kernels/quant_matmul.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 has_zeros: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        for name, p in _weight_only_params(in_features, out_features, bits, group_size, has_zeros, device).items():
            setattr(self, name, p)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusecc.weight_only_linear(x, self.qweight, self.scales, self.zeros, self.bias,
                                                   self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, zeros={self.zeros is not None}")


class Fp8Linear(nn.Module):
    """W8A8 FP8: e4m3 weights with per-channel or 128-block scales, per-token activation scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, dtype: torch.dtype,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        for name, p in _fp8_params(in_features, out_features, group_size, device).items():
            setattr(self, name, p)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusecc.fp8_linear(x, self.weight, self.weight_scale, self.bias, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def empty_quantized_linear(linear: nn.Linear, quant: QuantConfig) -> nn.Module:
    """The quantized module that takes `linear`'s place, its tensors uninitialised (a checkpoint fills them)."""
    K, N = linear.in_features, linear.out_features
    dtype, device, bias = linear.weight.dtype, linear.weight.device, linear.bias is not None
    if quant.kind == "fp8":
        return Fp8Linear(K, N, bias, quant.group_size, dtype, device)
    return WeightOnlyLinear(K, N, bias, quant.bits, quant.group_size, quant.zero_point, dtype, device)


def quantize_weight(w: torch.Tensor, quant: QuantConfig, row_amax: torch.Tensor | None = None) -> dict:
    """A float weight [N, K] rounded to nearest in an on-the-fly format -> its tensors by the names of
    quantized_weight_parameters. row_amax [N, 1]: the full rows' max |w| when w is a column shard
    (tensor parallelism), so per-channel scales are those of the unsharded weight."""
    if quant.method == "int8":
        qweight, scales = quantize_int8(w, row_amax)
        return {"qweight": qweight, "scales": scales, "zeros": None}
    if quant.method == "int4":
        qweight, scales, zeros = quantize_int4(w, quant.group_size)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}
    if quant.method == "fp8":
        weight, scale = quantize_fp8(w, row_amax)
        return {"weight": weight, "weight_scale": scale}
    raise ValueError(f"quantization {quant.method!r} is a checkpoint format, not an on-the-fly method")


@torch.no_grad()
def quantize_linear(linear: nn.Linear, quant: QuantConfig) -> nn.Module:
    """`linear`'s float weight quantized round-to-nearest (quantization="int8" | "int4" | "fp8")."""
    module = empty_quantized_linear(linear, quant)
    for name, tensor in quantize_weight(linear.weight, quant).items():
        if tensor is not None:
            getattr(module, name).copy_(tensor)
    if linear.bias is not None:
        module.bias.copy_(linear.bias)
    return module
