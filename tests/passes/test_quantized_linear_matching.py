"""Tests for fusecc/passes/quantized_linear_matching.py: hand-written weight-only int8 / int4
linears (quantized_modules.py) become one `fusecc::weight_only_linear` call each, equal to eager,
with no float weight in the graph; what is not matched stays, and the stats say why per linear.

The pass alone on traced ATen graphs (weights frozen as the backend freezes them), then the whole
backend with a dump, as a user compiles a model. `torch._scaled_mm` (FP8) stays one extern call.
"""

import glob
import json
import os
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F

from fusecc.backend import fusecc_backend
from fusecc.passes.quantized_linear_matching import QuantizedLinearMatching
from graph_builders import code, count, freeze_input, run_pass, trace
from quantized_modules import (Int4EightPerWord, Int4TwoPerByte, Int8Linear, Int8ScaleAfter, QuantizedMLP,
                               pack_two_per_byte)

aten = torch.ops.aten
FUSED = torch.ops.fusecc.weight_only_linear.default


def traced(module, x, freeze=True):
    """(ATen graph of module(x) with its buffers and parameters as inputs, frozen like freeze.py does; inputs)."""
    named = dict(module.named_buffers()) | dict(module.named_parameters())
    names, values = list(named), [v.detach() for v in named.values()]

    def fn(x, *tensors):
        return torch.func.functional_call(module, dict(zip(names, tensors)), (x,))

    gm = trace(fn, x, *values)
    if freeze:
        for index, value in enumerate(values, start=1):
            freeze_input(gm, index, value)
    return gm, (x, *values)


class FunctionOf(torch.nn.Module):
    """A module whose forward is fn(x, *buffers): for one-off dequantizations written inline."""

    def __init__(self, fn, **buffers):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, x):
        return self.fn(x, *self._buffers.values())


def float_constants(gm) -> list[tuple]:
    return [tuple(getattr(gm, n.target).shape) for n in gm.graph.nodes
            if n.op == "get_attr" and getattr(gm, n.target).dtype.is_floating_point]


class TestQuantizedLinearMatching(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def match(self, module, x, freeze=True):
        gm, inputs = traced(module, x, freeze)
        result, text = run_pass(QuantizedLinearMatching(), gm)
        with torch.no_grad():
            torch.testing.assert_close(gm(*inputs), module(x), rtol=1e-5, atol=1e-5)
        return result, text, gm

    def test_int8_and_int4_linears_become_weight_only_linear(self):
        x = torch.randn(2, 3, 32)
        block = torch.nn.Sequential(Int8Linear(32, 16), Int4TwoPerByte(16, 24, group=8))
        result, text, gm = self.match(block, x)
        self.assertEqual((result.stats["rewritten:int8_per_channel"], result.stats["rewritten:int4_group8"]), (1, 1))
        self.assertEqual(result.stats["linear addmm: fused, int8_per_channel"], 1)
        self.assertEqual(result.stats["linear mm: fused, int4_group8"], 1)
        self.assertEqual((count(gm, FUSED), count(gm, aten.mm.default), count(gm, aten.addmm.default)), (2, 0, 0))
        # the int8 weight is used as it is; int4 is repacked to int32 [N, K/8]; no float weight anywhere
        self.assertEqual(float_constants(gm), [(16,), (16, 1), (24, 2), (24, 2)])  # bias, scales, scales, zeros
        self.assertExpectedInline(text, """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1):
    _frozen_param5 = self._frozen_param5
    view = torch.ops.aten.view.default(arg0_1, [6, 32]);  arg0_1 = None
    _quantized_weight6 = self._quantized_weight6
    _quantized_scales7 = self._quantized_scales7
    weight_only_linear_default = torch.ops.fusecc.weight_only_linear.default(view, _quantized_weight6, _quantized_scales7, None, _frozen_param5, 8, -1);  view = _quantized_weight6 = _quantized_scales7 = _frozen_param5 = None
    view_1 = torch.ops.aten.view.default(weight_only_linear_default, [2, 3, 16]);  weight_only_linear_default = None
    view_5 = torch.ops.aten.view.default(view_1, [6, 16]);  view_1 = None
    _quantized_weight8 = self._quantized_weight8
    _quantized_scales9 = self._quantized_scales9
    _quantized_zeros10 = self._quantized_zeros10
    weight_only_linear_default_1 = torch.ops.fusecc.weight_only_linear.default(view_5, _quantized_weight8, _quantized_scales9, _quantized_zeros10, None, 4, 8);  view_5 = _quantized_weight8 = _quantized_scales9 = _quantized_zeros10 = None
    _unsafe_view = torch.ops.aten._unsafe_view.default(weight_only_linear_default_1, [2, 3, 24]);  weight_only_linear_default_1 = None
    return _unsafe_view""")

    @pytest.mark.skip
    def test_placeholder(self):
        pass
