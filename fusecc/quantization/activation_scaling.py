"""Activation-aware input scaling before int4 rounding (AWQ: Lin et al., 2023, "AWQ: Activation-aware
Weight Quantization for LLM Compression and Acceleration").

A linear's input channel j with large activations carries more of the output: multiplying weight
column j by s_j > 1 and dividing the input by s_j leaves the float output unchanged but gives that
column's weights more of the int4 grid. The division folds into the module that makes the input (an
RMSNorm's weight, or the rows of the linear before), so the checkpoint stays an ordinary one.

s = rms(x)^alpha (normalized so max(s) * min(s) = 1), alpha from a grid, picked per group of linears
sharing an input by the output error their round-to-nearest int4 weights make on the calibration
inputs. That error needs only the inputs' Hessian H = 2/n X^T X: for a weight error D it is
tr(D H D^T) / 2, and for the scaled problem (W S, S^-1 x) the Hessian is S^-1 H S^-1.

Which module feeds which group, in transformers' Llama-style decoder layers:
    q_proj, k_proj, v_proj  <- input_layernorm             (an RMSNorm whose output is weight * x_hat)
    gate_proj, up_proj      <- post_attention_layernorm
    down_proj               <- up_proj's rows              (act(gate) * up is linear in up's output)
    o_proj                  <- v_proj's rows, only without grouped-query attention (one v row per o column)
A norm is used only if doubling its weight doubles its output (Gemma's 1 + weight does not): a group
whose feeder fails that check, or is missing, keeps scale 1.
"""

from __future__ import annotations

import torch
from torch import nn

ALPHAS = tuple(i / 10 for i in range(11))


def rounding_error(weight: torch.Tensor, hessian: torch.Tensor, group_size: int) -> float:
    """tr(D H D^T) for D the round-to-nearest int4 (quantize_int4's grid) error of weight [N, K]."""
    from fusecc.quantization.packing import _unpack_cols, quantize_int4

    K = weight.shape[1]
    qweight, scales, zeros = quantize_int4(weight, group_size)
    g = torch.arange(K, device=weight.device) // group_size
    error = (_unpack_cols(qweight, 4)[:, :K].double() - zeros[:, g].double()) * scales[:, g].double() - weight.double()
    return torch.einsum("nk,kl,nl->", error, hessian.double(), error).item()


def search_input_scale(weights: list[torch.Tensor], hessian: torch.Tensor,
                       group_size: int) -> tuple[float, torch.Tensor]:
    """(alpha, s float64 [K]) minimizing the summed rounding error of weights (each [N_i, K], one input)
    scaled by s; alpha 0 (s = 1) is one of the candidates, so the result is never worse than no scaling."""
    rms = (torch.diag(hessian).double() / 2).clamp(min=1e-20).sqrt()
    best = None
    for alpha in ALPHAS:
        s = rms ** alpha
        s = s / (s.max() * s.min()).sqrt()
        scaled_hessian = hessian.double() / s[:, None] / s[None, :]
        error = sum(rounding_error((w.double() * s[None, :]).to(w.dtype), scaled_hessian, group_size)
                    for w in weights)
        if best is None or error < best[0]:
            best = (error, alpha, s)
    return best[1], best[2]


def _scales_with_weight(norm: nn.Module, width: int) -> bool:
    """Does doubling the norm's weight double its output (so dividing the weight divides the output)?"""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (width,):
        return False
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        before = norm(x)
        original = weight.data.clone()
        weight.data.mul_(2)
        try:
            after = norm(x)
        finally:
            weight.data.copy_(original)
    return torch.allclose(after, 2 * before, rtol=1e-4, atol=1e-6)


def _feeders(layer: nn.Module) -> list[tuple[tuple[str, ...], nn.Module | None, str]]:
    """(the group's linear names relative to the layer, the module making their input, "norm" or "rows")."""
    attention = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    v_proj, o_proj = getattr(attention, "v_proj", None), getattr(attention, "o_proj", None)
    one_v_row_per_o_column = (isinstance(v_proj, nn.Linear) and isinstance(o_proj, nn.Linear)
                              and v_proj.out_features == o_proj.in_features)
    return [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), getattr(layer, "input_layernorm", None), "norm"),
        (("self_attn.o_proj",), v_proj if one_v_row_per_o_column else None, "rows"),
        (("mlp.gate_proj", "mlp.up_proj"), getattr(layer, "post_attention_layernorm", None), "norm"),
        (("mlp.down_proj",), getattr(mlp, "up_proj", None), "rows"),
    ]


@torch.no_grad()
def scale_layer_inputs(layer: nn.Module, hessians: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Search and fold the input scales of one decoder layer, given the float Hessians of its linears'
    inputs (names relative to the layer). Returns {group's first linear: alpha} for the groups scaled."""
    modules = dict(layer.named_modules())
    chosen = {}
    for names, feeder, how in _feeders(layer):
        linears = [modules.get(name) for name in names]
        if feeder is None or any(not isinstance(m, nn.Linear) for m in linears) or names[0] not in hessians:
            continue
        width = linears[0].in_features
        if how == "norm" and not _scales_with_weight(feeder, width):
            continue
        alpha, s = search_input_scale([m.weight for m in linears], hessians[names[0]], group_size)
        if alpha == 0.0:
            continue
        for m in linears:
            m.weight.mul_(s[None, :].to(m.weight.dtype))
        if how == "norm":
            feeder.weight.div_(s.to(feeder.weight.dtype))
        else:
            feeder.weight.div_(s[:, None].to(feeder.weight.dtype))
            if feeder.bias is not None:
                feeder.bias.div_(s.to(feeder.bias.dtype))
        chosen[names[0]] = alpha
    return chosen
