"""Registering compile-time constants (frozen weights, folded results) on a GraphModule.

Constants live as plain tensor attributes read by `get_attr` nodes; the names we created are
remembered in `gm._fusecc_constants` so that DCE can free the ones that become unused.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def add_constant(gm: fx.GraphModule, prefix: str, value: torch.Tensor) -> str:
    owned = gm.__dict__.setdefault("_fusecc_constants", set())
    index = len(owned)
    while hasattr(gm, f"{prefix}{index}"):
        index += 1
    name = f"{prefix}{index}"
    # A non-persistent buffer: visible to get_attr, never part of a state_dict.
    gm.register_buffer(name, value, persistent=False)
    owned.add(name)
    return name


def insert_constant_node(gm: fx.GraphModule, prefix: str, value: torch.Tensor, fake_val, before: fx.Node) -> fx.Node:
    name = add_constant(gm, prefix, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_val
    return node


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    assert node.op == "get_attr", node
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value
