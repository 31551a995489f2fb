"""Index math for generated kernels, in sympy.

Inside a fused kernel a view never moves data: it maps the index at which its output is read to
the index of its input (`view_input_index`). A load from a materialised tensor turns a logical
index into an element offset through that tensor's strides (`strided_offset`). Sizes and
strides come from `meta['val']`, so they are ints for static shapes and sympy expressions over
the shape environment's symbols (s0, s1, ...) for dynamic ones; those symbols become kernel
arguments, which is why a new sequence length needs no recompilation.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

aten = torch.ops.aten
prims = torch.ops.prims


class CodegenUnsupported(Exception):
    """This group cannot be generated; the caller falls back to running it with ATen."""


def sym(value) -> sympy.Expr:
    """An int or SymInt as a sympy expression."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, int):
        return sympy.Integer(value)
    if isinstance(value, sympy.Expr):
        return value
    raise CodegenUnsupported(f"not an integer size: {value!r}")


def shape_of(node_or_val) -> list[sympy.Expr]:
    val = node_or_val.meta["val"] if isinstance(node_or_val, fx.Node) else node_or_val
    return [sym(s) for s in val.shape]


def product(values: Sequence[sympy.Expr]) -> sympy.Expr:
    return functools.reduce(operator.mul, values, sympy.Integer(1))


def contiguous_strides(shape: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    strides, running = [], sympy.Integer(1)
    for size in reversed(shape):
        strides.append(running)
        running = running * size
    return list(reversed(strides))


def strided_offset(val: torch.Tensor, index: Sequence[sympy.Expr]) -> sympy.Expr:
    """Element offset from the tensor's data pointer (which already includes its storage offset)."""
    offset = sympy.Integer(0)
    for i, (size, stride) in enumerate(zip(val.shape, val.stride())):
        if sym(size) == 1:
            continue  # a size-1 dim contributes nothing, whatever its stride
        offset = offset + index[i] * sym(stride)
    return sympy.expand(offset)


def broadcast_index(in_shape: Sequence[sympy.Expr], out_index: Sequence[sympy.Expr],
                    out_shape: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """Index into an input that broadcasts (right-aligned, size-1 dims) to the output shape."""
    lead = len(out_shape) - len(in_shape)
    if lead < 0:
        raise CodegenUnsupported("input has more dims than the output")
    return [sympy.Integer(0) if broadcasts(size, out_shape[lead + i]) else out_index[lead + i]
            for i, size in enumerate(in_shape)]


def broadcasts(size: sympy.Expr, out_size: sympy.Expr) -> bool:
    """Whether an input dim of `size` is broadcast (read at 0) to an output dim of `out_size`.
    A symbolic size that differs from the output's can only be valid as 1 (tracing guarded on
    it), but which case holds is not visible here: such a dim is left to ATen rather than guessed."""
    size, out_size = sym(size), sym(out_size)
    if size == out_size or sympy.expand(size - out_size) == 0:
        return False
    if size == 1:
        return True
    raise CodegenUnsupported(f"cannot tell whether a dim of size {size} broadcasts to {out_size}")


def reshape_index(in_shape: Sequence[sympy.Expr], out_shape: Sequence[sympy.Expr],
                  out_index: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """Index of a row-major reshape's input. Dims are matched in groups of equal product so a
    reshape that merges or splits some dims keeps simple index expressions for the rest."""
    in_index: list[sympy.Expr] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [i], [j]
        if i >= len(in_shape):  # trailing size-1 output dims
            j += 1
            continue
        if j >= len(out_shape):
            in_index.append(sympy.Integer(0))
            i += 1
            continue
        pin, pout = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while sympy.simplify(pin - pout) != 0:
            if _le(pin, pout) and i < len(in_shape):
                pin, gi = pin * in_shape[i], gi + [i]
                i += 1
            elif j < len(out_shape):
                pout, gj = pout * out_shape[j], gj + [j]
                j += 1
            else:
                raise CodegenUnsupported(f"cannot match reshape {list(in_shape)} -> {list(out_shape)}")
        out_sizes = [out_shape[k] for k in gj]
        linear = sum((out_index[k] * s for k, s in zip(gj, contiguous_strides(out_sizes))), sympy.Integer(0))
        in_sizes = [in_shape[k] for k in gi]
        for pos, (size, stride) in enumerate(zip(in_sizes, contiguous_strides(in_sizes))):
            if size == 1:
                in_index.append(sympy.Integer(0))
            elif len(gi) == 1:
                in_index.append(linear)
            elif pos == 0:
                in_index.append(FloorDiv(linear, stride))
            else:
                in_index.append(ModularIndexing(linear, stride, size))
    return in_index


def _le(a: sympy.Expr, b: sympy.Expr) -> bool:
    try:
        return bool(a <= b)
    except TypeError:  # symbolic: compare structurally, smaller expression first
        return sympy.count_ops(a) <= sympy.count_ops(b)


def view_input_index(node: fx.Node, out_index: Sequence[sympy.Expr]) -> list[sympy.Expr]:
    """The index into `node.args[0]` read when `node` (a view op) is read at `out_index`."""
    target = node.target
    in_shape = shape_of(node.args[0])
    out_shape = shape_of(node)
    rank_in = len(in_shape)
    if target in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        return reshape_index(in_shape, out_shape, out_index)
    if target is aten.alias.default:
        return list(out_index)
    if target is aten.permute.default:
        dims = [d % rank_in for d in node.args[1]]
        in_index = [sympy.Integer(0)] * rank_in
        for k, d in enumerate(dims):
            in_index[d] = out_index[k]
        return in_index
    if target in (aten.transpose.int, aten.t.default):
        if rank_in < 2:
            return list(out_index)
        d0, d1 = (node.args[1] % rank_in, node.args[2] % rank_in) if target is aten.transpose.int else (0, 1)
        in_index = list(out_index)
        in_index[d0], in_index[d1] = out_index[d1], out_index[d0]
        return in_index
    if target is aten.expand.default:
        return broadcast_index(in_shape, out_index, out_shape)
    if target is prims.broadcast_in_dim.default:
        dims = node.args[2]
        return [sympy.Integer(0) if broadcasts(size, out_shape[d]) else out_index[d]
                for size, d in zip(in_shape, dims)]
    if target is aten.unsqueeze.default:
        dim = node.args[1] % (rank_in + 1)
        return [e for k, e in enumerate(out_index) if k != dim]
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        if target is aten.squeeze.default:
            dims = range(rank_in)
        elif target is aten.squeeze.dim:
            dims = [node.args[1]]
        else:
            dims = node.args[1]
        squeezed = {d % rank_in for d in dims if in_shape[d % rank_in] == 1} if rank_in else set()
        remaining = iter(out_index)
        return [sympy.Integer(0) if k in squeezed else next(remaining) for k in range(rank_in)]
    if target is aten.slice.Tensor:
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank_in
        start = node.args[2] if len(node.args) > 2 else None
        step = node.args[4] if len(node.args) > 4 else 1
        start_expr = _normalize_start(start, in_shape[dim])
        in_index = list(out_index)
        in_index[dim] = start_expr + out_index[dim] * sym(step)
        return in_index
    if target is aten.select.int:
        dim = node.args[1] % rank_in
        index = sym(node.args[2])
        if index.is_number and index < 0:
            index = index + in_shape[dim]
        return list(out_index[:dim]) + [index] + list(out_index[dim:])
    raise CodegenUnsupported(f"no index transform for {target}")


def _normalize_start(start, size: sympy.Expr) -> sympy.Expr:
    if start is None:
        return sympy.Integer(0)
    start = sym(start)
    if start.is_number and start < 0:
        return sympy.Max(start + size, 0)
    if start.is_number and size.is_number and start > size:
        return size
    return start
