"""Megatron-style parallel linears. Each takes the full Hugging Face tensor in `weight_loader`
and keeps its rank's rows (shard.py's rule); the model's forward runs on the local shard.

    qkv = ColumnParallelLinear(hidden, [(q_heads, D), (kv_heads, D), (kv_heads, D)], bias, tp)
    qkv.weight_loader(qkv.weight, hf_k_proj_weight, part=1)   # [kv_heads * D, hidden] -> rank's rows
    q, k, v = qkv(x).split(qkv.local_sizes, dim=-1)           # [T, local q | local k | local v]
    o = RowParallelLinear(q_heads, D, hidden, bias, tp)       # x: [T, local q heads * D] -> [T, hidden]

Column-parallel: W [out, in] split by output rows, no communication (the output stays sharded;
a stacked layer shards each part separately, so every rank gets its own q, k and v heads and its
own gate and up rows, not a slice of the concatenation). Row-parallel: W split by input columns,
the partial products are summed by an all-reduce, and the bias is added once, after it.
"""

from __future__ import annotations

import torch
from torch import nn

from fusecc.distributed.collectives import all_reduce, all_reduce_max
from fusecc.quantization.linear import quantize_weight, quantized_matmul, quantized_weight_parameters
from fusecc.distributed.shard import input_columns, shard_for_rank, shard_range
from fusecc.distributed.state import TPGroup


class _ParallelLinear(nn.Module):
    """What both parallel linears share: a float weight or a quantized one (fusecc/quantization/linear.py:
    qweight/scales/zeros or weight/weight_scale, each with this layer's weight_loader), and the matmul."""

    quant = None  # QuantConfig once quantized

    def _make_weight(self, rows: int, cols: int, quant, dtype, device) -> None:
        self.quant = quant
        if quant is None:
            self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device), requires_grad=False)
        else:
            for name, p in quantized_weight_parameters(cols, rows, quant, device).items():
                self.register_parameter(name, p)
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant is None:
            return nn.functional.linear(x, self.weight, bias)
        return quantized_matmul(x, self, bias, self.quant)

    @torch.no_grad()
    def quantize_(self, quant) -> None:
        """Replace the loaded float weight by its round-to-nearest quantization (quantization="int8" |
        "int4" | "fp8"), equal to this rank's part of the unsharded weight's quantization."""
        self._replace_weight(quant, None)

    def _replace_weight(self, quant, row_amax: torch.Tensor | None) -> None:
        """row_amax: the full rows' max |w| where this rank holds only some of their columns."""
        weight = self.weight
        del self.weight
        self._make_weight(weight.shape[0], weight.shape[1], quant, weight.dtype, weight.device)
        for name, tensor in quantize_weight(weight, quant, row_amax).items():
            if tensor is not None:
                getattr(self, name).copy_(tensor)


class ColumnParallelLinear(_ParallelLinear):
    def __init__(self, input_size: int, parts: list[tuple[int, int]], bias: bool, tp: TPGroup,
                 dtype: torch.dtype | None = None, device=None, quant=None) -> None:
        """parts: (units, rows per unit) of each stacked part, e.g. [(intermediate, 1)] * 2 for
        gate_up or heads of head_dim rows for qkv; a single part is a plain column-parallel linear.
        quant: a quantized checkpoint's format (its converted tensors are loaded into it)."""
        super().__init__()
        self.tp, self.parts = tp, list(parts)
        self.local_sizes = [shard_range(units, tp.rank, tp.size, "heads" if unit > 1 else "rows")[1] * unit
                            for units, unit in self.parts]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(self.parts))]
        kw = dict(dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.empty(sum(self.local_sizes), **kw), requires_grad=False) if bias else None
        self._make_weight(sum(self.local_sizes), input_size, quant, dtype, device)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        """full: the checkpoint tensor of part `part` ([units * unit, in] or its bias [units * unit]);
        quantized tensors (qweight, scales, ...) are output-row first too, and shard the same way."""
        units, unit = self.parts[part]
        if full.shape[0] != units * unit or (param.dim() == 2 and full.shape[1:] != param.shape[1:]):
            raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit part {part} "
                             f"({units} x {unit} rows of {tuple(param.shape[1:])})")
        rows = shard_for_rank(full, 0, self.tp.rank, self.tp.size, unit)
        param.data.narrow(0, self.offsets[part], self.local_sizes[part]).copy_(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] (replicated) -> [T, sum(local_sizes)] (this rank's columns)
        return self._matmul(x, self.bias)


class RowParallelLinear(_ParallelLinear):
    def __init__(self, input_units: int, unit: int, output_size: int, bias: bool, tp: TPGroup,
                 dtype: torch.dtype | None = None, device=None, quant=None) -> None:
        """The input dimension is `input_units` units of `unit` columns (q heads of head_dim for
        o_proj, single columns for down_proj), sharded like the column-parallel layer before it."""
        super().__init__()
        self.tp, self.unit = tp, unit
        self.input_size = input_units * unit
        first, count = shard_range(input_units, tp.rank, tp.size, "heads" if unit > 1 else "rows")
        self.first_column, self.local_columns = first * unit, count * unit
        kw = dict(dtype=dtype, device=device)
        # the full bias on every rank, added after the all-reduce (so once, not world times)
        self.bias = nn.Parameter(torch.empty(output_size, **kw), requires_grad=False) if bias else None
        self._make_weight(output_size, self.local_columns, quant, dtype, device)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        if param is self.bias:
            param.data.copy_(full)
            return
        if full.dim() != 2 or full.shape[0] != param.shape[0]:
            raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit a row-parallel "
                             f"weight of {param.shape[0]} rows")
        param.data.copy_(self._columns(full))

    @torch.no_grad()
    def quantize_(self, quant) -> None:
        """As the column-parallel layer's, but this rank holds some columns of each row: per-channel
        scales come from the full rows' max |w| (an all-reduce of the shards' maxima), and int4 groups
        must not straddle ranks (ValueError)."""
        if quant.group_size != -1 and self.local_columns % quant.group_size:
            raise ValueError(f"{self.local_columns} input columns per rank are not a multiple of the {quant.method} "
                             f"group size {quant.group_size}")
        amax = self.weight.abs().amax(dim=1, keepdim=True).float()
        self._replace_weight(quant, all_reduce_max(amax, self.tp.group_name))

    def _columns(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's input columns of a full weight, packed weight, or its scales / zeros."""
        return input_columns(full, self.first_column, self.local_columns, self.input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, local in] -> partial [T, out] -> summed over ranks
        y = all_reduce(self._matmul(x, None), self.tp.group_name)
        return y if self.bias is None else y + self.bias
