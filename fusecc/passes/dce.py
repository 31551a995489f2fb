"""Dead-code elimination: drop pure nodes whose results nobody uses.

    before:  %t = aten.t(%w)                 # f32[8, 8], unused
             %y = aten.relu(%x)              # f32[4, 8]
             return (%y,)
    after:   %y = aten.relu(%x)
             return (%y,)

Mutations (`copy_` back into an input, `index_put_`), asserts and RNG draws are impure and
always stay, even when their result is unused. Unused placeholders stay too: they are the
calling convention. Constants (get_attr) that become unused are deleted from the module.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.node_kinds import is_impure, is_random


class DeadCodeElimination(GraphPass):
    name = "dce"

    def run(self, gm: fx.GraphModule) -> PassResult:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(n) or is_random(n))
        removed_attrs = delete_unused_constants(gm)
        removed = before - len(gm.graph.nodes)
        if removed:
            # eliminate_dead_code only edits the graph: without this, gm(...) would still run the
            # old code, which reads the constants just deleted.
            gm.recompile()
        stats = Counter({"removed": removed}) if removed else Counter()
        if removed_attrs:
            stats["constants_freed"] = removed_attrs
        return PassResult(gm, removed > 0, stats)


def delete_unused_constants(gm: fx.GraphModule) -> int:
    """Free tensors held by the module that no get_attr node refers to any more."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    owned = getattr(gm, "_fusecc_constants", set())
    dead = [name for name in owned if name not in used]
    for name in dead:
        delattr(gm, name)
        owned.discard(name)
    return len(dead)
