"""Tests for fusecc/passes/cse.py: identical pure ops merge (and chains above them, once their
inputs merged); random ops, mutations, ops differing only in a literal's type or zero's sign,
and two graph outputs do not."""

import expecttest
import torch

from fusecc.passes.cse import CommonSubexpressionElimination
from graph_builders import assert_identical, count, op_counts, run_pass, trace

aten = torch.ops.aten


class TestCommonSubexpressionElimination(expecttest.TestCase):
    def cse(self, fn, *inputs, symbolic=False):
        gm = trace(fn, *inputs, symbolic=symbolic)
        result, text = run_pass(CommonSubexpressionElimination(), gm)
        self.assertEqual(result.modified, result.stats["merged"] > 0)
        torch.manual_seed(0)
        actual = gm(*inputs)
        torch.manual_seed(0)
        assert_identical(actual, fn(*inputs))
        return result, text, gm

    def assert_not_merged(self, fn, *inputs, **kwargs):
        before = op_counts(trace(fn, *inputs, **kwargs))
        result, text, gm = self.cse(fn, *inputs, **kwargs)
        self.assertFalse(result.modified)
        self.assertEqual(dict(result.stats), {})
        self.assertEqual(op_counts(gm), before)
        return result, text, gm

    def test_merges_identical_pure_ops(self):
        x, y = torch.randn(4, 8), torch.randn(4, 8)
        result, text, gm = self.cse(lambda x, y: x * y + x * y, x, y)
        self.assertEqual(dict(result.stats), {"merged": 1, "merged:aten.mul": 1})
        self.assertEqual(op_counts(gm), {"aten.mul": 1, "aten.add": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1, y_1):
    mul = torch.ops.aten.mul.Tensor(x_1, y_1);  x_1 = y_1 = None
    add = torch.ops.aten.add.Tensor(mul, mul);  mul = None
    return add""")

    def test_merges_chains_once_inputs_merged(self):
        # exp(x * y) twice: the muls merge, then the exps (now on the same input), then the t()s.
        fn = lambda x, y: (x * y).exp().t() - (x * y).exp().t()  # noqa: E731
        result, text, gm = self.cse(fn, torch.randn(2, 3), torch.randn(2, 3))
        self.assertEqual(result.stats["merged"], 3)
        self.assertEqual(op_counts(gm), {"aten.mul": 1, "aten.exp": 1, "aten.t": 1, "aten.sub": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1, y_1):
    mul = torch.ops.aten.mul.Tensor(x_1, y_1);  x_1 = y_1 = None
    exp = torch.ops.aten.exp.default(mul);  mul = None
    t = torch.ops.aten.t.default(exp);  exp = None
    sub = torch.ops.aten.sub.Tensor(t, t);  t = None
    return sub""")

    def test_merges_ops_with_symbolic_sizes(self):
        # Two new_ones(x, [s0]) read the same sym_size node: one tensor.
        fn = lambda x: (x.sum(1) + x.new_ones(x.shape[0])) * x.new_ones(x.shape[0])  # noqa: E731
        self.assertEqual(count(trace(fn, torch.randn(3, 2), symbolic=True), aten.new_ones.default), 2)
        result, text, gm = self.cse(fn, torch.randn(3, 2), symbolic=True)
        self.assertEqual(dict(result.stats), {"merged": 1, "merged:aten.new_ones": 1})
        self.assertEqual(count(gm, aten.new_ones.default), 1)
        x = torch.randn(5, 2)
        assert_identical(gm(x), fn(x))  # still dynamic

    def test_not_random_ops(self):
        fn = lambda x: (torch.rand(3) + torch.rand(3)) * torch.bernoulli(x) * torch.bernoulli(x)  # noqa: E731
        _, text, gm = self.assert_not_merged(fn, torch.full((3,), 0.5))
        self.assertEqual((count(gm, aten.rand.default), count(gm, aten.bernoulli.default)), (2, 2))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    rand = torch.ops.aten.rand.default([3], device = cpu, pin_memory = False)
    rand_1 = torch.ops.aten.rand.default([3], device = cpu, pin_memory = False)
    add = torch.ops.aten.add.Tensor(rand, rand_1);  rand = rand_1 = None
    bernoulli = torch.ops.aten.bernoulli.default(x_1)
    mul = torch.ops.aten.mul.Tensor(add, bernoulli);  add = bernoulli = None
    bernoulli_1 = torch.ops.aten.bernoulli.default(x_1);  x_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(mul, bernoulli_1);  mul = bernoulli_1 = None
    return mul_1""")

    def test_not_mutations(self):
        def fn(x):
            x.add_(1)
            x.add_(1)
            return x * 2

        x = torch.randn(3)
        gm = trace(fn, x.clone())
        result, _ = run_pass(CommonSubexpressionElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(count(gm, aten.add_.Tensor), 2)
        x_eager, x_compiled = x.clone(), x.clone()
        assert_identical(gm(x_compiled), fn(x_eager))
        assert_identical(x_compiled, x_eager)

    def test_not_across_a_mutation(self):
        # The second x + 1 reads x after copy_ wrote y into it.
        def fn(x, y):
            a = x + 1
            x.copy_(y)
            return a * (x + 1)

        x, y = torch.randn(3), torch.randn(3)
        gm = trace(fn, x.clone(), y)
        # make_fx makes the second add read copy_'s result; graphs may as well read x itself
        # (same storage, same value). Rewire it so both adds read the node x_1.
        x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
        second_add = [n for n in gm.graph.nodes if n.target is aten.add.Tensor][1]
        second_add.args = (x_node, 1)
        gm.recompile()
        assert_identical(gm(x.clone(), y), fn(x.clone(), y))
        result, text = run_pass(CommonSubexpressionElimination(), gm)
        self.assertFalse(result.modified)
        self.assertEqual(count(gm, aten.add.Tensor), 2)
        assert_identical(gm(x.clone(), y), fn(x.clone(), y))

    def test_across_a_mutation_of_something_else(self):
        # Like a KV-cache write between two layers' RoPE gathers: the write to `cache` leaves
        # table[pos] unchanged, so the second gather merges; a view of the cache read after the
        # write does not merge with the one read before it.
        def fn(table, pos, cache, k):
            a = table[pos] * k
            c0 = cache[0] + 1
            cache.copy_(k)
            return a + table[pos] * k, c0, cache[0] + 1

        table, pos, cache, k = torch.randn(8, 3), torch.tensor([1, 5, 2]), torch.randn(3, 3), torch.randn(3, 3)
        gm = trace(fn, table, pos, cache.clone(), k)
        # make_fx makes reads after copy_ read its result; rewire the last cache read to the
        # placeholder itself (same storage, same value), as graphs may do.
        cache_node = [n for n in gm.graph.nodes if n.op == "placeholder"][2]
        selects = [n for n in gm.graph.nodes if n.target is aten.select.int]
        selects[-1].args = (cache_node, *selects[-1].args[1:])
        gm.recompile()
        result, _ = run_pass(CommonSubexpressionElimination(), gm)
        self.assertTrue(result.modified)
        self.assertEqual(count(gm, aten.index.Tensor), 1)  # the second gather merged...
        self.assertEqual(count(gm, aten.select.int), 2)    # ...the cache reads did not
        expected_cache, compiled_cache = cache.clone(), cache.clone()
        assert_identical(gm(table, pos, compiled_cache, k), fn(table, pos, expected_cache, k))
        assert_identical(compiled_cache, expected_cache)

    def test_not_literals_of_different_type(self):
        # bool x: x + 1 is int64, x + 1.0 is float32, x + True is bool.
        fn = lambda x: ((x + 1) * 3, (x + 1.0) * 3, (x + True) * 3)  # noqa: E731
        _, text, gm = self.assert_not_merged(fn, torch.tensor([True, False]))
        self.assertEqual(count(gm, aten.add.Tensor), 3)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1)
    mul = torch.ops.aten.mul.Tensor(add, 3);  add = None
    add_1 = torch.ops.aten.add.Tensor(x_1, 1.0)
    mul_1 = torch.ops.aten.mul.Tensor(add_1, 3);  add_1 = None
    add_2 = torch.ops.aten.add.Tensor(x_1, True);  x_1 = None
    mul_2 = torch.ops.aten.mul.Tensor(add_2, 3);  add_2 = None
    return (mul, mul_1, mul_2)""")

    def test_not_zero_of_different_sign(self):
        # x * 0.0 is +0 for positive x, x * -0.0 is -0: 1/+0 + 1/-0 = inf - inf = nan
        # (merged, it would be inf + inf = inf).
        fn = lambda x: (x * 0.0).reciprocal() + (x * -0.0).reciprocal()  # noqa: E731
        x = torch.rand(3) + 1
        self.assertTrue(fn(x).isnan().all())
        _, text, gm = self.assert_not_merged(fn, x)
        self.assertEqual(count(gm, aten.mul.Tensor), 2)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 0.0)
    reciprocal = torch.ops.aten.reciprocal.default(mul);  mul = None
    mul_1 = torch.ops.aten.mul.Tensor(x_1, -0.0);  x_1 = None
    reciprocal_1 = torch.ops.aten.reciprocal.default(mul_1);  mul_1 = None
    add = torch.ops.aten.add.Tensor(reciprocal, reciprocal_1);  reciprocal = reciprocal_1 = None
    return add""")

    def test_not_two_graph_outputs(self):
        x = torch.randn(3)
        _, text, gm = self.assert_not_merged(lambda x: (x * 2, x * 2), x)
        a, b = gm(x)
        self.assertNotEqual(a.data_ptr(), b.data_ptr())
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 2)
    mul_1 = torch.ops.aten.mul.Tensor(x_1, 2);  x_1 = None
    return (mul, mul_1)""")

    def test_not_an_output_and_a_view_returned_as_output(self):
        x = torch.randn(3)
        _, _, gm = self.assert_not_merged(lambda x: (x * 2, (x * 2).view(3, 1)), x)
        a, b = gm(x)
        self.assertNotEqual(a.data_ptr(), b.data_ptr())

    def test_output_merges_with_an_internal_twin(self):
        # Only one of the two is returned: sharing is invisible to the caller.
        x = torch.randn(3)
        result, text, gm = self.cse(lambda x: (x * 2, (x * 2).exp()), x)
        self.assertEqual(dict(result.stats), {"merged": 1, "merged:aten.mul": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 2);  x_1 = None
    exp = torch.ops.aten.exp.default(mul)
    return (mul, exp)""")
