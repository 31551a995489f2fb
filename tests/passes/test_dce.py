"""Tests for fusecc/passes/dce.py: dead pure chains go; mutations, RNG draws, asserts and
placeholders stay; constants nobody reads any more are freed."""

import expecttest
import torch

from fusecc.passes.dce import DeadCodeElimination
from graph_builders import assert_identical, code, constants, freeze_input, op_counts, run_pass, trace

aten = torch.ops.aten


class TestDeadCodeElimination(expecttest.TestCase):
    def test_removes_dead_pure_chain(self):
        def fn(x):
            dead = (x.t() * 2).exp()  # noqa: F841 - three ops nobody reads
            return x.relu()

        x = torch.randn(3, 4)
        gm = trace(fn, x)
        self.assertEqual(op_counts(gm), {"aten.t": 1, "aten.mul": 1, "aten.exp": 1, "aten.relu": 1})
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertTrue(result.modified)
        self.assertEqual(result.stats["removed"], 3)
        self.assertEqual(op_counts(gm), {"aten.relu": 1})
        assert_identical(gm(x), fn(x))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    relu = torch.ops.aten.relu.default(x_1);  x_1 = None
    return relu""")

    def test_nothing_dead_is_not_modified(self):
        gm = trace(lambda x: x.relu() + 1, torch.randn(3))
        before = code(gm)
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(dict(result.stats), {})
        self.assertEqual(text, before)

    def test_keeps_copy_into_input(self):
        # The copy_ result is unused, but it writes the caller's tensor x.
        def fn(x, y):
            x.copy_(y * 2)
            return y + 1

        x, y = torch.randn(3), torch.randn(3)
        gm = trace(fn, x.clone(), y)
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(op_counts(gm), {"aten.mul": 1, "aten.copy_": 1, "aten.add": 1})
        x_eager, x_compiled = x.clone(), x.clone()
        assert_identical(gm(x_compiled, y), fn(x_eager, y))
        assert_identical(x_compiled, x_eager)  # the write happened
        self.assertExpectedInline(text, """\
def forward(self, x_1, y_1):
    mul = torch.ops.aten.mul.Tensor(y_1, 2)
    copy_ = torch.ops.aten.copy_.default(x_1, mul);  x_1 = mul = copy_ = None
    add = torch.ops.aten.add.Tensor(y_1, 1);  y_1 = None
    return add""")

    def test_keeps_unused_random_draws(self):
        # Removing a draw would shift every later draw from the same generator.
        def fn(x):
            torch.rand(3)
            torch.bernoulli(x)
            return x + 1

        x = torch.full((4,), 0.5)
        gm = trace(fn, x)
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(op_counts(gm), {"aten.rand": 1, "aten.bernoulli": 1, "aten.add": 1})
        # Same RNG consumption as eager: the draw after the graph matches.
        torch.manual_seed(0)
        fn(x)
        after_eager = torch.rand(2)
        torch.manual_seed(0)
        gm(x)
        assert_identical(torch.rand(2), after_eager)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    rand = torch.ops.aten.rand.default([3], device = cpu, pin_memory = False);  rand = None
    bernoulli = torch.ops.aten.bernoulli.default(x_1);  bernoulli = None
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_keeps_asserts(self):
        def fn(x):
            aten._assert_async.msg(x.sum() > 0, "x must have a positive sum")
            aten._assert_scalar.default(x.shape[0] > 1, "x needs two rows")
            return x * 2

        x = torch.ones(3, 2)
        gm = trace(fn, x, symbolic=True)
        before = op_counts(gm)
        self.assertEqual((before["aten._assert_async"], before["aten._assert_scalar"]), (1, 1))
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(op_counts(gm), before)
        assert_identical(gm(x), fn(x))
        with self.assertRaisesRegex(RuntimeError, "positive sum"):
            gm(-x)
        with self.assertRaisesRegex(RuntimeError, "two rows"):
            gm(torch.ones(1, 2))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    sum_1 = torch.ops.aten.sum.default(x_1)
    gt = torch.ops.aten.gt.Scalar(sum_1, 0);  sum_1 = None
    _assert_async = torch.ops.aten._assert_async.msg(gt, 'x must have a positive sum');  gt = _assert_async = None
    sym_size_int = torch.ops.aten.sym_size.int(x_1, 0)
    gt_1 = sym_size_int > 1;  sym_size_int = None
    _assert_scalar = torch.ops.aten._assert_scalar.default(gt_1, 'x needs two rows');  gt_1 = _assert_scalar = None
    mul = torch.ops.aten.mul.Tensor(x_1, 2);  x_1 = None
    return mul""")

    def test_keeps_unused_placeholders(self):
        gm = trace(lambda x, unused: x.exp(), torch.randn(2), torch.randn(5))
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual([n.name for n in gm.graph.nodes if n.op == "placeholder"], ["x_1", "unused_1"])
        self.assertExpectedInline(text, """\
def forward(self, x_1, unused_1):
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_frees_unused_constants(self):
        # w is frozen into a constant that only a dead chain reads: the chain and the tensor go.
        def fn(x, w):
            dead = w.t() + 1  # noqa: F841
            return x * 3

        x, w = torch.randn(2, 2), torch.randn(4, 4)
        gm = trace(fn, x, w)
        freeze_input(gm, 1, w)
        self.assertEqual(constants(gm), ["_frozen_param0"])
        result, text = run_pass(DeadCodeElimination(), gm)
        self.assertTrue(result.modified)
        self.assertEqual(dict(result.stats), {"removed": 3, "constants_freed": 1})
        self.assertEqual(constants(gm), [])
        self.assertFalse(hasattr(gm, "_frozen_param0"))
        assert_identical(gm(x, w), fn(x, w))  # the module runs the new code, not the old
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 3);  x_1 = None
    return mul""")

    def test_keeps_constants_still_read(self):
        x, w = torch.randn(4), torch.randn(4)
        gm = trace(lambda x, w: x + w, x, w)
        freeze_input(gm, 1, w)
        result, _ = run_pass(DeadCodeElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(constants(gm), ["_frozen_param0"])
        assert_identical(gm(x, torch.zeros(4)), x + w)  # reads the constant, not the input
