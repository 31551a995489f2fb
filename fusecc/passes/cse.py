"""Common-subexpression elimination of pure ops.

    before:  %a = aten.mul(%x, %y)      # f32[4, 8]
             %b = aten.mul(%x, %y)      # f32[4, 8], same op, same inputs
             %c = aten.add(%a, %b)
    after:   %a = aten.mul(%x, %y)
             %c = aten.add(%a, %a)

Two nodes merge when they have the same target, the same (already merged) inputs and the same
literal arguments. Random ops (two draws differ) and impure ops (mutations, asserts) never
merge. Nothing merges across a mutation of what it reads: after `write_kv_cache(k, v, k_cache,
...)` a read of k_cache (or of a view of it) is not the read before, but the RoPE table gathered
at the same positions is, in every layer. (An op whose writes the schema does not name, e.g. a
Python callable, ends every merge.) Two nodes that are both graph outputs (or views returned as
outputs) do not merge either: the caller would receive one tensor twice and a write to one would
show in the other.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.node_kinds import alias_root, feeds_output, is_pure, may_write, written_args
from fusecc.graph.op_counts import op_name


class CommonSubexpressionElimination(GraphPass):
    name = "cse"

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        seen: dict[tuple, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if may_write(node):
                # A mutation (copy_ into x) changes what later reads of x see: `x + 1` after it
                # is not the `x + 1` before it. Forget what read the written storage.
                _forget_readers(seen, written_args(node))
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


def _forget_readers(seen: dict, written: "list[fx.Node] | None") -> None:
    """Drop the entries whose node reads (directly, or through a view) storage that `written`
    lives in; every entry when what was written is unknown."""
    if written is None:
        seen.clear()
        return
    roots = {alias_root(w) for w in written}
    if not roots:
        return
    for key, node in list(seen.items()):
        inputs = node.all_input_nodes if node.op == "call_function" else ()
        if any(alias_root(i) in roots for i in inputs) or alias_root(node) in roots:
            del seen[key]


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


