"""What the graph key depends on: the graph, its inputs' metadata, the options, the device."""

import torch
import torch.fx as fx

from fusecc.compile_cache.graph_cache import options_factors
from fusecc.compile_cache.key import graph_key
from fusecc.config import FuseccOptions


def key(fn, inputs, **options):
    gm = fx.symbolic_trace(fn)
    opts = FuseccOptions.from_sources(options=options, environ={})
    return graph_key(gm, inputs, [False] * len(inputs), options_factors(opts), inputs[0].device)


def add_one(x):
    return x + 1


def add_two(x):
    return x + 2


def test_same_graph_and_inputs_same_key():
    assert key(add_one, [torch.randn(4, 8)]) == key(add_one, [torch.zeros(4, 8)])  # values are not part of it


def test_key_changes_with_graph_inputs_and_options():
    base = key(add_one, [torch.randn(4, 8)])
    changed = {
        "graph": key(add_two, [torch.randn(4, 8)]),
        "shape": key(add_one, [torch.randn(4, 9)]),
        "dtype": key(add_one, [torch.randn(4, 8, dtype=torch.float64)]),
        "layout": key(add_one, [torch.randn(8, 4).t()]),
        "option": key(add_one, [torch.randn(4, 8)], freeze=True),
        "mode": key(add_one, [torch.randn(4, 8)], mode="max-autotune-no-cudagraphs"),
    }
    assert all(k != base for k in changed.values()), [name for name, k in changed.items() if k == base]
    assert len(set(changed.values())) == len(changed)


def test_dump_dir_does_not_change_the_key(tmp_path):
    assert key(add_one, [torch.randn(2)]) == key(add_one, [torch.randn(2)], dump_dir=str(tmp_path))


def test_tensor_attribute_values_are_part_of_the_key():
    class WithConstant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.register_buffer("c", torch.full((3,), value))

        def forward(self, x):
            return x + self.c

    inputs = [torch.randn(3)]
    assert key(WithConstant(1.0), inputs) != key(WithConstant(2.0), inputs)
