"""One fusion group (a small FX GraphModule) -> the source of one Triton kernel.

Every node of the group is a function from an index to a value, emitted on demand: a consumer
asks for its producer's value at the index it reads (through views, broadcasting and cat
offsets), and loads happen only at group inputs. Two iteration spaces exist:

    pointwise:  xindex = one element per lane;        outputs all of the group's shape
    reduction:  xindex = one row per lane (XBLOCK rows), rindex = the whole last dim (RBLOCK),
                reductions are tl.sum/max/min over axis 1, epilogues read them per row.

Example (RMSNorm, a reduction group) as generated:

    tmp0 = tl.load(in_ptr0 + (xindex * 64 + rindex), xmask & rmask, other=0).to(tl.float32)
    tmp1 = (tmp0 * tmp0).to(tl.float32)
    tmp2 = tl.sum(tl.where(xmask & rmask, tmp1, 0), 1)[:, None]
    tmp3 = (tmp2 / 64).to(tl.float32)
    ...
    tl.store(out_ptr0 + (xindex * 64 + rindex), tmp7.to(tl.float16), xmask & rmask)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

from fusecc.codegen.expr_printer import print_expr
from fusecc.codegen.index_math import (CodegenUnsupported, broadcast_index, contiguous_strides, product,
                                       reshape_index, shape_of, strided_offset, sym, view_input_index)
from fusecc.codegen.lowerings import (COMPUTE_DTYPE, POINTWISE, REDUCTIONS, STORAGE_DTYPE, classify, convert_dtype,
                                     literal, operand_conversions, to_dtype)

aten = torch.ops.aten

XINDEX = sympy.Symbol("xindex", integer=True, nonnegative=True)
RINDEX = sympy.Symbol("rindex", integer=True, nonnegative=True)


@dataclass
class KernelSource:
    name: str
    source: str
    kind: str                          # "pointwise" | "reduction"
    size_args: list[sympy.Symbol]      # shape symbols passed as int arguments, in order
    numel: sympy.Expr                  # elements (pointwise) or rows (reduction)
    xblock: int
    rblock: Optional[int]
    num_warps: int
    num_inputs: int
    num_outputs: int
    structure_hash: str = field(default="")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class KernelWriter:
    def __init__(self, group: fx.GraphModule, emulate_precision_casts: bool = True):
        self.group = group
        self.emulate_precision_casts = emulate_precision_casts
        self.nodes = list(group.graph.nodes)
        self.outputs = list(_flat_outputs(group))
        # index_copy_ into an input: stores of `src` to the rows `index` of `dest` (no output buffer)
        self.scatters = [n for n in self.nodes if n.op == "call_function" and n.target is aten.index_copy_.default]
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.tensor_inputs = [n for n in self.placeholders if isinstance(n.meta["val"], torch.Tensor)]
        # what the kernel iterates over: its outputs, or the sources it scatters
        anchors = self.outputs + [x.args[3] for x in self.scatters]
        if not anchors:
            raise CodegenUnsupported("a group with no outputs")
        device = anchors[0].meta["val"].device
        for inp in self.tensor_inputs:
            if inp.meta["val"].device != device:
                # e.g. a CPU scalar tensor mixed into CUDA math: eager allows it, a kernel cannot load it.
                raise CodegenUnsupported(f"input {inp.name} is on {inp.meta['val'].device}, the kernel on {device}")
        self.lines: list[str] = []
        self.memo: dict = {}
        self.counter = 0
        self.symbols: set[sympy.Symbol] = set()
        reductions = [n for n in self.nodes if n.op == "call_function" and n.target in REDUCTIONS]
        if reductions:
            src_shape = shape_of(reductions[0].args[0])
            self.kind = "reduction"
            self.rows_shape, self.rnumel = src_shape[:-1], src_shape[-1]
            if not self.rnumel.is_Integer:
                raise CodegenUnsupported("reduction over a symbolic size")
            for r in reductions[1:]:
                if shape_of(r.args[0]) != src_shape:
                    raise CodegenUnsupported("reductions of different shapes in one group")
            self.row_vars = self._split(XINDEX, self.rows_shape, "x")
            self.full_shape = list(self.rows_shape) + [self.rnumel]
        else:
            self.kind = "pointwise"
            self.full_shape = shape_of(anchors[0])
            self.row_vars = self._split(XINDEX, self.full_shape, "x")
        if self.scatters and self.kind != "pointwise":
            raise CodegenUnsupported("index_copy_ in a reduction kernel")

    # ------------------------------------------------------------------ iteration variables

    def _split(self, flat: sympy.Symbol, shape: Sequence[sympy.Expr], prefix: str) -> list[sympy.Expr]:
        strides = contiguous_strides(shape)
        out = []
        for k, (size, stride) in enumerate(zip(shape, strides)):
            if size == 1:
                out.append(sympy.Integer(0))
            elif k == 0:
                out.append(FloorDiv(flat, stride) if stride != 1 else flat)
            else:
                out.append(ModularIndexing(flat, stride, size))
        return out

    def _full_index(self) -> list[sympy.Expr]:
        if self.kind == "reduction":
            return list(self.row_vars) + [RINDEX]
        return list(self.row_vars)

    def _flat_equivalent(self, offset: sympy.Expr) -> sympy.Expr:
        """Rewrite an offset equal to the contiguous flat index as xindex (+ rindex) so loads of
        contiguous data use no div/mod at all."""
        if self.kind == "pointwise":
            flat_vars = self.row_vars
            strides = contiguous_strides(self.full_shape)
            flat, replacement = sum((v * s for v, s in zip(flat_vars, strides)), sympy.Integer(0)), XINDEX
        else:
            strides = contiguous_strides(self.rows_shape)
            flat = sum((v * s * self.rnumel for v, s in zip(self.row_vars, strides)), sympy.Integer(0)) + RINDEX
            replacement = XINDEX * self.rnumel + RINDEX
        candidates = [(flat, replacement)]
        if self.kind == "reduction":  # per-row values: the flat row index alone
            row_flat = sum((v * s for v, s in zip(self.row_vars, strides)), sympy.Integer(0))
            candidates.append((row_flat, XINDEX))
        for pattern, simple in candidates:
            rest = sympy.expand(offset - sympy.expand(pattern))
            if not rest.free_symbols & {XINDEX, RINDEX} and not rest.has(FloorDiv, ModularIndexing):
                return simple + rest
        return offset

    # ------------------------------------------------------------------ emission helpers

    def _tmp(self, expr: str) -> str:
        name = f"tmp{self.counter}"
        self.counter += 1
        self.lines.append(f"{name} = {expr}")
        return name

    def _print(self, expr: sympy.Expr) -> str:
        expr = sympy.sympify(expr)
        self.symbols |= {s for s in expr.free_symbols if s not in (XINDEX, RINDEX)}
        return print_expr(expr)

    def _mask_for(self, offset: sympy.Expr, extra: Optional[str]) -> Optional[str]:
        parts = []
        if XINDEX in offset.free_symbols:
            parts.append("xmask")
        if RINDEX in offset.free_symbols:
            parts.append("rmask")
        if extra:
            parts.append(extra)
        return " & ".join(parts) if parts else None

    # ------------------------------------------------------------------ values

    def value(self, node, index: Sequence[sympy.Expr], mask: Optional[str] = None) -> str:
        if not isinstance(node, fx.Node):
            return literal(node)
        index = [sympy.expand(e) if not e.has(FloorDiv, ModularIndexing) else e for e in index]
        key = (node, tuple(index), mask)
        if key in self.memo:
            return self.memo[key]
        result = self._compute(node, index, mask)
        self.memo[key] = result
        return result

    def _compute(self, node: fx.Node, index: list, mask: Optional[str]) -> str:
        val = node.meta["val"]
        if node.op == "placeholder":
            if isinstance(val, (torch.SymInt, int)):
                return self._print(sym(val))
            return self._load(node, index, mask)
        if node.op != "call_function":
            raise CodegenUnsupported(f"unexpected node {node.format_node()}")
        if isinstance(val, torch.SymInt):
            return self._print(sym(val))
        kind = classify(node).kind
        if kind == "view":
            return self.value(node.args[0], view_input_index(node, index), mask)
        if kind == "cat":
            return self._cat(node, index, mask)
        if kind == "pointwise":
            out_shape = shape_of(node)
            args = [self._arg(a, index, out_shape, mask) for a in node.args]
            kwargs = {k: self._arg(v, index, out_shape, mask) for k, v in node.kwargs.items()}
            for i, dtype in operand_conversions(node).items():
                args[i] = self._tmp(to_dtype(args[i], dtype))
            result = self._tmp(POINTWISE[node.target](*args, node=node, **kwargs))
            return result if POINTWISE[node.target] is convert_dtype else self._round(result, val)
        if node.target in REDUCTIONS:
            return self._round(self._reduction(node, index, mask), val)
        raise CodegenUnsupported(f"{node.target} cannot be generated")

    def _round(self, value: str, val: torch.Tensor) -> str:
        """fp16/bf16 results are computed in fp32; eager rounds each op's result to its dtype, and
        with emulate_precision_casts so do we (a cast node already rounds: convert_dtype)."""
        if not self.emulate_precision_casts or val.dtype not in (torch.float16, torch.bfloat16):
            return value
        return self._tmp(f"{value}.to({STORAGE_DTYPE[val.dtype]}).to(tl.float32)")

    def _arg(self, arg, index, out_shape, mask):
        if isinstance(arg, fx.Node):
            arg_val = arg.meta["val"]
            if isinstance(arg_val, torch.Tensor):
                return self.value(arg, broadcast_index(shape_of(arg), index, out_shape), mask)
            return self.value(arg, [], mask)
        if isinstance(arg, (int, float, bool)) and not isinstance(arg, torch.SymInt):
            return literal(arg)
        if isinstance(arg, torch.SymInt):
            return self._print(sym(arg))
        return arg  # dtypes, lists of sizes, memory formats: consumed by the emitter as they are

    def _load(self, node: fx.Node, index: list, mask: Optional[str]) -> str:
        val = node.meta["val"]
        ptr = f"in_ptr{self.tensor_inputs.index(node)}"
        offset = self._flat_equivalent(strided_offset(val, index))
        # one element for every lane (a 0-d tensor, a broadcast one, a one-element cat piece): a
        # scalar load, always in bounds, and a block mask would not fit a scalar pointer
        scalar = not ({XINDEX, RINDEX} & sympy.sympify(offset).free_symbols)
        mask_expr = None if scalar else self._mask_for(offset, mask)
        other = "" if mask_expr is None else f", {mask_expr}, other=0"
        # a scalar is loaded as a block of one address (in bounds for every lane, so unmasked):
        # mixing a 0-d value with block masks in `&`, `|` and comparisons breaks the interpreter
        broadcast = " + 0 * xindex" if scalar else ""
        load = f"tl.load({ptr} + {self._print(offset)}{broadcast}{other})"
        return self._tmp(f"{load}.to({COMPUTE_DTYPE[val.dtype]})")

    def _cat(self, node: fx.Node, index: list, mask: Optional[str]) -> str:
        tensors = node.args[0]
        rank = len(index)
        dim = (node.args[1] if len(node.args) > 1 else 0) % rank
        pieces, start = [], sympy.Integer(0)
        for t in tensors:
            t_shape = shape_of(t)
            if len(t_shape) == 1 and t_shape[0] == 0 and rank != 1:
                continue  # legacy cat: a 1-D empty tensor is skipped whatever the rank
            size = t_shape[dim]
            if size == 0:
                continue
            pieces.append((t, start, size))
            start = start + size
        position = self._print(index[dim])
        result = None
        for t, begin, size in reversed(pieces):
            cond = f"(({position}) >= {self._print(begin)}) & (({position}) < {self._print(begin + size)})"
            sub_index = list(index)
            sub_index[dim] = index[dim] - begin
            sub_mask = f"({cond})" if mask is None else f"({mask}) & ({cond})"
            # the other dims of a piece broadcast to the output's; along `dim` it is read at sub_index
            piece_shape = shape_of(t)
            piece_shape[dim] = shape_of(node)[dim]
            piece_index = broadcast_index(piece_shape, sub_index, shape_of(node))
            piece = self.value(t, piece_index, sub_mask)
            if t.meta["val"].dtype != node.meta["val"].dtype:
                # tl.where would promote by Triton's rules (uint8 with int8 -> uint8), not torch's
                piece = self._tmp(to_dtype(piece, node.meta["val"].dtype))
            result = piece if result is None else self._tmp(f"tl.where({cond}, {piece}, {result})")
        if result is None:
            raise CodegenUnsupported("cat of empty tensors")
        return result

    def _reduction(self, node: fx.Node, index: list, mask: Optional[str]) -> str:
        if self.kind != "reduction":
            raise CodegenUnsupported("reduction in a pointwise group")
        spec = REDUCTIONS[node.target]
        keepdim = spec.keepdim_arg is not None and len(node.args) > spec.keepdim_arg and bool(node.args[spec.keepdim_arg])
        outer = list(index[:-1]) if keepdim else list(index)
        if [sympy.simplify(a - b) for a, b in zip(outer, self.row_vars)] != [0] * len(outer) or \
                len(outer) != len(self.row_vars):
            raise CodegenUnsupported("a reduction result read at another row than its own")
        # The whole row, whatever lanes the consumer needs (`mask`: e.g. a cat piece's slot): a
        # reduction's value does not depend on where it is read.
        src = self.value(node.args[0], list(self.row_vars) + [RINDEX], None)
        full_mask = "xmask & rmask"
        reduced = self._tmp(f"{spec.combine}(tl.where({full_mask}, {src}, {spec.identity}), 1)[:, None]")
        if spec.propagate_nan:
            has_nan = self._tmp(f"tl.max(tl.where({full_mask} & ({src} != {src}), 1, 0), 1)[:, None] > 0")
            reduced = self._tmp(f'tl.where({has_nan}, float("nan"), {reduced})')
        if spec.mean or spec.variance:
            reduced = self._tmp(f"{reduced} / {self._print(self.rnumel)}")
        if spec.variance:
            correction = node.args[2] if len(node.args) > 2 else 1
            centered = self._tmp(f"tl.where({full_mask}, {src} - {reduced}, 0)")
            squares = self._tmp(f"tl.sum({centered} * {centered}, 1)[:, None]")
            # eager divides by max(0, N - correction): inf (or NaN for a constant row) when <= 0
            reduced = self._tmp(f"{squares} / {literal(float(max(0, int(self.rnumel) - correction)))}")
        return reduced

    # ------------------------------------------------------------------ whole kernel

    def _store_index(self, out: fx.Node) -> tuple[list, str]:
        shape = shape_of(out)
        if self.kind == "pointwise":
            if shape == list(self.full_shape):
                return self._full_index(), "xmask"
            if sympy.simplify(product(shape) - product(self.full_shape)) != 0:
                raise CodegenUnsupported(f"output of shape {shape} in a kernel over {self.full_shape}")
            # Same number of elements: lane i stores the i-th element (row-major) of this output.
            return reshape_index(shape, self.full_shape, self._full_index()), "xmask"
        if shape == list(self.full_shape):
            return self._full_index(), "xmask & rmask"
        if shape == list(self.rows_shape) + [1]:
            return list(self.row_vars) + [sympy.Integer(0)], "xmask"
        if shape == list(self.rows_shape):
            return list(self.row_vars), "xmask"
        raise CodegenUnsupported(f"output of shape {shape} in a reduction over rows {self.rows_shape}")

    def _scatter_store(self, node: fx.Node) -> str:
        """`dest.index_copy_(dim, index, src)`: lane i computes src at its index and stores it to
        dest at the same index except along `dim`, where the row is index[...]; rows out of
        range are not written (eager raises there; a kernel must not write past the cache)."""
        dest, dim, index_node, src = node.args
        dest_val = dest.meta["val"]
        dim = dim % dest_val.dim()
        index, mask = self._store_index(src)
        value = self.value(src, index)
        row = self.value(index_node, [index[dim]])
        if index_node.meta["val"].dtype != torch.int64:
            row = self._tmp(f"{row}.to(tl.int64)")  # 64-bit offsets into large caches
        base = list(index)
        base[dim] = sympy.Integer(0)
        offset = self._print(strided_offset(dest_val, base))
        rows, stride = self._print(sym(dest_val.shape[dim])), self._print(sym(dest_val.stride()[dim]))
        in_range = f"({row} >= 0) & ({row} < {rows})"
        ptr = f"in_ptr{self.tensor_inputs.index(dest)}"
        return (f"tl.store({ptr} + {offset} + {row} * {stride}, {value}.to({STORAGE_DTYPE[dest_val.dtype]}), "
                f"{mask} & {in_range})")

    def write(self) -> KernelSource:
        if self.kind == "reduction" and int(self.rnumel) == 0:
            # nothing to load; a stride-0 operand's offset has no rindex, so rmask would not guard it
            raise CodegenUnsupported("reduction over zero elements")
        stores = []
        for i, out in enumerate(self.outputs):
            out_val = out.meta["val"]
            index, mask = self._store_index(out)
            value = self.value(out, index)
            flat = self._flat_equivalent(strided_offset(out_val, index))
            offset = self._print(flat)
            if "rmask" in mask and RINDEX not in sympy.sympify(flat).free_symbols:
                # an output that does not vary along the row (an expanded view): every lane of the
                # row stores the same value; the pointer must still have the mask's [X, R] shape
                offset = f"{offset} + 0 * rindex"
            stores.append(f"tl.store(out_ptr{i} + {offset}, "
                          f"{value}.to({STORAGE_DTYPE[out_val.dtype]}), {mask})")
        stores += [self._scatter_store(x) for x in self.scatters]
        numel = product(self.rows_shape if self.kind == "reduction" else self.full_shape)
        self._print(numel)
        size_args = sorted(self.symbols, key=lambda s: s.name)
        params = ([f"in_ptr{i}" for i in range(len(self.tensor_inputs))]
                  + [f"out_ptr{i}" for i in range(len(self.outputs))]
                  + [s.name for s in size_args] + ["xnumel", "XBLOCK: tl.constexpr"])
        header = ["xoffset = tl.program_id(0).to(tl.int64) * XBLOCK"]
        if self.kind == "pointwise":
            header += ["xindex = xoffset + tl.arange(0, XBLOCK)", "xmask = xindex < xnumel"]
            rblock = None
        else:
            params.append("RBLOCK: tl.constexpr")
            rblock = next_power_of_2(int(self.rnumel))
            header += ["xindex = xoffset + tl.arange(0, XBLOCK)[:, None]", "xmask = xindex < xnumel",
                       "rindex = tl.arange(0, RBLOCK)[None, :]", f"rmask = rindex < {int(self.rnumel)}"]
        body = "\n".join("    " + line for line in header + self.lines + stores)
        signature = ", ".join(params)
        structure = f"{signature}\n{body}"
        digest = hashlib.sha256(structure.encode()).hexdigest()
        name = f"fused_{self.kind}_{digest[:16]}"
        # a dynamic xnumel only bounds the mask: Triton's specialisation on it (== 1, % 16) would
        # compile a second variant mid-serving, the first time a step's size is a multiple of 16
        jit = "@triton.jit" if numel.is_Integer else '@triton.jit(do_not_specialize=["xnumel"])'
        source = ("import triton\nimport triton.language as tl\n\n\n"
                  f"{jit}\ndef {name}({signature}):\n{body}\n")
        xblock, num_warps = self._launch_config(numel, rblock)
        return KernelSource(name=name, source=source, kind=self.kind, size_args=size_args, numel=numel,
                            xblock=xblock, rblock=rblock, num_warps=num_warps,
                            num_inputs=len(self.tensor_inputs), num_outputs=len(self.outputs),
                            structure_hash=digest)

    def _launch_config(self, numel: sympy.Expr, rblock: Optional[int]) -> tuple[int, int]:
        if rblock is None:
            xblock = 1024 if not numel.is_Integer else max(16, min(1024, next_power_of_2(int(numel))))
            return xblock, 4 if xblock >= 256 else 2
        xblock = max(1, min(16, 2048 // rblock))
        if numel.is_Integer:
            xblock = min(xblock, next_power_of_2(int(numel)))
        num_warps = 8 if rblock >= 4096 else 4 if rblock >= 512 else 2
        return xblock, num_warps


def _flat_outputs(group: fx.GraphModule) -> list[fx.Node]:
    out = group.graph.output_node().args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]
