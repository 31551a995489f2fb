"""What the Triton code generator can compute inside a fused kernel, and how.

Four kinds of fusible ops:
- pointwise: `POINTWISE[op](*arg_exprs, node=node) -> str`, a Triton expression over the
  already-loaded argument values (all of the node's iteration shape);
- views: pure index transforms (view/reshape/permute/expand/slice/...), handled in
  index_math.py (`view_input_index`) — they never move data inside a kernel;
- reductions: `REDUCTIONS[op]` over the last dimension, persistent (whole row in registers);
- `index_copy_` into a graph input (a KV-cache write): a scatter store of the kernel that
  computes its source, so the source is never materialised.

Everything else is an extern call (matmuls, attention: better hand-written kernels exist) or an
ATen fallback, and `classify(node)` says which, with the reason the dump shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from fusecc.codegen.index_math import CodegenUnsupported
from fusecc.graph.op_counts import op_name

aten = torch.ops.aten
prims = torch.ops.prims

# Low-precision floats are computed in fp32 inside kernels and rounded at explicit casts and stores.
COMPUTE_DTYPE = {
    torch.float16: "tl.float32", torch.bfloat16: "tl.float32", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.int16: "tl.int16",
    torch.int32: "tl.int32", torch.int64: "tl.int64", torch.bool: "tl.int1",
}
STORAGE_DTYPE = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.int16: "tl.int16",
    torch.int32: "tl.int32", torch.int64: "tl.int64", torch.bool: "tl.int1",
}

# Largest reduced dimension kept in registers by a persistent reduction kernel.
MAX_PERSISTENT_REDUCTION = 16384


def literal(value, dtype: torch.dtype | None = None) -> str:
    """A Python scalar as Triton source."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        if value == 0.0 and math.copysign(1.0, value) < 0:
            # Triton turns the literal -0.0 into +0.0 (on the GPU too: x / -0.0 gave +inf)
            raise CodegenUnsupported("a -0.0 constant (Triton drops its sign)")
        return repr(value)
    raise TypeError(f"unsupported literal {value!r}")


def _dt(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def _cast(expr: str, node: fx.Node) -> str:
    return f"({expr}).to({COMPUTE_DTYPE[_dt(node)]})"


def _binary(op: str) -> Callable:
    def emit(a, b, *, node, alpha="1"):
        alpha = str(alpha)  # the writer passes literals as source ("2", "0.5", 'float("inf")')
        if op == "+" and _dt(node) == torch.bool:
            # bool + bool is logical or in eager; Triton adds int1 values in int1 (1 + 1 wraps to 0)
            return f"(({a} != 0) | ({b} != 0))" if alpha not in ("0", "False") else f"({a} != 0)"
        if alpha not in ("1", "True"):
            b = f"({b} * {alpha})"
        return _cast(f"{a} {op} {b}", node)
    return emit


def _true_div(a, b, *, node, rounding_mode=None):
    if rounding_mode is not None:
        raise NotImplementedError("div with rounding_mode")
    return _cast(f"{_float(a, node)} / {_float(b, node)}", node)


def _float(expr: str, node: fx.Node) -> str:
    if _is_literal(expr):
        return expr  # a Python number: Triton promotes it where it meets a tensor
    return f"({expr}).to({COMPUTE_DTYPE[_dt(node)]})"


def _is_literal(expr: str) -> bool:
    try:
        float(expr)
        return True
    except ValueError:
        return expr.startswith("float(")


def _unary(fn: str) -> Callable:
    def emit(a, *, node):
        return _cast(f"{fn}({_float(a, node)})", node)
    return emit


def _pow_scalar(a, exponent, *, node):
    exponent = float(exponent) if isinstance(exponent, str) else exponent  # the writer passes literals as source
    if exponent == 2:
        return _cast(f"{a} * {a}", node)
    if exponent == 3:
        return _cast(f"{a} * {a} * {a}", node)
    if exponent == 1:
        return _cast(a, node)
    if exponent == -1:
        return _cast(f"1.0 / {_float(a, node)}", node)
    if exponent == 0.5 and _dt(node) in (torch.float32, torch.float64):
        return _cast(f"tl.sqrt({_float(a, node)})", node)
    if exponent == -0.5 and _dt(node) in (torch.float32, torch.float64):
        return _cast(f"1.0 / tl.sqrt({_float(a, node)})", node)
    raise NotImplementedError(f"pow with exponent {exponent!r}")


def _where(cond, a, b, *, node):
    return _cast(f"tl.where({cond} != 0, {a}, {b})", node)


def _maximum(a, b, *, node):
    # torch.maximum propagates NaN; Triton's does not by default.
    return _cast(f"tl.where(({a} != {a}) | ({a} > {b}), {a}, {b})", node)


def _minimum(a, b, *, node):
    return _cast(f"tl.where(({a} != {a}) | ({a} < {b}), {a}, {b})", node)


def _clamp(a, lo=None, hi=None, *, node):
    out = a
    if lo is not None:
        out = f"tl.where(({out} != {out}) | ({out} > {lo}), {out}, {lo})"
    if hi is not None:
        out = f"tl.where(({out} != {out}) | ({out} < {hi}), {out}, {hi})"
    return _cast(out, node)


def _compare(op: str) -> Callable:
    def emit(a, b, *, node):
        return f"({a} {op} {b})"
    return emit


def convert_dtype(a, dtype=None, *, node):
    # Round through the storage dtype so a cast to bf16/fp16 loses what eager loses.
    return to_dtype(a, _dt(node))


def _tanh(a, *, node):
    # 1 - 2 / (exp(2x) + 1) cancels near 0 (tanh(1e-8) came out 0): an odd Taylor polynomial below
    # a threshold, (1 - e) / (1 + e) with e = exp(-2|x|) above it. fp32: below 0.25 (next term
    # < 1e-8 relative); fp64: below 0.02 (< 1e-21), where (1 - e) / (1 + e) loses under 2 digits
    x = _float(a, node)
    threshold = 0.02 if _dt(node) == torch.float64 else 0.25
    x2 = f"({x} * {x})"
    small = f"{x} * (1.0 + {x2} * (-0.3333333333333333 + {x2} * (0.13333333333333333 + {x2} * " \
            f"(-0.05396825396825397 + {x2} * (0.021869488536155203 - {x2} * 0.008863235529902197)))))"
    e = f"tl.exp(-2.0 * tl.abs({x}))"
    large = f"tl.where({x} < 0, -1.0, 1.0) * ((1.0 - {e}) / (1.0 + {e}))"
    return _cast(f"tl.where(tl.abs({x}) < {threshold}, {small}, {large})", node)


def _sign(a, *, node):
    return _cast(f"tl.where({a} > 0, 1, tl.where({a} < 0, -1, 0))", node)


def _full(size, value, *, node, **_):
    value = value if isinstance(value, str) else literal(value)
    return f"tl.full([1], {value}, {COMPUTE_DTYPE[_dt(node)]})"


def _relu(a, *, node):
    return _cast(f"tl.where({a} < 0, 0, {a})", node)  # keeps NaN, as torch.relu does


def _abs(a, *, node):
    return _cast(f"tl.abs({a})", node)


def _neg(a, *, node):
    if _dt(node).is_floating_point:
        return _cast(f"{a} * -1.0", node)  # Triton's unary minus is 0 - a: -(+0.0) would be +0.0
    return _cast(f"-{a}", node)


def _logical(op: str) -> Callable:
    def emit(a, b, *, node):
        return f"(({a} != 0) {op} ({b} != 0))"
    return emit


def _logical_not(a, *, node):
    return f"({a} == 0)"


def _bitwise_not(a, *, node):
    # on bool it is logical not; on integers it flips every bit (~x == -x - 1)
    if _dt(node) == torch.bool:
        return _logical_not(a, node=node)
    if not _dt(node).is_signed:  # the interpreter builds ~'s all-ones operand as -1, out of range for uint8
        return _cast(f"({a}) ^ {(1 << _dt(node).itemsize * 8) - 1}", node)
    return _cast(f"~({a})", node)


def _rounding(fn: str) -> Callable:
    """floor/ceil: integers are already whole (torch returns them unchanged)."""
    def emit(a, *, node):
        return _cast(f"{fn}({_float(a, node)})", node) if _dt(node).is_floating_point else a
    return emit


POINTWISE: dict = {
    aten.add.Tensor: _binary("+"), aten.sub.Tensor: _binary("-"), aten.mul.Tensor: _binary("*"),
    aten.div.Tensor: _true_div, aten.neg.default: _neg, aten.abs.default: _abs,
    aten.exp.default: _unary("tl.exp"), aten.exp2.default: _unary("tl.exp2"),
    aten.log.default: _unary("tl.log"), aten.log2.default: _unary("tl.log2"),
    aten.sqrt.default: _unary("tl.sqrt"), aten.rsqrt.default: _unary("tl.rsqrt"),
    aten.sigmoid.default: _unary("tl.sigmoid"), aten.tanh.default: _tanh,
    aten.sin.default: _unary("tl.sin"), aten.cos.default: _unary("tl.cos"),
    aten.erf.default: _unary("tl.erf"), aten.floor.default: _rounding("tl.floor"),
    aten.ceil.default: _rounding("tl.ceil"), aten.reciprocal.default: lambda a, *, node: _cast(f"1.0 / {_float(a, node)}", node),
    aten.relu.default: _relu, aten.sign.default: _sign,
    aten.pow.Tensor_Scalar: _pow_scalar, aten.where.self: _where,
    aten.maximum.default: _maximum, aten.minimum.default: _minimum,
    aten.clamp.default: _clamp,
    aten.eq.Tensor: _compare("=="), aten.eq.Scalar: _compare("=="), aten.ne.Tensor: _compare("!="),
    aten.ne.Scalar: _compare("!="), aten.lt.Tensor: _compare("<"), aten.lt.Scalar: _compare("<"),
    aten.le.Tensor: _compare("<="), aten.le.Scalar: _compare("<="), aten.gt.Tensor: _compare(">"),
    aten.gt.Scalar: _compare(">"), aten.ge.Tensor: _compare(">="), aten.ge.Scalar: _compare(">="),
    aten.logical_and.default: _logical("&"), aten.logical_or.default: _logical("|"),
    aten.logical_not.default: _logical_not, aten.bitwise_not.default: _bitwise_not,
    prims.convert_element_type.default: convert_dtype, aten._to_copy.default: convert_dtype,
    aten.clone.default: lambda a, *, node, memory_format=None: a,
    prims.div.default: _true_div,  # float only (classify sends integer prims.div to ATen)
    aten.full.default: _full, aten.scalar_tensor.default: lambda v, *, node, **_: _full(None, v, node=node),
}

# Operand positions that take part in type promotion: eager converts each tensor operand to the
# op's common dtype (fp16 + a 0-d fp32 tensor rounds the latter to fp16; int32 + fp16 converts the
# int to fp16; uint8 > a 0-d int64 -1 compares with 255) before computing. Python scalars are kept
# as fp32/int literals, as CUDA eager passes them in its compute type.
_PROMOTED_ARGS = {
    aten.add.Tensor: (0, 1), aten.sub.Tensor: (0, 1), aten.mul.Tensor: (0, 1), aten.div.Tensor: (0, 1),
    prims.div.default: (0, 1), aten.maximum.default: (0, 1), aten.minimum.default: (0, 1),
    aten.where.self: (1, 2), aten.clamp.default: (0, 1, 2), aten.pow.Tensor_Scalar: (0, 1),
    aten.eq.Tensor: (0, 1), aten.eq.Scalar: (0, 1), aten.ne.Tensor: (0, 1), aten.ne.Scalar: (0, 1),
    aten.lt.Tensor: (0, 1), aten.lt.Scalar: (0, 1), aten.le.Tensor: (0, 1), aten.le.Scalar: (0, 1),
    aten.gt.Tensor: (0, 1), aten.gt.Scalar: (0, 1), aten.ge.Tensor: (0, 1), aten.ge.Scalar: (0, 1),
}


def operand_conversions(node: fx.Node) -> dict[int, torch.dtype]:
    """{argument position: the common dtype} for each tensor operand of `node` that eager converts
    before computing (see _PROMOTED_ARGS). Scalars, SymInts included, stay literals."""
    from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

    positions = [i for i in _PROMOTED_ARGS.get(node.target, ()) if i < len(node.args) and node.args[i] is not None]
    values = {i: node.args[i].meta["val"] if isinstance(node.args[i], fx.Node) else node.args[i] for i in positions}
    tensors = {i: v for i, v in values.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        return {}
    _, common = elementwise_dtypes(*values.values(), type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
    return {i: common for i, v in tensors.items() if v.dtype != common}


def to_dtype(expr: str, dtype: torch.dtype) -> str:
    """A loaded value converted as eager converts a tensor to `dtype` (through its storage type,
    so fp16/bf16 round and narrow integers wrap), in that dtype's compute type."""
    return f"({expr}).to({STORAGE_DTYPE[dtype]}).to({COMPUTE_DTYPE[dtype]})"


_FLOAT_ONLY = {aten.exp.default, aten.exp2.default, aten.log.default, aten.log2.default, aten.sqrt.default,
               aten.rsqrt.default, aten.sigmoid.default, aten.tanh.default, aten.sin.default, aten.cos.default,
               aten.erf.default, aten.reciprocal.default}


@dataclass(frozen=True)
class Reduction:
    combine: str      # Triton reduction function over axis 1
    identity: str     # value for masked-out lanes
    mean: bool = False
    variance: bool = False       # two passes over the row held in registers: mean, then squares
    keepdim_arg: int | None = 2  # position of keepdim in the op's arguments (prims never keep dims)
    propagate_nan: bool = False  # a NaN anywhere in the row is the result (tl.max/tl.min skip NaN)


REDUCTIONS = {
    aten.sum.dim_IntList: Reduction("tl.sum", "0"),
    aten.mean.dim: Reduction("tl.sum", "0", mean=True),
    aten.amax.default: Reduction("tl.max", 'float("-inf")', propagate_nan=True),
    aten.amin.default: Reduction("tl.min", 'float("inf")', propagate_nan=True),
    prims.sum.default: Reduction("tl.sum", "0", keepdim_arg=None),
    prims.var.default: Reduction("tl.sum", "0", variance=True, keepdim_arg=None),
}

VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, prims.broadcast_in_dim.default,
}

# Computed by better kernels than a generated one (cuBLAS, hand-written attention).
EXTERN_OPS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
              aten.embedding.default}


@dataclass(frozen=True)
class Classification:
    kind: str  # "pointwise" | "view" | "reduction" | "cat" | "index_copy" | "extern" | "fallback" | "none"
    reason: str = ""


def classify(node: fx.Node) -> Classification:
    """How the code generator treats `node`; for fallbacks, why (shown in the dump)."""
    if node.op != "call_function":
        return Classification("none")
    target = node.target
    val = node.meta.get("val")
    name = op_name(target)
    if not isinstance(val, torch.Tensor):
        return Classification("none", "produces no tensor")
    if val.dtype not in COMPUTE_DTYPE or val.device.type not in ("cuda", "cpu"):
        return Classification("fallback", f"{name}: dtype {val.dtype} not supported by codegen")
    for arg in node.all_input_nodes:
        arg_val = arg.meta.get("val")
        if isinstance(arg_val, torch.Tensor) and arg_val.dtype not in COMPUTE_DTYPE:
            return Classification("fallback", f"{name}: input dtype {arg_val.dtype} not supported by codegen")
    if target in EXTERN_OPS or str(getattr(target, "namespace", "")) == "fusecc":
        return Classification("extern", f"{name}: extern kernel")
    if target in VIEW_OPS:
        return Classification("view")
    if target is aten.cat.default:
        return Classification("cat")
    if target in POINTWISE:
        out_of_range = _int_scalar_out_of_range(node)
        if out_of_range:
            return Classification("fallback", f"{name}: {out_of_range}")
        if target in _FLOAT_ONLY and not val.dtype.is_floating_point:
            return Classification("fallback", f"{name}: integer result")
        if target is aten._to_copy.default and set(node.kwargs) - {"dtype"}:
            return Classification("fallback", f"{name}: changes device/layout/memory format")
        if target is aten.pow.Tensor_Scalar:
            try:
                _pow_scalar("x", node.args[1], node=node)
            except NotImplementedError as exc:
                return Classification("fallback", f"{name}: {exc}")
        if target is prims.div.default and not val.dtype.is_floating_point:
            return Classification("fallback", f"{name}: integer division")
        if target is aten.div.Tensor and node.kwargs.get("rounding_mode") is not None:
            return Classification("fallback", f"{name}: rounding_mode")
        if target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.contiguous_format, torch.preserve_format):
            return Classification("fallback", f"{name}: memory_format {node.kwargs.get('memory_format')}")
        return Classification("pointwise")
    if target in REDUCTIONS:
        return _classify_reduction(node, name)
    if target is aten.index_copy_.default:
        return _classify_index_copy(node, name)
    return Classification("fallback", f"{name}: no Triton lowering")


def _int_scalar_out_of_range(node: fx.Node) -> str:
    """Eager converts a Python int operand to an integer tensor operand's dtype first, wrapping it
    (uint8: -1 is 255); a kernel would use its mathematical value. Rare: such nodes run as ATen."""
    int_dtypes = [a.meta["val"].dtype for a in node.all_input_nodes
                  if isinstance(a.meta.get("val"), torch.Tensor) and not a.meta["val"].dtype.is_floating_point
                  and a.meta["val"].dtype != torch.bool]
    scalars = [a for a in list(node.args) + list(node.kwargs.values())
               if isinstance(a, int) and not isinstance(a, bool)]
    for dtype in int_dtypes:
        info = torch.iinfo(dtype)
        for value in scalars:
            if not info.min <= value <= info.max:
                return f"integer scalar {value} outside the range of {dtype} (eager wraps it)"
    return ""


def _classify_index_copy(node: fx.Node, name: str) -> Classification:
    """`dest.index_copy_(dim, index, src)` (a static KV-cache write, after reinplacing) can be the
    store of the kernel computing `src`: each lane writes its element to row `index[i]` of `dest`.
    Whether it may join that kernel depends on the graph around it (fusion.py decides)."""
    dest, dim, index, src = node.args
    dest_val, index_val, src_val = (a.meta.get("val") for a in (dest, index, src))
    if not all(isinstance(v, torch.Tensor) for v in (dest_val, index_val, src_val)):
        return Classification("fallback", f"{name}: non-tensor arguments")
    if src_val.dtype != dest_val.dtype or index_val.dim() != 1 or index_val.dtype not in (torch.int32, torch.int64):
        return Classification("fallback", f"{name}: source dtype differs from destination, or index not 1-D int")
    if src_val.dim() != dest_val.dim() or src_val.dim() == 0:
        return Classification("fallback", f"{name}: source and destination ranks differ")
    return Classification("index_copy")


def _classify_reduction(node: fx.Node, name: str) -> Classification:
    src = node.args[0].meta["val"]
    dims = node.args[1] if len(node.args) > 1 else None
    if src.dim() == 0 or not dims or len(dims) != 1 or dims[0] % src.dim() != src.dim() - 1:
        return Classification("fallback", f"{name}: only reductions over the last dimension are generated")
    if node.kwargs.get("dtype") is not None:
        return Classification("fallback", f"{name}: dtype= argument")
    size = src.shape[-1]
    if not isinstance(size, int):
        return Classification("fallback", f"{name}: reduced dimension has symbolic size {size}")
    if size > MAX_PERSISTENT_REDUCTION:
        return Classification("fallback", f"{name}: reduced dimension {size} > {MAX_PERSISTENT_REDUCTION}")
    if not src.dtype.is_floating_point:
        return Classification("fallback", f"{name}: integer reduction")
    return Classification("reduction")

