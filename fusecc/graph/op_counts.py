"""How an op is named in reports, dumps and pass statistics, and how many a graph holds.

One spelling everywhere: the overload packet without the overload (`aten.mm`, `fusecc.flash_attention`),
or the Python callable's name (`getitem`), or the method/module target as given.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

# Dynamo graphs (the ones a graph that runs unoptimized keeps) also call tensor methods and modules
_OPS = ("call_function", "call_method", "call_module")


def op_name(target) -> str:
    return str(getattr(target, "_overloadpacket", getattr(target, "__name__", target)))


def count_ops(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in _OPS)


def op_histogram(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n.target) for n in gm.graph.nodes if n.op in _OPS)
