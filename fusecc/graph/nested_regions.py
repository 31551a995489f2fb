"""Nested compile regions (torch.compiler.nested_compile_region): Dynamo and AOTAutograd trace a
region once and call its graph from every place it repeats (`invoke_subgraph`), which is what makes
a model's compile time cost about one decoder layer instead of N. fusecc's passes and codegen work on
one flat graph, so the calls are inlined again in the ATen graph before freezing: cheap (copying
nodes), and every pass sees each layer's weights as it would without regions.
"""

from __future__ import annotations

import torch
from torch import fx


def inline_nested_regions(gm: fx.GraphModule) -> int:
    """Inline every invoke_subgraph call of `gm` (nested ones too); returns how many there were."""
    from torch._higher_order_ops.passes.inline_invoke_subgraph import inline_invoke_subgraph

    calls = len(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph))
    if not calls:
        return 0
    inline_invoke_subgraph(gm)
    used = {node.target for node in gm.graph.find_nodes(op="get_attr")}
    for name, child in list(gm.named_children()):
        if isinstance(child, fx.GraphModule) and name not in used:
            delattr(gm, name)  # a region's graph module, now copied into gm
    gm.graph.lint()
    gm.recompile()
    return calls
