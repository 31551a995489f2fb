"""An FX GraphModule as its generated Python code, that code's globals and the attributes it reads.

Pickling a GraphModule the default way re-traces its code with FX's symbolic tracer on load,
which is slow for a model's graph and fails on some ops; a stored graph needs neither the FX
graph nor tracing, only something to call. So the code FX generated is stored and exec'd again:

    def forward(self, arg0_1, arg1_1):
        _folded0 = self._folded0
        mm = torch.ops.aten.mm.default(arg0_1, _folded0); ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class PortableModule:
    source: str                        # `def forward(self, ...)`
    globals: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)  # dotted name -> tensor or PortableModule


def from_graph_module(gm: fx.GraphModule) -> PortableModule:
    code = gm.graph.python_code(root_module="self")
    attributes: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in attributes:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            attributes[node.target] = value  # a GraphModule pickles as a PortableModule itself
    return PortableModule(code.src, dict(code.globals), attributes)


class LoadedModule(torch.nn.Module):
    """A stored graph's forward, with its attributes set as the code reads them (`self.name`)."""


def to_module(portable: PortableModule) -> torch.nn.Module:
    root = LoadedModule()
    for dotted, value in portable.attributes.items():
        owner = root
        *path, name = dotted.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, LoadedModule())
            owner = getattr(owner, part)
        if isinstance(value, torch.nn.Module):
            owner.add_module(name, value)
        else:
            object.__setattr__(owner, name, value)  # a plain attribute: never part of a state_dict
    scope = dict(portable.globals)
    exec(compile(portable.source, "<fusecc-stored-graph>", "exec"), scope)
    forward = scope["forward"]
    root.forward = forward.__get__(root)
    return root
