"""Views as index math: the index expressions must read exactly the elements torch's views read.

Each chain of view ops is applied to `arange(n).reshape(shape)`; reading the result at every
output position must give the linear index that `view_input_index` + the input's strides compute."""

import itertools

import pytest
import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fusecc.codegen.index_math import contiguous_strides, shape_of, strided_offset, view_input_index

CHAINS = {
    "permute": (lambda t: t.permute(2, 0, 1), (2, 3, 4)),
    "transpose_reshape": (lambda t: t.transpose(0, 1).contiguous().reshape(3, 8).t(), (2, 3, 4)),
    "merge_split": (lambda t: t.reshape(6, 4).reshape(2, 12).reshape(4, 3, 2), (2, 3, 4)),
    "expand_unsqueeze": (lambda t: t.unsqueeze(1).expand(2, 5, 3, 4), (2, 3, 4)),
    "slice_select": (lambda t: t[:, 1:, ::2].select(0, 1), (2, 3, 4)),
    "squeeze": (lambda t: t.squeeze(1).unsqueeze(0), (4, 1, 3)),
    "negative_slice": (lambda t: t[..., -2:], (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_view_chain_reads_the_same_elements_as_torch(name):
    fn, shape = CHAINS[name]
    base = torch.arange(torch.Size(shape).numel()).reshape(shape)
    expected = fn(base)
    gm = make_fx(fn, tracing_mode="fake")(torch.empty(shape, dtype=torch.int64))
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    out_node = gm.graph.output_node().args[0][0] if isinstance(gm.graph.output_node().args[0], (list, tuple)) \
        else gm.graph.output_node().args[0]
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    symbols = [sympy.Symbol(f"i{k}", integer=True, nonnegative=True) for k in range(expected.dim())]
    index, node = list(symbols), out_node
    while node is not placeholder:
        assert node in nodes
        if node.target is torch.ops.aten.clone.default:  # a copy keeps the logical index
            node = node.args[0]
            continue
        index = view_input_index(node, index)
        node = node.args[0]
    offset = strided_offset(placeholder.meta["val"], index)
    for position in itertools.product(*(range(s) for s in expected.shape)):
        value = int(offset.subs(dict(zip(symbols, position))))
        assert value == expected[position].item(), f"{name} at {position}"


def test_contiguous_strides():
    assert contiguous_strides([2, 3, 4]) == [12, 4, 1]
    assert shape_of(torch.empty(2, 5)) == [2, 5]
