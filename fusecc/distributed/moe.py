"""Tensor-parallel MoE experts (vLLM's scheme): every rank holds every expert, each expert's
intermediate dimension split across ranks like a dense MLP's.

    w13 [experts, 2 * inter, hidden] -> [experts, 2 * local, hidden]: rows [first, first + local) of the
                                        gate half, then the same rows of the up half (column-parallel)
    w2  [experts, hidden, inter]     -> [experts, hidden, local]: the same columns (row-parallel)

The router is replicated, so every rank picks the same experts for a token; each rank's fused MoE is
then a partial sum over its slice of every chosen expert's intermediate units, and one all-reduce
completes it. No token moves between ranks (expert parallelism would, and pays off only with many
GPUs per model).

Quantized at load (quantization="int8" | "int4" | "fp8"), each rank's slices become a
QuantizedParallelMoEExperts equal to slicing the unsharded experts' quantization: gate/up rows are
whole rows; down's per-channel scales come from the full rows' max |w| (an all-reduce of the slices'
maxima), and int4 groups along the intermediate units must not straddle ranks.
"""

from __future__ import annotations

import torch
from torch import nn

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.fused_moe)
from fusecc.distributed.collectives import all_reduce, all_reduce_max
from fusecc.distributed.shard import input_columns, shard_range
from fusecc.distributed.state import TPGroup
from fusecc.quantization.experts import (QuantizedMoEExperts, empty_expert_parts, expert_weight_format,
                                         quantize_expert_weights)


def _copy_expert_slice(experts: nn.Module, param: nn.Parameter, expert: int, shard: int | None,
                       full: torch.Tensor) -> None:
    """This rank's part of one expert's full checkpoint tensor into `param`: gate or up (shard 0 / 1)
    [inter, ...] -> its rows of that half; down [hidden, inter / per] -> its input columns (a float
    weight, packed int4 words, scale groups; shard.py's input_columns)."""
    first, local = experts.first, experts.intermediate
    if shard is not None:
        param.data[expert].narrow(0, shard * local, local).copy_(full.narrow(0, first, local))
    else:
        param.data[expert].copy_(input_columns(full, first, local, experts.full_intermediate))


class ParallelMoEExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp: TPGroup, dtype=None,
                 device=None) -> None:
        super().__init__()
        self.tp, self.num_experts, self.full_intermediate = tp, num_experts, intermediate
        self.first, self.intermediate = shard_range(intermediate, tp.rank, tp.size, "moe intermediate_size")
        kw = dict(dtype=dtype, device=device)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden, **kw),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, self.intermediate, **kw), requires_grad=False)
        for p in self.parameters():
            p.weight_loader, p.expert_loader = self.weight_loader, self.expert_loader

    def expert_loader(self, param: nn.Parameter, expert: int, shard: int | None, full: torch.Tensor,
                      name: str) -> None:
        """A per-expert checkpoint tensor (moe.py's MoEForCausalLM._load_experts calls this): gate or up
        [inter, hidden] -> this rank's rows of that half, down [hidden, inter] -> its columns."""
        gate_up = param is self.gate_up_proj
        hidden = param.shape[2] if gate_up else param.shape[1]
        want = (self.full_intermediate, hidden) if gate_up else (hidden, self.full_intermediate)
        if tuple(full.shape) != want:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(full.shape)}; the model's config expects "
                             f"{want}")
        _copy_expert_slice(self, param, expert, shard, full)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        """Stacked checkpoint tensors (transformers 5's own layout): w13 [E, 2 * inter, H] or w2 [E, H, inter]."""
        E, inter = self.num_experts, self.full_intermediate
        if param is self.gate_up_proj:
            if full.shape != (E, 2 * inter, param.shape[2]):
                raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit stacked gate_up "
                                 f"({E}, {2 * inter}, {param.shape[2]})")
            for half in (0, 1):
                rows = full.narrow(1, half * inter + self.first, self.intermediate)
                param.data.narrow(1, half * self.intermediate, self.intermediate).copy_(rows)
            return
        if full.shape != (E, param.shape[1], inter):
            raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit stacked down "
                             f"({E}, {param.shape[1]}, {inter})")
        param.data.copy_(full.narrow(2, self.first, self.intermediate))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] (replicated) -> this rank's slice of every chosen expert -> summed over ranks
        partial = torch.ops.fusecc.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return all_reduce(partial, self.tp.group_name)

    @torch.no_grad()
    def quantized(self, quant) -> "QuantizedParallelMoEExperts":
        """This rank's loaded float slices, quantized round-to-nearest (see the module docstring)."""
        if quant.group_size != -1 and self.intermediate % quant.group_size:
            raise ValueError(f"{self.intermediate} expert intermediate units per rank are not a multiple of the "
                             f"{quant.method} group size {quant.group_size}")
        down_amax = all_reduce_max(self.down_proj.abs().amax(-1, keepdim=True).float(), self.tp.group_name)
        experts = QuantizedParallelMoEExperts(self.tp, expert_weight_format(quant), quant.group_size,
                                              quantize_expert_weights(self.gate_up_proj, quant),
                                              quantize_expert_weights(self.down_proj, quant, down_amax))
        experts.first, experts.full_intermediate = self.first, self.full_intermediate
        return experts


class QuantizedParallelMoEExperts(QuantizedMoEExperts):
    """A rank's quantized expert slices: the partial fused MoE, then the all-reduce."""

    def __init__(self, tp: TPGroup, *args) -> None:
        super().__init__(*args)
        self.tp = tp

    @classmethod
    def empty(cls, num_experts: int, hidden: int, intermediate: int, tp: TPGroup, quant,
              device) -> "QuantizedParallelMoEExperts":
        """Uninitialised slices in a quantized checkpoint's format; its per-expert tensors (converted to
        fusecc's layouts) are sliced in by expert_loader: gate/up parts by rows, down parts by input columns."""
        first, local = shard_range(intermediate, tp.rank, tp.size, "moe intermediate_size")
        weight_format, gate_up, down = empty_expert_parts(num_experts, local, hidden, quant, device)
        experts = cls(tp, weight_format, quant.group_size, gate_up, down)
        experts.first, experts.full_intermediate = first, intermediate
        for p in experts.parameters():
            p.expert_loader = experts.expert_loader
        return experts

    def expert_loader(self, param: nn.Parameter, expert: int, shard: int | None, full: torch.Tensor,
                      name: str) -> None:
        if shard is not None and full.shape[0] != self.full_intermediate:
            raise ValueError(f"checkpoint tensor {name!r} has {full.shape[0]} rows; the config has "
                             f"{self.full_intermediate} intermediate units")
        _copy_expert_slice(self, param, expert, shard, full)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x, topk_weights, topk_ids), self.tp.group_name)
