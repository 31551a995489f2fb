"""Common-subexpression elimination of pure ops.

    before:  %a = aten.mul(%x, %y)      # f32[4, 8]
             %b = aten.mul(%x, %y)      # f32[4, 8], same op, same inputs
             %c = aten.add(%a, %b)
    after:   %a = aten.mul(%x, %y)
             %c = aten.add(%a, %a)

Two nodes merge when they have the same target, the same (already merged) inputs and the same
literal arguments. Random ops (two draws differ) and impure ops (mutations, asserts) never
merge, and nothing merges across a mutation. Two nodes that are both graph outputs (or views
returned as outputs) do not merge either: the caller would receive one tensor twice and a
write to one would show in the other.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.node_kinds import feeds_output, is_pure, may_write
from fusecc.graph.op_counts import op_name


class CommonSubexpressionElimination(GraphPass):
    name = "cse"

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        seen: dict[tuple, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if may_write(node):
                # A mutation (copy_ into x) changes what later reads of x see: `x + 1` after it
                # is not the `x + 1` before it. Forget everything seen so far.
                seen.clear()
                continue
            if node.op == "get_attr":
                key = ("get_attr", node.target)
            elif node.op == "call_function" and is_pure(node):
                try:
                    key = (node.target, _freeze(node.args), _freeze(node.kwargs))
                    hash(key)
                except TypeError:
                    continue  # an unhashable literal argument: leave the node alone
            else:
                continue
            twin = seen.get(key)
            if twin is None:
                seen[key] = node
                continue
            if feeds_output(node) and feeds_output(twin):
                continue  # directly or through views: two outputs would share storage
            node.replace_all_uses_with(twin)
            gm.graph.erase_node(node)
            stats["merged"] += 1
            stats[f"merged:{op_name(node.target)}"] += 1
        if stats:
            gm.recompile()
        return PassResult(gm, bool(stats), stats)


def _freeze(value):
    """A hashable key for an argument tree. Nodes hash by identity; literals by value and type
    (so 1 and 1.0 and True stay distinct: they change the result dtype)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value.node.expr))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor literal")
    if isinstance(value, float):
        return ("float", repr(value))  # keeps -0.0 apart from 0.0
    return (type(value).__name__, value)


