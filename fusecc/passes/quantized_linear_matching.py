"""Quantized-linear matching: hand-written weight-only dequantization feeding a matmul becomes one
`fusecc::weight_only_linear` call, so the float weight is never materialized.

Users write int8 / int4 weight-only linears as a dequantization followed by a float matmul; with
`freeze=True` the packed weights, scales and zero points are constants (get_attr), and constant
folding would fold the dequantized weight into a full float constant. This pass runs before it.

    int8 per channel:   F.linear(x, w_int8.to(x.dtype) * scale[:, None], bias)
    before:  %w   = _to_copy(%w_int8, dtype=f32)               # f32[N, K]  (an int8 constant)
             %s   = unsqueeze(%scale, 1)                       # f32[N, 1]
             %wd  = mul(%w, %s)                                # f32[N, K]
             %y   = addmm(%bias, view(%x, [M, K]), t(%wd))     # f32[M, N]
    after:   %y   = fusecc.weight_only_linear(view(%x, [M, K]), %w_int8, %scale_f32, None, %bias, 8, -1)

    int4 group-wise:    q = stack([p & 0xF, (p >> 4) & 0xF], -1).view(N, K)        # p: uint8 [N, K/2]
                        w = (q.view(N, K // G, G).to(x.dtype) - zeros[..., None]) * scales[..., None]
                        x @ w.view(N, K).t()
    before:  %q   = view(stack([bitwise_and(%p, 15), bitwise_and(rshift(%p, 4), 15)], -1), [N, K])
             %wd  = mul(sub(_to_copy(view(%q, [N, K/G, G]), f32), unsqueeze(%zeros, 2)), unsqueeze(%scales, 2))
             %y   = mm(%x2, t(view(%wd, [N, K])))
    after:   %y   = fusecc.weight_only_linear(%x2, %q_fusecc, %scales_f32, %zeros_f32, None, 4, G)

What is matched: the weight operand of `mm` / `addmm` is `t(W)` (W [N, K], output channel first), W
is `(float(V) [- Z]) [* S]`, possibly viewed from a shape whose last dim G (the group) divides K,
with float-to-float casts and contiguous copies around; V is an integer tensor computed from
constants only, S and Z are constants (or numbers) constant within each group (without a group
view, scales repeated along K, as `repeat_interleave(G, 1)` makes them, give G). A matmul whose
weight has no mul (gpt-fast's `F.linear(x, w.to(x.dtype)) * scales`) gets scales of 1 and keeps
its own multiply after the op, so it computes what eager does. Which packing V was unpacked
from does not matter: V is evaluated once, at compile time, from the frozen constants (an integer
tensor, never the float weight), and stored in fusecc's layout (fusecc/kernels/quant_matmul.py):
int4 (int32 [N, K/8]) when every group spans at most 16 consecutive values (the group's offset
moves into its zero point, exactly), else int8 (int8 [N, K]; an int8 constant is used as it is).

Numerics: the op dequantizes in fp32 and rounds the weight once to x's dtype. Eager code that
dequantizes in a 16-bit dtype rounds the same way when its zero points are integers (bf16 holds
the integers of an int8 weight exactly); fractional zero points in bf16 round once more in eager.

With `freeze=False` the weights are graph inputs: an int8 [N, K] weight with per-channel scales is
used as it is (its scales made fp32 [N, 1] at each call, N values); other packings are refused.

Every matmul whose weight comes from an int -> float cast is reported: stats `rewritten:int4_group128`
(and the like), `skipped:<reason>`, and one `linear <module> (<node>): fused, <kind>` or
`...: not fused, <reason>` entry per linear, which the dump's report lists. Not rewritten:
packed weights that are graph inputs (`freeze=False`: the packing cannot be converted at compile time),
a scale applied before the zero point (`q * s + m`), scales varying within a group, weights
stored [K, N], integer values beyond 8 bits, addmm with a bias that is not one value per output.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.weight_only_linear)
from fusecc.graph.constants import constant_value, insert_constant_node
from fusecc.graph.matching import NoMatch, is_call, tensor_shape, tensor_value
from fusecc.graph.node_kinds import is_impure, is_pure, is_random
from fusecc.passes.base import GraphPass, PassResult
from fusecc.quantization.packing import pack_int4

aten = torch.ops.aten
prims = torch.ops.prims
_CASTS = (aten._to_copy.default, prims.convert_element_type.default)
_COPIES = (aten.clone.default, aten.contiguous.default, aten.alias.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)
MIN_GROUP = 16  # smaller groups of repeated scales: as many scales as weights/16, not worth a match


class QuantizedLinearMatching(GraphPass):
    name = "quantized_linear_matching"
    repeat_to_fixed_point = False

    def __init__(self):
        self.reasons: dict[str, str] = {}  # matmul node name -> why it was not rewritten (last run)

    def run(self, gm: fx.GraphModule) -> PassResult:
        self.reasons = {}
        stats: Counter = Counter()
        for node in list(gm.graph.nodes):
            if not is_call(node, aten.mm.default, aten.addmm.default):
                continue
            weight = node.args[1] if node.target is aten.mm.default else node.args[2]
            if not _reaches_integer_cast(weight):
                continue  # a float weight: not a quantized linear
            path = _module_path(node)
            label = f"linear {path} ({node.name})" if path else f"linear {node.name}"
            try:
                args, kind = _match(gm, node, weight)
            except NoMatch as miss:
                stats[f"skipped:{miss.reason}"] += 1
                stats[f"{label}: not fused, {miss.reason}"] += 1
                self.reasons[node.name] = miss.reason
                continue
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(torch.ops.fusecc.weight_only_linear.default, args)
            fused.meta.update({k: v for k, v in node.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            stats["rewritten"] += 1
            stats[f"rewritten:{kind}"] += 1
            stats[f"{label}: fused, {kind}"] += 1
        if stats["rewritten"]:
            # the dequantization chains the op replaced (their constants are freed by DCE later)
            gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(n) or is_random(n))
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, stats["rewritten"] > 0, stats)


def _match(gm: fx.GraphModule, matmul: fx.Node, weight: fx.Node) -> tuple[tuple, str]:
    """(weight_only_linear args, a name for the report) for `matmul` whose weight operand is `weight`."""
    x = matmul.args[0] if matmul.target is aten.mm.default else matmul.args[1]
    dtype = tensor_value(matmul).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or tensor_value(x).dtype != dtype:
        raise NoMatch("activation_dtype")
    bias = _bias(matmul)
    w_nk = _untransposed(_strip(weight))
    N, K = _static_shape(w_nk)
    dequant, G = _strip(w_nk), K
    if is_call(dequant, *_RESHAPES):  # e.g. [N, K/G, G] viewed [N, K]: the last dim is the group
        source_shape = _static_shape(dequant.args[0])
        G = source_shape[-1] if source_shape else 0
        if not G or K % G or tensor_value(dequant.args[0]).numel() != N * K:
            raise NoMatch("weight_view_not_grouping_input_columns")
        dequant = _strip(dequant.args[0])
    shape = _static_shape(dequant)
    integers, scale, zero, top = _dequantization(dequant)
    if _static_shape(top) != shape:
        raise NoMatch("integer_weight_broadcast_by_scale")
    try:
        values = _evaluate(integers, {}).reshape(N, K)
    except NoMatch as miss:
        if miss.reason != "weights_not_frozen":
            raise
        return _unfrozen_int8(gm, matmul, (x, integers, scale, zero, bias), shape, N, K)
    scale = None if scale is None else (_operand_value(scale, "scale"), "scale")
    zero = None if zero is None else (_operand_value(zero[0], "zero_point") * zero[1], "zero_point")
    operands = [o for o in (scale, zero) if o is not None]
    if G == K:  # no group view: scales repeated along K (repeat_interleave) give the group
        G = _inferred_group(shape, K, operands)
    device = values.device  # the frozen weights'; a number's scale or zero point is made on the CPU
    scales = (_per_group(*scale, shape, N, K, G) if scale is not None else torch.ones(N, K // G)).to(device)
    zeros = _per_group(*zero, shape, N, K, G).to(device) if zero is not None else None
    qweight, zeros, bits = _fusecc_layout(values, zeros, N, K, G)
    group_size = -1 if G == K else G
    args = (x, _constant_node(gm, matmul, "_quantized_weight", qweight),
            _constant_node(gm, matmul, "_quantized_scales", scales),
            None if zeros is None else _constant_node(gm, matmul, "_quantized_zeros", zeros),
            bias, bits, group_size)
    return args, f"int{bits}_" + ("per_channel" if group_size == -1 else f"group{G}")


def _unfrozen_int8(gm: fx.GraphModule, matmul: fx.Node, operands: tuple, shape: tuple, N: int, K: int):
    """freeze=False: an int8 [N, K] weight input with per-channel scales is used as it is, its scales
    made fp32 [N, 1] at each call (N values); any other packing must be converted at compile time."""
    x, integers, scale, zero, bias = operands
    per_channel_scale = scale is None or not isinstance(scale, fx.Node) or (
        tensor_value(scale).dim() <= 2 and (tensor_value(scale).dim() == 0 or tensor_value(scale).shape[-1] == 1))
    if not (integers.op == "placeholder" and tensor_value(integers).dtype == torch.int8 and shape == (N, K)
            and tensor_value(integers).stride() == (K, 1) and zero is None and per_channel_scale):
        raise NoMatch("weights_not_frozen")  # the packing is known only at run time
    if isinstance(scale, fx.Node):
        as_fp32 = _call(gm, matmul, prims.convert_element_type.default, scale, torch.float32)
        expanded = _call(gm, matmul, aten.expand.default, as_fp32, [N, 1])
        scales = _call(gm, matmul, aten.clone.default, expanded, memory_format=torch.contiguous_format)
    else:
        device = tensor_value(integers).device
        scales = _constant_node(gm, matmul, "_quantized_scales",
                                torch.full((N, 1), 1.0 if scale is None else float(scale), device=device))
    return (x, integers, scales, None, bias, 8, -1), "int8_per_channel"


def _call(gm: fx.GraphModule, before: fx.Node, target, *args, **kwargs) -> fx.Node:
    """A new node computing target(*args) before `before`, with its fake value."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    fake_args, fake_kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, (args, kwargs))
    with tensor_value(before).fake_mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


# ---------------------------------------------------------------- the pieces

def _reaches_integer_cast(node, depth: int = 12) -> bool:
    """Whether `node` is computed (through views, casts and arithmetic) from an int -> float cast."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if is_call(node, *_CASTS) and _is_float(node) and _is_integer(node.args[0]):
        return True
    if not is_call(node, *_CASTS, *_COPIES, *_RESHAPES, *_TRANSPOSES, aten.mul.Tensor, aten.sub.Tensor,
               aten.add.Tensor, aten.div.Tensor, aten.unsqueeze.default, aten.expand.default):
        return False
    return any(_reaches_integer_cast(a, depth - 1) for a in node.all_input_nodes)


def _dequantization(node: fx.Node):
    """(integer tensor V, scale S or None, (zero Z, sign) or None, the node S and Z apply to) of
    `(float(V) - Z) * S` and the forms without S, without Z, with `+ Z` (sign -1), or with V
    reshaped after its cast."""
    scale = None
    if is_call(node, aten.mul.Tensor):
        value, scale = _split_operands(node, "scale")
        node = _strip(value)
    zero = None
    if is_call(node, aten.sub.Tensor) and len(node.args) == 2 and not node.kwargs and _reaches_integer_cast(node.args[0]):
        zero, node = (node.args[1], 1.0), _strip(node.args[0])
    elif is_call(node, aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:
        value, offset = _split_operands(node, "zero_point")
        zero, node = (offset, -1.0), _strip(value)
    if is_call(node, aten.mul.Tensor, aten.div.Tensor):
        raise NoMatch("scale_applied_before_zero_point")  # q * s + m: a zero point -m/s is not exact
    top = node
    while is_call(node, *_RESHAPES):  # views keep the row-major order: V is reshaped the same way below
        node = _strip(node.args[0])
    if not (is_call(node, *_CASTS) and _is_integer(node.args[0])):
        raise NoMatch("dequantization_form_not_recognized")
    return node.args[0], scale, zero, top


def _split_operands(node: fx.Node, what: str):
    """(the operand computed from the integers, the other one) of a binary op."""
    a, b = node.args[:2]
    a_int, b_int = _reaches_integer_cast(a), _reaches_integer_cast(b)
    if a_int == b_int:
        raise NoMatch(f"{what}_operand_not_found")
    return (a, b) if a_int else (b, a)


def _operand_value(operand, what: str) -> torch.Tensor:
    value = _evaluate(operand, {}) if isinstance(operand, fx.Node) else torch.tensor(float(operand))
    if not value.dtype.is_floating_point and value.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32):
        raise NoMatch(f"{what}_dtype_{value.dtype}")
    if value.dtype == torch.float64:
        raise NoMatch(f"{what}_dtype_{value.dtype}")  # not exact in the op's fp32
    return value


def _per_group(value: torch.Tensor, what: str, shape: tuple, N: int, K: int, G: int) -> torch.Tensor:
    """A scale or zero point broadcast against the dequantized weight of `shape` (whose row-major
    order is W's, in groups of G consecutive input columns) -> fp32 [N, K/G]; it must be constant
    within each group."""
    if value.dim() > len(shape):
        raise NoMatch(f"{what}_shape_not_broadcastable")
    try:
        grouped = value.expand(shape).reshape(N, K // G, G)  # a view unless the value varies along K
    except RuntimeError:
        raise NoMatch(f"{what}_shape_not_broadcastable") from None
    first = grouped[..., :1]
    if value.dim() and value.shape[-1] != 1 and not torch.equal(grouped, first.expand_as(grouped)):
        raise NoMatch(f"{what}_varies_within_group")
    return first.reshape(N, K // G).float().contiguous()


def _inferred_group(shape: tuple, K: int, operands: list) -> int:
    """The largest group (at least MIN_GROUP columns, dividing K) within which every scale and zero
    point of a [N, K] dequantization is constant: K (one per row) unless one varies along K."""
    varying = [(v, what) for v, what in operands if v.dim() and v.shape[-1] != 1]
    if not varying:
        return K
    N = shape[0]
    for group in sorted((g for g in range(MIN_GROUP, K) if K % g == 0), reverse=True):
        try:
            for value, what in varying:
                _per_group(value, what, shape, N, K, group)
            return group
        except NoMatch:
            continue
    raise NoMatch(f"{varying[0][1]}_varies_within_group")


def _fusecc_layout(values: torch.Tensor, zeros, N: int, K: int, G: int):
    """(qweight in fusecc's layout, zero points fp32 [N, K/G] or None, bits) for integer values
    [N, K]: a group whose values span at most 16 integers is int4 (its lowest value moved into its
    zero point unless all lie in 0..15), else int8. w = (v - z) * s = ((v - o) - (z - o)) * s, exactly."""
    grouped = values.reshape(N, K // G, G)
    lowest, highest = grouped.amin(-1).long(), grouped.amax(-1).long()  # [N, K/G]
    if int((highest - lowest).max()) <= 15:
        bits, offset = 4, None if int(lowest.min()) >= 0 and int(highest.max()) <= 15 else lowest
    elif int((highest - lowest).max()) <= 255:
        bits = 8
        offset = None if int(lowest.min()) >= -128 and int(highest.max()) <= 127 else lowest + 128
    else:
        raise NoMatch("integer_values_beyond_8_bits")
    if offset is not None:
        values = (grouped.long() - offset[..., None]).reshape(N, K)
        zeros = (0.0 if zeros is None else zeros) - offset.float()
    if bits == 4:
        return pack_int4(values), zeros, 4
    stored_as_is = offset is None and values.dtype == torch.int8 and values.is_contiguous()
    return values if stored_as_is else values.to(torch.int8).contiguous(), zeros, 8


def _evaluate(node, cache: dict) -> torch.Tensor:
    """The real value of `node`, computed from constants (frozen weights, factory ops)."""
    if not isinstance(node, fx.Node):
        return node
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = constant_value(node.graph.owning_module, node)
    elif node.op == "placeholder":
        raise NoMatch("weights_not_frozen")  # a graph input: its packing is known only at run time
    elif node.op == "call_function" and is_pure(node) and not is_random(node):
        flat, _ = tree_flatten((node.args, node.kwargs))
        if any(isinstance(a, (torch.SymInt, torch.SymFloat)) for a in flat):
            raise NoMatch("dequantization_depends_on_symbolic_shapes")
        args, kwargs = tree_map(lambda a: _evaluate(a, cache) if isinstance(a, fx.Node) else a,
                                (node.args, node.kwargs))
        try:
            value = node.target(*args, **kwargs)
        except Exception as exc:  # left to run time, where it raises in the user's terms
            raise NoMatch(f"dequantization_evaluation_failed:{type(exc).__name__}") from None
    else:
        raise NoMatch("dequantization_not_constant")
    cache[node] = value
    return value


def _bias(matmul: fx.Node):
    if matmul.target is aten.mm.default:
        return None
    bias, out = matmul.args[0], tensor_value(matmul)
    if matmul.kwargs.get("beta", 1) != 1 or matmul.kwargs.get("alpha", 1) != 1 or len(matmul.args) > 3:
        raise NoMatch("addmm_scaled")
    if not isinstance(bias, fx.Node) or _static_shape(bias) != (out.shape[1],) or tensor_value(bias).dtype != out.dtype:
        raise NoMatch("addmm_bias_not_one_per_output_channel")
    return bias


def _untransposed(node) -> fx.Node:
    """W [N, K] of the matmul's weight operand t(W) ([K, N])."""
    if is_call(node, aten.t.default) or (is_call(node, aten.transpose.int) and sorted(d % 2 for d in node.args[1:]) == [0, 1]):
        return node.args[0]
    if is_call(node, aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    raise NoMatch("weight_not_stored_output_channel_first")  # x @ W with W [K, N]


def _strip(node):
    """Past float -> float casts and copies that keep the values."""
    while (is_call(node, *_CASTS) and _is_float(node) and _is_float(node.args[0])) or is_call(node, *_COPIES):
        node = node.args[0]
    return node


def _constant_node(gm: fx.GraphModule, before: fx.Node, prefix: str, value: torch.Tensor) -> fx.Node:
    fake = before.meta["val"]
    return insert_constant_node(gm, prefix, value, fake.fake_mode.from_tensor(value, static_shapes=True), before=before)


def _module_path(node: fx.Node) -> str:
    """The nn.Module that holds the matmul (`layers.0.mlp.down_proj`) as Dynamo recorded it, or ''."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return re.sub(r"^L\['[^']*'\]\.?", "", path).replace("._modules['", ".").replace("']", "")


def _static_shape(node) -> tuple:
    shape = tensor_shape(node)
    if not all(isinstance(d, int) for d in shape):
        raise NoMatch("symbolic_weight_shape")
    return shape


def _is_integer(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor) and \
        not tensor_value(node).dtype.is_floating_point and not tensor_value(node).dtype.is_complex and tensor_value(node).dtype != torch.bool


def _is_float(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor) and \
        tensor_value(node).dtype.is_floating_point
