"""MoE matching: transformers' grouped-GEMM and batched-GEMM experts become one `fusecc::fused_moe` call.

transformers 5 runs a MoE block's experts with one of three implementations (`experts_implementation`):
"eager" loops over the experts that received tokens (data-dependent shapes: Dynamo breaks the graph
there, nothing to match); "grouped_mm", the default, and "batched_mm" are rewritten by this pass
(integrations/moe.py; S = tokens * top_k pairs, E experts, I = expert intermediate size).

grouped_mm (grouped_mm_experts_forward):

    before:  %w, %ids = topk(softmax(router logits), k)                  # routing: ids < E by construction
             %sorted, %perm = sort(view(%ids, [-1]))                      # pairs by expert
             %offs = cumsum(histc(%sorted, E, 0, E - 1), dtype=int32)     # [E] group ends
             %x_g  = [where(sentinel, 0,)] index(%x, [%perm // k])          # [S, H] rows per pair
             %h    = [where(..)] grouped_mm(%x_g, transpose(%w13), %offs)  # [S, 2I]
             %a    = silu(split(%h, I)[0]) * split(%h, I)[1]              # [S, I]
             %d    = [where(..)] grouped_mm(%a, transpose(%w2), %offs)    # [S, H]
             %o    = (%d * index(view(%w, [-1]), [%perm])[:, None])[inverse(%perm)]
             %out  = [to(x.dtype)] sum(view(%o, [T, k, H]), [1])          # [T, H]

batched_mm (batched_mm_experts_forward: one copy of the weights per pair, a bmm over the copies):

    before:  %e    = [clamp(, 0, E - 1)] view(%ids, [-1])                # [S] expert of each pair
             %x_r  = repeat_interleave(%x, k, 0)                          # [S, H] (unsqueeze/expand/clone/view)
             %h    = squeeze(bmm(index(%w13, [%e]), unsqueeze(%x_r, -1)), 2)   # [S, 2I]
             %a    = silu(split(%h, I)[0]) * split(%h, I)[1]
             %d    = squeeze(bmm(index(%w2, [%e]), unsqueeze(%a, -1)), 2)      # [S, H]
             %out  = [to(x.dtype)] sum(view(%d * view(%w, [-1])[:, None], [T, k, H]), [1])

    after (both):  %out  = fusecc.fused_moe(%x, %w13, %w2, %w, %ids)

grouped_mm is `aten._grouped_mm` (CUDA; CPU bf16) or transformers' `grouped_mm_fallback` op (a torch
loop, taken under Dynamo for other dtypes). The sentinel masks (`where(sorted >= E, 0, ..)`, and the
clamp of batched_mm, for expert parallelism) change nothing when the ids come from a top-k over E
router scores, which the match requires. Anything else stays as it was; `stats["skipped:<reason>"]`
and `reasons[node name]` say why, and `stats["rewritten:<pattern>"]` counts the blocks rewritten.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.fused_moe)
from fusecc.graph.constants import constant_value
from fusecc.graph.matching import NoMatch, is_call, tensor_shape, tensor_value
from fusecc.graph.node_kinds import is_impure, is_random
from fusecc.passes.base import GraphPass, PassResult

aten = torch.ops.aten
prims = torch.ops.prims
PATTERN = "transformers_grouped_mm_experts"
BATCHED_PATTERN = "transformers_batched_mm_experts"


def _grouped_mm_targets() -> set:
    targets = {aten._grouped_mm.default} if hasattr(aten, "_grouped_mm") else set()
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    try:
        targets.add(fallback.default)  # registered when transformers' integrations/moe.py is imported
    except (AttributeError, RuntimeError):
        pass
    return targets


class MoEMatching(GraphPass):
    name = "moe_matching"
    repeat_to_fixed_point = False

    def __init__(self):
        self.reasons: dict[str, str] = {}  # anchor node name -> why it was not rewritten (last run)

    def run(self, gm: fx.GraphModule) -> PassResult:
        self.reasons = {}
        stats: Counter = Counter()
        grouped = _grouped_mm_targets()
        for node in list(gm.graph.nodes):
            batched = _is_batched_mm_experts(node)
            if not batched and (node.op != "call_function" or node.target not in grouped):
                continue
            try:
                # the gate_up projection is matched from the down projection, whose input is silu * up
                if batched:
                    if not is_call(_strip_any_cast(node.args[1].args[0]), aten.mul.Tensor):
                        continue
                    final, args = _match_batched(node)
                else:
                    if not is_call(_input(node), aten.mul.Tensor):
                        continue
                    final, args = _match(node, grouped)
            except NoMatch as miss:
                stats[f"skipped:{miss.reason}"] += 1
                self.reasons[node.name] = miss.reason
                continue
            with gm.graph.inserting_before(final):
                fused = gm.graph.call_function(torch.ops.fusecc.fused_moe.default, args)
            fused.meta["val"] = final.meta["val"]
            final.replace_all_uses_with(fused)
            stats["rewritten"] += 1
            stats[f"rewritten:{BATCHED_PATTERN if batched else PATTERN}"] += 1
        if stats["rewritten"]:
            # the sort, gathers and grouped GEMMs the op replaced (mutations and RNG stay, as in dce.py)
            gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(n) or is_random(n))
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, stats["rewritten"] > 0, stats)


def _match(down: fx.Node, grouped: set) -> tuple[fx.Node, tuple]:
    """(the node the op replaces, fused_moe args) for the down-projection grouped_mm `down`."""
    w2, offs = _transposed_weight(down), _offsets(down)
    split, inter = _gate_up_split(_input(down))
    gate_up = _strip_sentinel(split.args[0])
    if not is_call(gate_up, *grouped) or _offsets(gate_up) is not offs:
        raise NoMatch("gate_up_not_grouped_mm_over_same_offsets")
    w13 = _transposed_weight(gate_up)
    E, H = _expert_shapes(w13, w2, inter)
    # rows: x[perm // k] with perm from sorting the flattened top-k ids of a routing over E experts
    rows = _strip_sentinel(_input(gate_up))
    if not is_call(rows, aten.index.Tensor) or len(rows.args[1]) != 1:
        raise NoMatch("rows_not_gathered_from_hidden")
    x, (row_of_pair,) = rows.args
    perm, top_k = _floor_div(row_of_pair)
    sort = _getitem_of(perm, 1, aten.sort.default)
    ids = _flattened(sort.args[0])
    weights_src = _routing_weights(down, perm)
    topk = _getitem_of(ids, 1, aten.topk.default)
    if tensor_shape(ids)[-1] != top_k or tensor_shape(topk.args[0])[-1] != E or tensor_shape(x)[-1] != H or len(tensor_shape(x)) != 2:
        raise NoMatch("routing_shapes")
    if tensor_shape(weights_src)[-1] != top_k:
        raise NoMatch("routing_weight_shapes")
    _check_offsets(offs, sort, E)
    final = _reduction(down, weights_src, perm, top_k, H)
    _check_dtypes(final, x, w13, w2)
    return final, (x, w13, w2, weights_src, ids)


# ---------------------------------------------------------------- the pieces

def _gate_up_split(act) -> tuple[fx.Node, int]:
    """(the split of the gate_up product into its gate and up halves, inter) for act = silu(gate) * up."""
    gate, up_half = _swiglu_halves(act)
    split = _split_source(gate, 0)
    if _split_source(up_half, 1) is not split:
        raise NoMatch("gate_and_up_not_halves_of_one_split")
    return split, split.args[1] if is_call(split, aten.split.Tensor) else split.args[1][0]


def _expert_shapes(w13: fx.Node, w2: fx.Node, inter) -> tuple[int, int]:
    """(experts, hidden) when w13 is [E, 2 * inter, H] and w2 [E, H, inter]."""
    E, two_inter, H = tensor_shape(w13)
    if not isinstance(inter, int) or two_inter != 2 * inter or tensor_shape(w2) != (E, H, inter):
        raise NoMatch("expert_weight_shapes")
    return E, H


def _check_dtypes(final: fx.Node, x: fx.Node, w13: fx.Node, w2: fx.Node) -> None:
    """The fused op computes in x's dtype: the weights and the replaced output must share it."""
    if tensor_value(final).dtype != tensor_value(x).dtype or not (tensor_value(x).dtype == tensor_value(w13).dtype
                                                                  == tensor_value(w2).dtype):
        raise NoMatch("dtypes")


def _is_batched_mm_experts(node) -> bool:
    """bmm(weights[expert of each pair], unsqueeze(rows, -1)): transformers' "batched_mm" experts."""
    if not is_call(node, aten.bmm.default):
        return False
    gathered, column = node.args[0], node.args[1]
    try:
        return (is_call(gathered, aten.index.Tensor) and len(gathered.args[1]) == 1
                and len(tensor_shape(gathered.args[0])) == 3 and len(tensor_shape(gathered.args[1][0])) == 1
                and is_call(column, aten.unsqueeze.default) and column.args[1] in (-1, 2))
    except NoMatch:  # an operand without tensor meta: not this pattern
        return False


def _match_batched(down: fx.Node) -> tuple[fx.Node, tuple]:
    """(the node the op replaces, fused_moe args) for the down-projection bmm of batched_mm experts."""
    w2, expert_of_pair = down.args[0].args[0], down.args[0].args[1][0]
    split, inter = _gate_up_split(down.args[1].args[0])
    gate_up = _bmm_of_squeezed(_strip_cast(split.args[0]))
    if not _is_batched_mm_experts(gate_up) or gate_up.args[0].args[1][0] is not expert_of_pair:
        raise NoMatch("gate_up_not_batched_mm_over_same_experts")
    w13 = gate_up.args[0].args[0]
    E, H = _expert_shapes(w13, w2, inter)
    ids = _flattened(_strip_clamp(expert_of_pair, E))
    topk = _getitem_of(ids, 1, aten.topk.default)
    top_k = tensor_shape(ids)[-1]
    x = _repeated_rows(_strip_cast(gate_up.args[1].args[0]), top_k)
    if tensor_shape(topk.args[0])[-1] != E or len(tensor_shape(x)) != 2 or tensor_shape(x)[-1] != H:
        raise NoMatch("routing_shapes")
    final, weights_src = _batched_reduction(_squeeze_of(down), top_k, H)
    if tensor_shape(weights_src) != tensor_shape(ids):
        raise NoMatch("routing_weight_shapes")
    _check_dtypes(final, x, w13, w2)
    return final, (x, w13, w2, weights_src, ids)


def _bmm_of_squeezed(node) -> fx.Node:
    """bmm of squeeze(bmm, 2): the [S, N, 1] product viewed [S, N]."""
    if is_call(node, prims.squeeze.default, aten.squeeze.dim, aten.squeeze.dims) and is_call(node.args[0], aten.bmm.default):
        return node.args[0]
    raise NoMatch("gate_up_not_squeezed_bmm")


def _squeeze_of(bmm: fx.Node) -> fx.Node:
    squeeze = _single_user(bmm)
    if not is_call(squeeze, prims.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
        raise NoMatch("down_bmm_not_squeezed")
    return squeeze


def _strip_clamp(node, experts: int):
    """Past clamp(ids, 0, E - 1): a no-op on top-k ids over E scores."""
    if is_call(node, aten.clamp.default):
        if list(node.args[1:3]) != [0, experts - 1]:
            raise NoMatch("expert_ids_clamped_to_other_range")
        return node.args[0]
    return node


def _repeated_rows(node, top_k: int) -> fx.Node:
    """x of repeat_interleave(x, top_k, 0), as Dynamo decomposes it: view(clone(expand(unsqueeze(x, 1))))."""
    if is_call(node, aten.repeat_interleave.self_int) and node.args[1] == top_k and node.kwargs.get("dim", 0) == 0:
        return node.args[0]
    if is_call(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        inner = node.args[0]
        if is_call(inner, aten.clone.default):
            inner = inner.args[0]
        if is_call(inner, aten.expand.default) and is_call(inner.args[0], aten.unsqueeze.default) \
                and inner.args[0].args[1] == 1 and tensor_shape(inner)[1] == top_k:
            return inner.args[0].args[0]
    raise NoMatch("rows_not_repeated_per_expert")


def _batched_reduction(down: fx.Node, top_k: int, hidden: int) -> tuple[fx.Node, fx.Node]:
    """(sum over k of view(down * w[:, None], [T, k, H]) [cast back], the [T, k] routing weights)."""
    scaled = _single_user(down)
    if not is_call(scaled, aten.mul.Tensor):
        raise NoMatch("down_output_not_scaled_by_routing_weights")
    other = scaled.args[1] if scaled.args[0] is down else scaled.args[0]
    if not (is_call(other, aten.unsqueeze.default) and other.args[1] in (-1, 1)):
        raise NoMatch("routing_weights_not_a_column")
    weights_src = _flattened(_strip_cast(other.args[0]))
    return _sum_over_top_k(scaled, top_k, hidden), weights_src


def _silu_input(node):
    """x of silu(x), or of its decomposition x * sigmoid(x) (with casts around it); else None."""
    node = _strip_any_cast(node)
    if is_call(node, aten.silu.default):
        return _strip_any_cast(node.args[0])
    if is_call(node, aten.mul.Tensor):
        a, b = (_strip_any_cast(arg) for arg in node.args)
        for x, s in ((a, b), (b, a)):
            if is_call(s, aten.sigmoid.default) and _strip_any_cast(s.args[0]) is x:
                return x
    return None


def _swiglu_halves(act: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(gate, up) of silu(gate) * up."""
    act = _strip_any_cast(act)
    if is_call(act, aten.mul.Tensor):
        for silu, up in (act.args, act.args[::-1]):
            gate = _silu_input(silu)
            if gate is not None:
                return gate, _strip_any_cast(up)
    raise NoMatch("activation_not_silu_times_up")


def _input(grouped_mm: fx.Node) -> fx.Node:
    return _strip_cast(grouped_mm.args[0])


def _offsets(grouped_mm: fx.Node):
    return grouped_mm.kwargs.get("offs", grouped_mm.args[2] if len(grouped_mm.args) > 2 else None)


def _strip_cast(node):
    """Past same-dtype conversions (`input.to(weight.dtype)`)."""
    while (is_call(node, aten._to_copy.default, prims.convert_element_type.default)
           and tensor_value(node).dtype == tensor_value(node.args[0]).dtype):
        node = node.args[0]
    return node


def _strip_sentinel(node):
    """Past `where(mask, 0, t)` (transformers' expert-parallel sentinel masks; see the module docstring)."""
    node = _strip_cast(node)
    if is_call(node, aten.where.self) and _is_zero(node.args[1]):
        return node.args[2]
    return node


def _is_zero(node) -> bool:
    """0, as a Python number, a scalar_tensor / full node, or a one-element constant."""
    if isinstance(node, (int, float)):
        return node == 0
    while is_call(node, aten.lift_fresh_copy.default, aten.clone.default, aten._to_copy.default,
              prims.convert_element_type.default):
        node = node.args[0]
    if is_call(node, aten.scalar_tensor.default):
        return node.args[0] == 0
    if is_call(node, aten.full.default):
        return node.args[1] == 0
    value = _constant(node)
    return value is not None and value.numel() == 1 and float(value) == 0.0


def _constant(node):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return constant_value(node.graph.owning_module, node)
    return None


def _transposed_weight(grouped_mm: fx.Node) -> fx.Node:
    t = grouped_mm.args[1]
    if is_call(t, aten.transpose.int) and sorted(d % 3 for d in t.args[1:]) == [1, 2] and len(tensor_shape(t.args[0])) == 3:
        return t.args[0]
    if is_call(t, aten.permute.default) and list(t.args[1]) == [0, 2, 1]:
        return t.args[0]
    raise NoMatch("grouped_mm_weight_not_transposed_3d")  # transformers' is_transposed=True layout


def _split_source(node, index: int) -> fx.Node:
    if not (is_call(node, operator.getitem) and node.args[1] == index
            and is_call(node.args[0], aten.split.Tensor, aten.split_with_sizes.default)):
        raise NoMatch("gate_up_not_split_in_halves")
    split = node.args[0]
    if len(split.args) > 2 and split.args[2] not in (-1, 1):
        raise NoMatch("gate_up_split_not_last_dim")
    if is_call(split, aten.split_with_sizes.default):
        sizes = list(split.args[1])
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise NoMatch("gate_up_split_not_halves")
    return split


def _getitem_of(node, index: int, target) -> fx.Node:
    if not (is_call(node, operator.getitem) and node.args[1] == index and is_call(node.args[0], target)):
        raise NoMatch(f"expected_{target._opname}_output_{index}")
    return node.args[0]


def _floor_div(node) -> tuple[fx.Node, int]:
    if is_call(node, aten.floor_divide.default) and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    floor = is_call(node, aten.div.Tensor_mode) and node.kwargs.get("rounding_mode") == "floor"
    if floor and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    raise NoMatch("row_index_not_perm_floordiv_top_k")


def _flattened(node) -> fx.Node:
    if is_call(node, aten.view.default, aten.reshape.default, aten._unsafe_view.default) and len(tensor_shape(node)) == 1:
        return node.args[0]
    raise NoMatch("sorted_ids_not_flattened_topk_ids")


def _routing_weights(down: fx.Node, perm: fx.Node) -> fx.Node:
    """The [T, k] weights whose flattened, perm-gathered copy scales the down projection's rows."""
    scaled = _single_user(_single_user_through_sentinel(down))
    if not is_call(scaled, aten.mul.Tensor):
        raise NoMatch("down_output_not_scaled_by_routing_weights")
    for w in scaled.args:
        if is_call(w, aten.unsqueeze.default) and is_call(w.args[0], aten.index.Tensor):
            gathered = w.args[0]
            if len(gathered.args[1]) == 1 and gathered.args[1][0] is perm:
                return _flattened(_strip_cast(gathered.args[0]))
    raise NoMatch("routing_weights_not_gathered_by_perm")


def _check_offsets(offs, sort: fx.Node, experts: int) -> None:
    if not is_call(offs, aten.cumsum.default):
        raise NoMatch("offsets_not_cumsum")
    hist = offs.args[0]
    if not (is_call(hist, aten.histc.default) and list(hist.args[1:4]) == [experts, 0, experts - 1]):
        raise NoMatch("offsets_not_histc_over_experts")
    source = _strip_any_cast(hist.args[0])
    if source is not _getitem_source(sort, 0):
        raise NoMatch("offsets_not_from_sorted_ids")


def _strip_any_cast(node):
    while is_call(node, aten._to_copy.default, prims.convert_element_type.default):
        node = node.args[0]
    return node


def _getitem_source(sort: fx.Node, index: int):
    return next((u for u in sort.users if is_call(u, operator.getitem) and u.args[1] == index), None)


def _single_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise NoMatch("intermediate_has_other_users")
    return users[0]


def _single_user_through_sentinel(node: fx.Node) -> fx.Node:
    user = _single_user(node)
    return user if is_call(user, aten.where.self) and user.args[2] is node and _is_zero(user.args[1]) else node


def _reduction(down: fx.Node, weights: fx.Node, perm: fx.Node, top_k: int, hidden: int) -> fx.Node:
    """scaled[inverse(perm)] viewed [T, k, H], summed over k (and cast back): the node to replace."""
    scaled = _single_user(_single_user_through_sentinel(down))
    unsorted = _single_user(scaled)
    if not (is_call(unsorted, aten.index.Tensor) and len(unsorted.args[1]) == 1 and _is_inverse(unsorted.args[1][0], perm)):
        raise NoMatch("output_not_unsorted_by_inverse_perm")
    return _sum_over_top_k(unsorted, top_k, hidden)


def _sum_over_top_k(rows: fx.Node, top_k: int, hidden: int) -> fx.Node:
    """sum(view(rows, [T, k, H]), 1) (and its cast back): the node the fused op replaces."""
    view = _single_user(rows)
    if not (is_call(view, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
            and len(tensor_shape(view)) == 3 and tensor_shape(view)[1:] == (top_k, hidden)):
        raise NoMatch("output_not_viewed_tokens_top_k_hidden")
    total = _single_user(view)
    if not (is_call(total, aten.sum.dim_IntList) and list(total.args[1]) in ([1], [-2])):
        raise NoMatch("output_not_summed_over_top_k")
    users = list(total.users)
    if len(users) == 1 and is_call(users[0], aten._to_copy.default, prims.convert_element_type.default):
        return users[0]
    return total


def _is_inverse(node, perm: fx.Node) -> bool:
    """index_put(empty_like(perm), [perm], arange(S)): inv[perm[i]] = i."""
    if not (is_call(node, aten.index_put.default) and len(node.args[1]) == 1 and node.args[1][0] is perm):
        return False
    values = node.args[2]
    from_zero = is_call(values, aten.arange.default) or (
        is_call(values, aten.arange.start, aten.arange.start_step) and values.args[0] == 0
        and (len(values.args) < 3 or values.args[2] == 1))
    if from_zero:  # the length may be symbolic (tokens * top_k): compare through the shape environment
        return statically_known_true(tensor_value(values).shape[0] == tensor_value(perm).shape[0])
    value = _constant(values)
    return value is not None and torch.equal(value.cpu(), torch.arange(value.numel(), dtype=value.dtype))
