"""The decomposition table fusecc owns.

AOTAutograd lowers every op in this table to simpler ATen ops while tracing. We decompose
composite ops whose parts the passes and the fusion/codegen stage understand (norms,
activations, softmax, small helpers), and keep whole what has a better single kernel:
matmuls (cuBLAS), embedding, SDPA (kept as `fusecc::sdpa`, see capture.py), and ops whose
decomposition would be slower or less exact.

A graph that runs as ATen ops (the CPU path, codegen "aten") keeps the activations whole too:
nothing fuses their parts there, and one vectorized `silu` kernel beats `sigmoid` + `mul`, a
second pass over the [tokens, intermediate] tensor and a temporary of its size.
"""

from __future__ import annotations

import functools

import torch
from torch._decomp import get_decompositions

aten = torch.ops.aten

# Ops decomposed: each is a composite of pointwise + reduction ops that fuse well.
_DECOMPOSE = [
    aten.silu, aten.gelu, aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus,
    aten.elu, aten.leaky_relu, aten.hardtanh, aten.sigmoid_backward, aten.logit,
    aten.native_layer_norm, aten.native_group_norm, aten.native_batch_norm,
    aten._softmax, aten._log_softmax, aten.addcmul, aten.addcdiv, aten.lerp,
    aten.rsub, aten.masked_fill, aten.clamp_min, aten.clamp_max, aten.xlogy,
    aten.nan_to_num, aten.std, aten.var, aten.var_mean, aten.std_mean,
    aten.logsumexp, aten.squeeze, aten.unsqueeze_copy, aten.expand_copy, aten.permute_copy,
    aten.t_copy, aten.transpose_copy, aten.view_copy, aten.select_copy, aten.slice_copy,
    aten.diagonal_copy, aten.unfold_copy, aten.alias_copy,
    aten.linalg_vector_norm, aten.norm, aten.frac, aten.deg2rad, aten.rad2deg, aten.sinc,
    aten.trunc, aten.hypot, aten.huber_loss, aten.mse_loss, aten.l1_loss,
]


# Activations whose parts only generated kernels profit from.
_WHOLE_FOR_ATEN = {aten.silu, aten.gelu}


@functools.lru_cache(maxsize=2)
def decomposition_table(for_aten_runner: bool = False) -> dict:
    return get_decompositions([op for op in _DECOMPOSE if not (for_aten_runner and op in _WHOLE_FOR_ATEN)])
