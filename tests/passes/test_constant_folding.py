"""Tests for fusecc/passes/constant_folding.py: what folds (chains over frozen weights, factory
ops with static arguments), what must not (random ops, anything reading an input or a SymInt,
views alone, results over max_bytes, graph outputs), and that folded values equal eager."""

import math

import expecttest
import torch

from fusecc.passes.constant_folding import ConstantFolding
from graph_builders import assert_identical, constants, count, freeze_input, op_counts, run_pass, trace

aten = torch.ops.aten


def folded_value(gm, name: str) -> torch.Tensor:
    return getattr(gm, name)


class TestConstantFolding(expecttest.TestCase):
    def fold(self, fn, *inputs, frozen=(), max_bytes=64 * 1024 * 1024, symbolic=False):
        gm = trace(fn, *inputs, symbolic=symbolic)
        for index in frozen:
            freeze_input(gm, index, inputs[index])
        result, text = run_pass(ConstantFolding(max_bytes=max_bytes), gm)
        self.assertEqual(result.modified, result.stats["folded"] > 0)
        torch.manual_seed(0)  # the same draws for graphs that keep a random op
        actual = gm(*inputs)
        torch.manual_seed(0)
        assert_identical(actual, fn(*inputs))
        # Every constant the pass made has a fake value matching the real tensor.
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target.startswith("_folded"):
                real, fake = folded_value(gm, node.target), node.meta["val"]
                self.assertEqual((real.dtype, real.shape, real.stride()), (fake.dtype, fake.shape, fake.stride()))
        return result, text, gm

    def assert_not_folded(self, fn, *inputs, **kwargs):
        before = op_counts(trace(fn, *inputs, symbolic=kwargs.get("symbolic", False)))
        result, text, gm = self.fold(fn, *inputs, **kwargs)
        self.assertFalse(result.modified)
        self.assertEqual(result.stats["folded"], 0)
        self.assertEqual(op_counts(gm), before)
        return result, text, gm

    # ------------------------------------------------------------ what folds

    def test_folds_weight_permute_clone_cast_arithmetic(self):
        # x: f64[3, 4]; w: f32[4, 3] frozen. Everything right of `x +` is computed once.
        def fn(x, w):
            return x + (w.permute(1, 0).contiguous().to(torch.float64) * 2 + 1)

        x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 3)
        result, text, gm = self.fold(fn, x, w, frozen=[1])
        self.assertEqual(result.stats["folded"], 1)
        self.assertEqual(result.stats["constants_freed"], 1)  # the frozen weight itself
        self.assertEqual(op_counts(gm), {"aten.add": 1})
        self.assertEqual(constants(gm), ["_folded1"])
        expected = w.t().contiguous().double() * 2 + 1
        assert_identical(folded_value(gm, "_folded1"), expected)
        self.assertTrue(folded_value(gm, "_folded1").is_contiguous())
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    _folded1 = self._folded1
    add_1 = torch.ops.aten.add.Tensor(x_1, _folded1);  x_1 = _folded1 = None
    return add_1""")

    def test_folds_through_a_view_in_the_middle(self):
        # (w * 2).view(-1).exp() is all constant: the view must not stop the chain.
        def fn(x, w):
            return x + (w * 2).view(-1).exp()

        x, w = torch.randn(6), torch.randn(2, 3)
        result, text, gm = self.fold(fn, x, w, frozen=[1])
        self.assertEqual(op_counts(gm), {"aten.add": 1})
        self.assertEqual(len(constants(gm)), 1)
        assert_identical(folded_value(gm, constants(gm)[0]), (w * 2).view(-1).exp())
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    _folded1 = self._folded1
    add = torch.ops.aten.add.Tensor(x_1, _folded1);  x_1 = _folded1 = None
    return add""")

    def test_folds_rope_tables_from_factory_ops(self):
        # RoPE: cos/sin of position * inverse frequency, from arange with static arguments.
        def fn(x):  # x: [seq=4, head_dim/2=2]
            inv_freq = 1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
            angles = torch.arange(4, dtype=torch.float32)[:, None] * inv_freq[None, :]
            return x * angles.cos() + x * angles.sin()

        x = torch.randn(4, 2)
        result, text, gm = self.fold(fn, x)
        self.assertEqual(result.stats["folded"], 2)
        self.assertEqual(op_counts(gm), {"aten.mul": 2, "aten.add": 1})
        self.assertEqual((count(gm, aten.arange.start_step), count(gm, aten.cos.default)), (0, 0))
        # The tables equal what eager computes, and the math says what they are.
        cos_table, sin_table = (folded_value(gm, name) for name in constants(gm))
        angles = torch.arange(4, dtype=torch.float32)[:, None] * (1.0 / (10000 ** (torch.arange(0, 4, 2) / 4)))
        assert_identical(cos_table, angles.cos())
        assert_identical(sin_table, angles.sin())
        self.assertAlmostEqual(cos_table[3, 1].item(), math.cos(3 / 100), places=6)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    _folded0 = self._folded0
    mul_2 = torch.ops.aten.mul.Tensor(x_1, _folded0);  _folded0 = None
    _folded1 = self._folded1
    mul_3 = torch.ops.aten.mul.Tensor(x_1, _folded1);  x_1 = _folded1 = None
    add = torch.ops.aten.add.Tensor(mul_2, mul_3);  mul_2 = mul_3 = None
    return add""")

    # ------------------------------------------------------------ what does not fold

    def test_not_random_ops(self):
        result, text, gm = self.assert_not_folded(lambda x: x + torch.rand(3) * 2, torch.randn(3))
        self.assertEqual(count(gm, aten.rand.default), 1)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    rand = torch.ops.aten.rand.default([3], device = cpu, pin_memory = False)
    mul = torch.ops.aten.mul.Tensor(rand, 2);  rand = None
    add = torch.ops.aten.add.Tensor(x_1, mul);  x_1 = mul = None
    return add""")

    def test_not_ops_reading_an_input(self):
        self.assert_not_folded(lambda x: (x.exp() + 1).cos(), torch.randn(3))

    def test_not_ops_reading_a_symint(self):
        # arange(s0) has no value until run time.
        fn = lambda x: x + torch.arange(x.shape[0], dtype=torch.float32).cos()  # noqa: E731
        result, text, gm = self.assert_not_folded(fn, torch.randn(5), symbolic=True)
        x = torch.randn(7)
        assert_identical(gm(x), fn(x))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    sym_size_int = torch.ops.aten.sym_size.int(x_1, 0)
    arange = torch.ops.aten.arange.default(sym_size_int, dtype = torch.float32, device = cpu, pin_memory = False);  sym_size_int = None
    cos = torch.ops.aten.cos.default(arange);  arange = None
    add = torch.ops.aten.add.Tensor(x_1, cos);  x_1 = cos = None
    return add""")

    def test_not_views_alone(self):
        # x @ w.t(): a transpose view costs nothing at run time; folding it would copy w.
        x, w = torch.randn(2, 3), torch.randn(4, 3)
        result, text, gm = self.assert_not_folded(lambda x, w: x @ w.t(), x, w, frozen=[1])
        self.assertEqual(constants(gm), ["_frozen_param0"])
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    _frozen_param0 = self._frozen_param0
    t = torch.ops.aten.t.default(_frozen_param0);  _frozen_param0 = None
    mm = torch.ops.aten.mm.default(x_1, t);  x_1 = t = None
    return mm""")

    def test_not_over_max_bytes(self):
        # w * 2 is 4 * 4 * 4 = 64 bytes: over a 32-byte limit, under a 64-byte one.
        fn = lambda x, w: x + w * 2  # noqa: E731
        x, w = torch.randn(4, 4), torch.randn(4, 4)
        result, _, gm = self.assert_not_folded(fn, x, w, frozen=[1], max_bytes=32)
        self.assertEqual(result.stats["skipped:too_large"], 1)
        result, _, gm = self.fold(fn, x, w, frozen=[1], max_bytes=64)
        self.assertEqual(result.stats["folded"], 1)

    def test_not_a_graph_output(self):
        # Returning a constant would let the caller mutate it (and see it in the next call).
        fn = lambda x, w: (x + 1, w * 2)  # noqa: E731
        x, w = torch.randn(3), torch.randn(3)
        result, text, gm = self.assert_not_folded(fn, x, w, frozen=[1])
        self.assertEqual(result.stats["skipped:graph_output"], 1)
        out = gm(x, w)[1]
        out.add_(100)
        assert_identical(gm(x, w)[1], w * 2)
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    _frozen_param0 = self._frozen_param0
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    mul = torch.ops.aten.mul.Tensor(_frozen_param0, 2);  _frozen_param0 = None
    return (add, mul)""")

    def test_not_a_view_of_a_graph_output(self):
        fn = lambda x, w: (x + 1, (w * 2).view(3, 1))  # noqa: E731
        result, _, gm = self.assert_not_folded(fn, torch.randn(3), torch.randn(3), frozen=[1])
        self.assertEqual(result.stats["skipped:graph_output"], 1)
