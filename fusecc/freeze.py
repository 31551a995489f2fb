"""Freezing: parameters and buffers the graph never mutates become compile-time constants.

With inlined nn.Modules, Dynamo passes weights to the graph as ordinary inputs. When the user
promises the weights will not change (`freeze=True`), each such input is replaced by a
`get_attr` constant holding the real tensor, which lets constant folding precompute weight
transposes, casts and tables. The placeholder stays (it is the calling convention) but has no
users. Anything we cannot map with certainty is left as an input, and the dump says so.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fusecc.passes.constants import insert_constant_node
from fusecc.passes.node_kinds import is_mutated


def is_weight_input(dynamo_node: fx.Node, example) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = dynamo_node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    name = source() if callable(source) else str(source)
    return "._parameters[" in name or "._buffers[" in name


def freeze_weights(aten_gm: fx.GraphModule, flat_inputs: list, is_weight: list[bool], dump=None) -> int:
    """Turn unmutated weight placeholders of `aten_gm` into constants; returns how many."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        if dump is not None:
            dump.note(f"freeze skipped: ATen graph has {len(placeholders)} inputs but "
                      f"{len(flat_inputs)} were passed (deduplicated or synthetic inputs)")
        return 0
    frozen = 0
    first_op = next((n for n in aten_gm.graph.nodes if n.op != "placeholder"), None)
    for node, value, weight in zip(placeholders, flat_inputs, is_weight):
        if not weight or not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, torch.nn.Parameter):
            continue
        if is_mutated(node):
            if dump is not None:
                dump.note(f"not frozen: {node.name} is mutated by the graph")
            continue
        constant = insert_constant_node(aten_gm, "_frozen_param", value.detach(), node.meta["val"], before=first_op)
        node.replace_all_uses_with(constant)
        frozen += 1
    if frozen:
        aten_gm.recompile()
    return frozen
