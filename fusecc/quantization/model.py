"""Quantizing a model: which linears, and the two moments of a load that touch them.

    weights = prepare_for_load(model, quant, weights)   # checkpoint formats: empty quantized linears,
    model.load_weights(weights)                          #   the stream converted to fusecc layouts
    finish_load(model, quant)                            # on the fly: float linears quantized

As vLLM does by default, only the decoder layers' linears are quantized: the embeddings and lm_head
keep the model dtype (they are read once per step, and the logits are sensitive to them). A MoE
model's stacked experts are quantized too, on the fly or from the checkpoint (experts.py); its routers
are not.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from fusecc.quantization.checkpoint import convert_checkpoint
from fusecc.quantization.config import QuantConfig, check_device
from fusecc.quantization.experts import empty_quantized_experts, quantize_experts, replace_experts
from fusecc.quantization.linear import empty_quantized_linear, quantize_linear

# nn.Linear names in fusecc's model classes (fusecc/runtime/models/llama.py) that are quantized
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantized_linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rpartition(".")[2] in QUANTIZED_LINEARS]


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Swap each quantized linear for `make(linear)`; returns how many were swapped."""
    names = quantized_linear_names(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, make(getattr(owner, attr)))
    return len(names)


def prepare_for_load(model: nn.Module, quant: QuantConfig | None,
                     weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """Before `load_weights`: a quantized checkpoint's linears become empty quantized modules and its
    tensors are converted as they stream by; otherwise nothing changes."""
    if quant is None or not quant.from_checkpoint:
        return weights
    check_device(quant, _device(model))
    _require_some(model, quant, replace_linears(model, lambda linear: empty_quantized_linear(linear, quant)))
    replace_experts(model, lambda experts: empty_quantized_experts(experts, quant))
    return convert_checkpoint(weights, quant)


def finish_load(model: nn.Module, quant: QuantConfig | None) -> None:
    """After `load_weights`: quantize the float linears at load (quantization="int8" | "int4" | "fp8")."""
    if quant is None or quant.from_checkpoint:
        return
    check_device(quant, _device(model))
    _require_some(model, quant, replace_linears(model, lambda linear: quantize_linear(linear, quant)))
    replace_experts(model, lambda experts: quantize_experts(experts, quant))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _require_some(model: nn.Module, quant: QuantConfig, count: int) -> None:
    if count == 0:
        raise ValueError(f"quantization {quant.method!r}: {type(model).__name__} has no linears named "
                         f"{', '.join(QUANTIZED_LINEARS)} to quantize")
