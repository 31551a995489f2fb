"""Algebraic simplification as a table of local rewrite rules.

    before:  %a = aten.mul(%x, 1)               # f32[4, 8]
             %b = aten.pow(%a, 2)               # f32[4, 8]
             %c = aten.view(aten.view(%b, [32]), [8, 4])
    after:   %b = aten.mul(%x, %x)
             %c = aten.view(%b, [8, 4])

Each rule is `Rule(name, targets, fn)`; `fn(node)` returns None for "no match" or the
replacement (see rewrite_engine.py, which also refuses any replacement that would change
shape, dtype, strides or aliasing). Adding a rule is one entry in RULES plus one test.

Deliberately absent, because they are wrong for NaN/inf/-0.0: x*0 -> 0, x-x -> 0, x/x -> 1,
and x**0.5 -> sqrt(x) in half precision (ATen's half pow gives pow(-inf, .5) = inf, sqrt gives nan).
"""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx as fx

from fusecc.graph.constants import constant_value
from fusecc.graph.node_kinds import cast_dtype
from fusecc.passes.base import GraphPass, PassResult
from fusecc.passes.rewrite_engine import NewNode, Rule, apply_rules, simplified_expr

aten = torch.ops.aten
prims = torch.ops.prims


# ---------------------------------------------------------------- argument helpers

def _is_number(arg, value) -> bool:
    """A literal Python number equal to `value` (bools excluded: True * x is a dtype change)."""
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        return _is_constant_filled(arg, value)
    return arg == value


def _is_constant_filled(arg, value) -> bool:
    """A small constant tensor (get_attr) whose every element equals `value`."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return False
    tensor = constant_value(arg.graph.owning_module, arg)
    return isinstance(tensor, torch.Tensor) and tensor.numel() <= 64 and bool((tensor == value).all())


def _has_negative_zero(arg) -> bool:
    if isinstance(arg, float):
        return math.copysign(1.0, arg) < 0 and arg == 0
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        tensor = constant_value(arg.graph.owning_module, arg)
        return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and bool(
            ((tensor == 0) & torch.signbit(tensor)).any())
    return False


def _all_negative_zero(arg) -> bool:
    """-0.0, or a constant tensor of -0.0 only (a zero already known to be one)."""
    if isinstance(arg, float):
        return math.copysign(1.0, arg) < 0
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        tensor = constant_value(arg.graph.owning_module, arg)
        return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and bool(torch.signbit(tensor).all())
    return False


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_cast(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and cast_dtype(node) is not None


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of `src` is exactly representable in `dst`."""
    if src == dst or src == torch.bool:
        return True
    if src.is_floating_point:
        if not dst.is_floating_point:
            return False
        if src in (torch.float16, torch.bfloat16):
            return dst in (torch.float32, torch.float64)
        return src == torch.float32 and dst == torch.float64
    if src.is_complex or dst.is_complex or dst == torch.bool:
        return False  # to bool keeps only "nonzero" (src is not bool here)
    src_info = torch.iinfo(src)
    if dst.is_floating_point:
        mantissa = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}.get(dst, 0)
        return max(abs(src_info.min), src_info.max) <= 2 ** mantissa
    dst_info = torch.iinfo(dst)
    return dst_info.min <= src_info.min and src_info.max <= dst_info.max


def _finite_number(value) -> bool:
    # alpha scales the zero operand: a finite alpha keeps it zero, inf or NaN makes it NaN
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------- rules (one function each)

def mul_by_one(node):
    x, y = node.args[:2]
    if _is_number(y, 1) and isinstance(x, fx.Node):
        return x
    if _is_number(x, 1) and isinstance(y, fx.Node):
        return y
    return None


def add_zero(node):
    # x + 0.0 is not x for floats: -0.0 + 0.0 is +0.0 (inductor's remove_no_ops drops it anyway;
    # 1/x, atan2 and copysign see the difference). x + (-0.0) is x for every float, -0.0 and NaN
    # included, so for floats only a negative zero (scaled by a positive alpha) goes; for
    # integers any zero
    x, y = node.args[:2]
    alpha = node.kwargs.get("alpha", 1)
    if not _finite_number(alpha):
        return None  # x + inf * 0 is NaN
    out = _val(node)
    floating = not isinstance(out, torch.Tensor) or out.is_floating_point() or out.is_complex()

    def removable(zero, scale) -> bool:
        return _is_number(zero, 0) and (not floating or (_all_negative_zero(zero) and scale > 0))

    if isinstance(x, fx.Node) and removable(y, alpha):
        return x
    if isinstance(y, fx.Node) and alpha == 1 and removable(x, 1):
        return y
    return None


def sub_zero(node):
    # exact for +0 (x - 0.0 keeps -0.0); not for -0.0: x - (-0.0) is x + 0.0, which turns -0.0
    # into +0.0, so that one stays
    x, y = node.args[:2]
    if _has_negative_zero(y) or not _finite_number(node.kwargs.get("alpha", 1)):
        return None
    return x if _is_number(y, 0) and isinstance(x, fx.Node) else None


def div_by_one(node):
    x, y = node.args[:2]
    return x if _is_number(y, 1) and isinstance(x, fx.Node) else None


def pow_one(node):
    return node.args[0] if _is_number(node.args[1], 1) else None


def pow_two(node):
    x = node.args[0]
    return NewNode(aten.mul.Tensor, (x, x)) if _is_number(node.args[1], 2) else None


def pow_half(node):
    x = node.args[0]
    # ATen's float/double pow(x, 0.5) is computed as sqrt(x); half types are not (see module doc).
    if _is_number(node.args[1], 0.5) and _val(x) is not None and _val(x).dtype in (torch.float32, torch.float64):
        return NewNode(aten.sqrt.default, (x,))
    return None


def double_negation(node):
    inner = node.args[0]
    if isinstance(inner, fx.Node) and inner.target is aten.neg.default:
        return inner.args[0]
    return None


def cast_to_same_dtype(node):
    dtype = cast_dtype(node)
    src = _val(node.args[0])
    return node.args[0] if dtype is not None and src is not None and src.dtype == dtype else None


def lossless_cast_chain(node):
    """cast(cast(x, B), C) -> cast(x, C) when x's dtype -> B loses nothing."""
    dtype = cast_dtype(node)
    inner = node.args[0]
    if dtype is None or not _is_cast(inner):
        return None
    x = inner.args[0]
    src = _val(x)
    if src is None or not _widens(src.dtype, cast_dtype(inner)):
        return None
    if src.dtype == dtype:
        return x
    return NewNode(prims.convert_element_type.default, (x, dtype))


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def view_chain(node):
    inner = node.args[0]
    if isinstance(inner, fx.Node) and inner.target in _VIEWS and len(inner.users) >= 1:
        return NewNode(node.target, (inner.args[0], node.args[1]))
    return None


def identity_view(node):
    x = node.args[0]
    src = _val(x)
    if src is not None and [str(s) for s in src.shape] == [str(s) for s in node.args[1]]:
        return x
    return None


def permute_chain(node):
    inner = node.args[0]
    if not (isinstance(inner, fx.Node) and inner.target is aten.permute.default):
        return None
    outer_dims, inner_dims = list(node.args[1]), list(inner.args[1])
    rank = len(inner_dims)
    composed = [inner_dims[d % rank] % rank for d in outer_dims]
    if composed == list(range(rank)):
        return inner.args[0]
    return NewNode(aten.permute.default, (inner.args[0], composed))


def identity_permute(node):
    dims = list(node.args[1])
    rank = len(dims)
    return node.args[0] if [d % rank for d in dims] == list(range(rank)) else None


def transpose_chain(node):
    inner = node.args[0]
    if not isinstance(inner, fx.Node):
        return None
    if node.target is aten.t.default and inner.target is aten.t.default:
        return inner.args[0]
    if node.target is aten.transpose.int and inner.target is aten.transpose.int:
        rank = len(_val(inner.args[0]).shape) if _val(inner.args[0]) is not None else None
        if rank is None:
            return None
        outer = sorted(d % rank for d in node.args[1:3])
        first = sorted(d % rank for d in inner.args[1:3])
        if outer == first:
            return inner.args[0]
    return None


def identity_expand(node):
    x = node.args[0]
    src = _val(x)
    if src is not None and [str(s) for s in src.shape] == [str(s) for s in node.args[1]]:
        return x
    return None


def identity_slice(node):
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    src = _val(x)
    # isinstance first: comparing a SymInt start/step with `!=`/`in` would add a shape guard.
    if src is None or not isinstance(step, int) or step != 1:
        return None
    if start is not None and not (isinstance(start, int) and start == 0):
        return None
    size = src.shape[dim]
    if end is None or (isinstance(end, int) and isinstance(size, int) and end >= size):
        return x
    if isinstance(end, int) and end >= 2 ** 62:  # sys.maxsize-style "to the end"
        return x
    return None


def identity_clone(node):
    return node.args[0]  # the engine refuses it unless strides already match


def single_cat(node):
    tensors = node.args[0]
    return tensors[0] if len(tensors) == 1 else None


def alias_of(node):
    return node.args[0]


def mul_by_reciprocal(node):
    """x / c -> x * (1/c) for c a power of two, where the reciprocal is exact."""
    x, c = node.args[:2]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or c == 0 or not math.isfinite(c):
        return None
    mantissa, _ = math.frexp(abs(c))
    if mantissa != 0.5 or _val(x) is None or not _val(x).dtype.is_floating_point:
        return None
    # Both c and 1/c must be normal numbers of x's dtype: in f32, x / 2**-130 is finite for
    # small x but 1/c = 2**130 rounds to inf, so x * (1/c) would be inf.
    info = torch.finfo(_val(x).dtype)
    if not (info.tiny <= abs(c) <= info.max and info.tiny <= 1.0 / abs(c) <= info.max):
        return None
    return NewNode(aten.mul.Tensor, (x, 1.0 / c))


def symbolic_expression(node):
    """SymInt arithmetic that sympy reduces to a constant, or to a symbol an input (or an earlier
    node, e.g. a sym_size) already holds."""
    val = node.meta.get("val")
    if not isinstance(val, torch.SymInt):
        return None
    expr = simplified_expr(val)
    if isinstance(expr, sympy.Integer):
        return int(expr)
    # An earlier node already holding the same symbol: an input (s0) first, else e.g. a sym_size.
    earlier = None
    for other in node.graph.nodes:
        if other is node:
            break
        other_val = other.meta.get("val")
        if isinstance(other_val, torch.SymInt) and simplified_expr(other_val) == expr:
            if other.op == "placeholder":
                return other
            earlier = earlier or other
    return earlier


_SYMBOLIC_TARGETS = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                     aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)

RULES: list[Rule] = [
    Rule("mul_by_one", (aten.mul.Tensor, aten.mul.Scalar), mul_by_one),
    Rule("add_zero", (aten.add.Tensor, aten.add.Scalar), add_zero),
    Rule("sub_zero", (aten.sub.Tensor, aten.sub.Scalar), sub_zero),
    Rule("div_by_one", (aten.div.Tensor, aten.div.Scalar), div_by_one),
    Rule("mul_by_reciprocal", (aten.div.Tensor, aten.div.Scalar), mul_by_reciprocal),
    Rule("pow_one", (aten.pow.Tensor_Scalar,), pow_one),
    Rule("pow_two", (aten.pow.Tensor_Scalar,), pow_two),
    Rule("pow_half", (aten.pow.Tensor_Scalar,), pow_half),
    Rule("double_negation", (aten.neg.default,), double_negation),
    Rule("cast_to_same_dtype", (aten._to_copy.default, prims.convert_element_type.default), cast_to_same_dtype),
    Rule("lossless_cast_chain", (aten._to_copy.default, prims.convert_element_type.default), lossless_cast_chain),
    Rule("identity_view", _VIEWS, identity_view),
    Rule("view_chain", _VIEWS, view_chain),
    Rule("identity_permute", (aten.permute.default,), identity_permute),
    Rule("permute_chain", (aten.permute.default,), permute_chain),
    Rule("transpose_chain", (aten.transpose.int, aten.t.default), transpose_chain),
    Rule("identity_expand", (aten.expand.default,), identity_expand),
    Rule("identity_slice", (aten.slice.Tensor,), identity_slice),
    Rule("identity_clone", (aten.clone.default,), identity_clone),
    Rule("single_cat", (aten.cat.default,), single_cat),
    Rule("alias", (aten.alias.default,), alias_of),
    Rule("symbolic_expression", _SYMBOLIC_TARGETS, symbolic_expression),
]


class AlgebraicSimplification(GraphPass):
    name = "algebraic_simplification"

    def __init__(self, rules: list[Rule] | None = None):
        self.rules = RULES if rules is None else rules
        # (rule, node name) -> why refused, over the fixed-point rounds of one compilation
        self.refused: dict[tuple[str, str], str] = {}

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats, refusals = apply_rules(gm, self.rules, self.refused)
        modified = any(key.startswith("rule:") for key in stats)
        if modified:
            gm.recompile()  # nodes left dead by a rewrite are removed by the next DCE
        return PassResult(gm, modified, stats, refusals)
