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
    calls = len(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph))
    if not calls:
        return 0
    try:
        from torch._higher_order_ops.passes.inline_invoke_subgraph import inline_invoke_subgraph
    except ImportError:  # torch before 2.13 (the GPU machine's 2.11): our own copy of the nodes
        inline_invoke_subgraph = _inline_calls
    inline_invoke_subgraph(gm)
    used = {node.target for node in gm.graph.find_nodes(op="get_attr")}
    for name, child in list(gm.named_children()):
        if isinstance(child, fx.GraphModule) and name not in used:
            delattr(gm, name)  # a region's graph module, now copied into gm
    gm.graph.lint()
    gm.recompile()
    return calls


def _inline_calls(gm: fx.GraphModule) -> None:
    """invoke_subgraph(get_attr region, identifier, *operands) -> the region's nodes, its placeholders
    bound to the operands and the getitems of the call to its outputs; until no call is left."""
    target = torch.ops.higher_order.invoke_subgraph
    while True:
        calls = gm.graph.find_nodes(op="call_function", target=target)
        if not calls:
            for node in gm.graph.find_nodes(op="get_attr"):
                if not node.users:
                    gm.graph.erase_node(node)  # the regions' get_attr nodes, their calls gone
            return
        for call in calls:
            region = getattr(gm, call.args[0].target)
            env: dict = dict(zip([n for n in region.graph.nodes if n.op == "placeholder"], call.args[2:]))
            outputs = None
            with gm.graph.inserting_before(call):
                for node in region.graph.nodes:
                    if node.op == "placeholder":
                        continue
                    if node.op == "output":
                        outputs = fx.node.map_arg(node.args[0], lambda a: env[a])
                        break
                    copied = gm.graph.node_copy(node, lambda a: env[a])
                    if node.op == "get_attr":  # a nested region or constant of the region: moved up to gm
                        name = f"{call.args[0].target}_{node.target}".replace(".", "_")
                        setattr(gm, name, getattr(region, node.target))
                        copied.target = name
                    env[node] = copied
            for user in list(call.users):
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
            gm.graph.erase_node(call)
