"""Building the graphs the passes see, for the pass tests.

The backend hands every pass an ATen inference graph traced with fusecc's decomposition table,
whose nodes carry fake tensors (or SymInts) in `meta['val']`. `trace` makes the same kind of
graph from a small function with `make_fx`; `freeze_input` turns one of its inputs into a
`get_attr` constant the way `fusecc/freeze.py` does for weights.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from fusecc.decompositions import decomposition_table
from fusecc.graph.constants import insert_constant_node

aten = torch.ops.aten


def trace(fn, *inputs, symbolic: bool = False) -> fx.GraphModule:
    """ATen graph of `fn` with fake-tensor meta; `symbolic=True` gives SymInt sizes (s0, s1, ...)."""
    return make_fx(fn, tracing_mode="symbolic" if symbolic else "fake",
                   decomposition_table=decomposition_table())(*inputs)


def freeze_input(gm: fx.GraphModule, index: int, value: torch.Tensor) -> fx.Node:
    """Replace the uses of placeholder `index` by a get_attr constant holding `value` (the
    placeholder stays: it is the calling convention, as in fusecc/freeze.py)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    node = placeholders[index]
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    constant = insert_constant_node(gm, "_frozen_param", value, node.meta["val"], before=first_op)
    node.replace_all_uses_with(constant)
    gm.recompile()
    return constant


def run_pass(graph_pass, gm: fx.GraphModule):
    """Run one pass; returns (PassResult, graph code after it)."""
    result = graph_pass.run(gm)
    assert result.graph_module is gm
    return result, code(gm)


def code(gm: fx.GraphModule) -> str:
    """The module's code as Python (what `gm(...)` runs: a pass that forgets to recompile shows
    stale code here), stable across machines: no blank lines, no trailing whitespace."""
    lines = [line.rstrip() for line in gm.code.strip().splitlines()]
    text = "\n".join(line for line in lines if line.strip())
    # Devices are spelled differently by torch versions (device(type='cpu') vs 'cpu').
    return re.sub(r"device\(type='cpu'\)", "cpu", text)


def op_counts(gm: fx.GraphModule) -> Counter:
    """call_function nodes per overload packet name, e.g. {'aten.mul': 2}."""
    counts: Counter = Counter()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            target = n.target
            packet = getattr(target, "_overloadpacket", None)
            counts[str(packet) if packet is not None else getattr(target, "__name__", str(target))] += 1
    return counts


def count(gm: fx.GraphModule, target) -> int:
    """How many call_function nodes have exactly this target (an OpOverload or callable)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def constants(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr"]


def assert_identical(actual, expected) -> None:
    """Bit-for-bit the same values: dtype, shape, NaN positions and the sign of zeros."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected):
            assert_identical(a, e)
        return
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype.is_floating_point:
        assert torch.equal(actual.isnan(), expected.isnan()), (actual, expected)
        keep = ~expected.isnan()
        assert torch.equal(actual[keep], expected[keep]), (actual, expected)
        assert torch.equal(actual[keep].signbit(), expected[keep].signbit()), (actual, expected)
    else:
        assert torch.equal(actual, expected), (actual, expected)
