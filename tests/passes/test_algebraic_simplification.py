"""Tests for fusecc/passes/algebraic_simplification.py: one test per rule in RULES, plus the
cases where a rule must not fire (shape/dtype changes, NaN/inf/-0.0 sensitivity, aliasing).

Every test checks the three things design.md asks for: the rewritten graph computes exactly
what eager does, which rules fired and how many ops are left, and a snapshot of the graph.
The snapshots are taken right after the pass: nodes a rewrite leaves dead stay until DCE.
"""

import operator

import expecttest
import torch

from fusecc.passes.algebraic_simplification import RULES, AlgebraicSimplification
from graph_builders import assert_identical, code, count, freeze_input, op_counts, run_pass, trace

aten = torch.ops.aten
prims = torch.ops.prims


def fired(result) -> dict:
    return {k: v for k, v in result.stats.items() if k.startswith("rule:")}


class TestAlgebraicSimplification(expecttest.TestCase):
    def simplify(self, fn, *inputs, frozen=(), symbolic=False):
        """Trace `fn`, freeze the inputs listed in `frozen`, run the pass, check it against eager."""
        gm = trace(fn, *inputs, symbolic=symbolic)
        for index in frozen:
            freeze_input(gm, index, inputs[index])
        result, text = run_pass(AlgebraicSimplification(), gm)
        self.assertEqual(result.modified, bool(fired(result)))
        assert_identical(gm(*inputs), fn(*inputs))
        return result, text, gm

    def assert_not_fired(self, fn, *inputs, frozen=()):
        gm0 = trace(fn, *inputs)
        before = op_counts(gm0)
        result, text, gm = self.simplify(fn, *inputs, frozen=frozen)
        self.assertEqual(fired(result), {})
        self.assertFalse(result.modified)
        self.assertEqual(op_counts(gm), before)
        return result, text

    # ------------------------------------------------------------ arithmetic identities

    def test_mul_by_one(self):
        result, text, gm = self.simplify(lambda x: x * 1 + 2, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:mul_by_one": 1})
        self.assertEqual(count(gm, aten.mul.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 2);  x_1 = None
    return add""")

    def test_mul_by_ones_constant(self):
        # ones[3] broadcast against x[2, 3] keeps x's shape and dtype: x * ones == x.
        result, text, gm = self.simplify(lambda x, w: (x * w).relu(), torch.randn(2, 3), torch.ones(3), frozen=[1])
        self.assertEqual(fired(result), {"rule:mul_by_one": 1})
        self.assertEqual(count(gm, aten.mul.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1, w_1):
    _frozen_param0 = self._frozen_param0;  _frozen_param0 = None
    relu = torch.ops.aten.relu.default(x_1);  x_1 = None
    return relu""")

    def test_mul_by_one_not_when_broadcast_changes_shape(self):
        # x[3] * ones[2, 3] is [2, 3]: replacing it by x would change the shape.
        result, _ = self.assert_not_fired(lambda x, w: (x * w).relu(), torch.randn(3), torch.ones(2, 3), frozen=[1])
        self.assertEqual(result.stats["refused:mul_by_one"], 1)

    def test_mul_by_one_not_when_ones_are_wider(self):
        # f16 * f32 ones is f32.
        result, _ = self.assert_not_fired(lambda x, w: (x * w).relu(),
                                          torch.randn(3).half(), torch.ones(3), frozen=[1])
        self.assertEqual(result.stats["refused:mul_by_one"], 1)

    def test_a_refusal_is_counted_once_per_node_and_says_where_and_why(self):
        # The pass object lives through the pipeline's fixed-point rounds: a refusal seen again in
        # round 2 must not count twice, and the refusal names the node and the reason.
        gm = trace(lambda x, w: (x * w).relu(), torch.randn(3), torch.ones(2, 3))
        freeze_input(gm, 1, torch.ones(2, 3))
        simplification = AlgebraicSimplification()
        first = simplification.run(gm)
        second = simplification.run(gm)
        self.assertEqual(first.stats["refused:mul_by_one"], 1)
        self.assertEqual(second.stats["refused:mul_by_one"], 0)
        (refusal,) = first.refusals
        self.assertEqual((refusal.rule, refusal.node), ("mul_by_one", "mul"))
        self.assertIn("differs from the node's float32[2, 3]", refusal.why)
        self.assertEqual(second.refusals, [])

    def test_mul_by_one_not_for_bool(self):
        self.assert_not_fired(lambda x: (x * 1) + 1, torch.tensor([True, False]))  # bool * 1 is int64

    def test_mul_by_one_not_when_output_would_alias_input(self):
        # `return x * 1` must stay a fresh tensor: returning x would let the caller's writes
        # to the result show up in its input.
        x = torch.randn(2, 3)
        _, text = self.assert_not_fired(lambda x: x * 1, x)
        gm = trace(lambda x: x * 1, x)
        AlgebraicSimplification().run(gm)
        out = gm(x)
        self.assertIsNot(out, x)
        self.assertNotEqual(out.data_ptr(), x.data_ptr())
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 1);  x_1 = None
    return mul""")

    def test_add_zero(self):
        # integers: any zero; floats: a negative zero only (x + -0.0 is x, -0.0 included)
        result, text, gm = self.simplify(lambda x: (x + 0) * 3, torch.arange(6))
        self.assertEqual(fired(result), {"rule:add_zero": 1})
        self.assertEqual(count(gm, aten.add.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul = torch.ops.aten.mul.Tensor(x_1, 3);  x_1 = None
    return mul""")
        result, text, gm = self.simplify(lambda x: (x + (-0.0)).exp(), torch.tensor([-0.0, 1.0, float("nan")]))
        self.assertEqual(fired(result), {"rule:add_zero": 1})
        self.assertEqual(count(gm, aten.add.Tensor), 0)

    def test_float_add_positive_zero_stays(self):
        # -0.0 + 0.0 is +0.0: removing the add would keep the sign, which 1/x turns into -inf
        x = torch.tensor([-0.0, 1.0])
        self.assertFalse(torch.signbit((x + 0)[0]))
        self.assert_not_fired(lambda x: (x + 0) * 2, x)
        self.assert_not_fired(lambda x: (0.0 + x) * 2, x)
        # alpha = -1 turns the -0.0 into +0.0; alpha = 1 keeps it (the add goes)
        self.assert_not_fired(lambda x: torch.add(x, -0.0, alpha=-1) * 2, x)
        result, _, _ = self.simplify(lambda x: torch.add(x, -0.0, alpha=1) * 2, x)
        self.assertEqual(fired(result), {"rule:add_zero": 1})

    def test_add_zero_not_when_dtype_changes(self):
        # int + -0.0 is float: the rule offers x, the engine refuses the dtype change
        result, _ = self.assert_not_fired(lambda x: (x + (-0.0)) * 2, torch.arange(4))
        self.assertEqual(result.stats["refused:add_zero"], 1)

    def test_sub_zero(self):
        result, text, gm = self.simplify(lambda x: (x - 0).exp(), torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:sub_zero": 1})
        self.assertEqual(count(gm, aten.sub.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_sub_negative_zero_stays(self):
        # x - (-0.0) is x + 0.0: it turns -0.0 into +0.0, so it is not x
        x = torch.tensor([-0.0, 1.0])
        self.assertTrue(torch.signbit((x - (-0.0))[0]) == False)  # noqa: E712
        self.assert_not_fired(lambda x: (x - (-0.0)) * 2, x)

    def test_add_and_sub_zero_not_with_a_non_finite_alpha(self):
        # y + inf * 0 and y - nan * 0 are NaN, not y
        x = torch.randn(4)
        self.assert_not_fired(lambda x: torch.add(x * 2, 0, alpha=float("inf")) * 3, x)
        self.assert_not_fired(lambda x: torch.sub(x * 2, 0, alpha=float("nan")) * 3, x)

    def test_identity_not_applied_when_another_output_shares_the_storage(self):
        # `y.view(-1) * 1` -> `y.view(-1)` would make two outputs views of one buffer (y.t() is the
        # other): the caller could change one through the other (found by a miscompile hunt)
        import torch._dynamo

        def fn(x):
            y = x.exp()
            return y.view(-1) * 1, y.t()

        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="fusecc", options={"codegen": "aten", "strict": True})
        with torch.no_grad():
            a, b = compiled(torch.zeros(2, 3))
        a.add_(100)
        self.assertTrue(torch.equal(b, torch.ones(3, 2)))

    def test_div_by_one(self):
        result, text, gm = self.simplify(lambda x: (x / 1).exp(), torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:div_by_one": 1})
        self.assertEqual(count(gm, aten.div.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_div_by_one_not_for_int(self):
        self.assert_not_fired(lambda x: (x / 1) + 1, torch.arange(4))  # true division: int / 1 is float

    def test_mul_by_reciprocal(self):
        result, text, gm = self.simplify(lambda x: x / 4.0, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:mul_by_reciprocal": 1})
        self.assertEqual((count(gm, aten.div.Tensor), count(gm, aten.mul.Tensor)), (0, 1))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul_tensor = torch.ops.aten.mul.Tensor(x_1, 0.25);  x_1 = None
    return mul_tensor""")

    def test_mul_by_reciprocal_not_when_inexact(self):
        self.assert_not_fired(lambda x: x / 3.0, torch.randn(2, 3))  # 1/3 is not exact

    def test_mul_by_reciprocal_not_when_reciprocal_overflows(self):
        # f32: x / 2**-130 is finite for tiny x, but 1 / 2**-130 = 2**130 overflows to inf.
        x = torch.tensor([1e-39, 1e-45, 0.0], dtype=torch.float32)
        self.assertTrue(torch.isfinite(x / 2.0 ** -130).all())
        self.assert_not_fired(lambda x: x / 2.0 ** -130, x)

    def test_pow_one(self):
        result, text, gm = self.simplify(lambda x: (x ** 1).exp(), torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:pow_one": 1})
        self.assertEqual(count(gm, aten.pow.Tensor_Scalar), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_pow_two(self):
        result, text, gm = self.simplify(lambda x: x ** 2, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:pow_two": 1})
        self.assertEqual((count(gm, aten.pow.Tensor_Scalar), count(gm, aten.mul.Tensor)), (0, 1))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    mul_tensor = torch.ops.aten.mul.Tensor(x_1, x_1);  x_1 = None
    return mul_tensor""")

    def test_pow_half_f32(self):
        # Includes the inputs where pow and sqrt could differ: -0., -inf, nan.
        x = torch.tensor([-0.0, -float("inf"), float("nan"), 0.0, 2.0, -3.0])
        result, text, gm = self.simplify(lambda x: x ** 0.5, x)
        self.assertEqual(fired(result), {"rule:pow_half": 1})
        self.assertEqual((count(gm, aten.pow.Tensor_Scalar), count(gm, aten.sqrt.default)), (0, 1))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    sqrt_default = torch.ops.aten.sqrt.default(x_1);  x_1 = None
    return sqrt_default""")

    def test_pow_half_not_in_f16(self):
        # ATen's half pow(-inf, 0.5) is inf where sqrt gives nan, and pow(-0., .5) is +0.
        x = torch.tensor([-0.0, -float("inf"), float("nan")], dtype=torch.float16)
        self.assertFalse(torch.equal(torch.pow(x, 0.5).isnan(), torch.sqrt(x).isnan()))
        self.assert_not_fired(lambda x: x ** 0.5, x)

    def test_double_negation(self):
        result, text, gm = self.simplify(lambda x: (-(-x)).exp(), torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:double_negation": 1})
        # The inner neg is left dead for DCE.
        self.assertEqual([n.name for n in gm.graph.nodes if n.target is aten.neg.default and n.users], [])
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    neg = torch.ops.aten.neg.default(x_1);  neg = None
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    # ------------------------------------------------------------ casts

    def test_cast_to_same_dtype(self):
        fn = lambda x: (aten._to_copy.default(x, dtype=torch.float32)  # noqa: E731
                        + prims.convert_element_type.default(x, torch.float32))
        result, text, gm = self.simplify(fn, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:cast_to_same_dtype": 2})
        self.assertEqual(op_counts(gm), {"aten.add": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, x_1);  x_1 = None
    return add""")

    def test_lossless_cast_chain(self):
        # f16 -> f32 -> f64 is exact at each step: one cast f16 -> f64 does the same.
        result, text, gm = self.simplify(lambda x: x.float().double().exp(), torch.randn(5).half())
        self.assertEqual(fired(result), {"rule:lossless_cast_chain": 1})
        self.assertEqual(count(gm, prims.convert_element_type.default), 1)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    _to_copy = torch.ops.aten._to_copy.default(x_1, dtype = torch.float32);  _to_copy = None
    convert_element_type_default = torch.ops.prims.convert_element_type.default(x_1, torch.float64);  x_1 = None
    exp = torch.ops.aten.exp.default(convert_element_type_default);  convert_element_type_default = None
    return exp""")

    def test_lossless_cast_round_trip(self):
        # f16 -> f32 -> f16 gives x back.
        result, text, gm = self.simplify(lambda x: x.float().half().exp(), torch.randn(5).half())
        self.assertEqual(fired(result), {"rule:lossless_cast_chain": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    _to_copy = torch.ops.aten._to_copy.default(x_1, dtype = torch.float32);  _to_copy = None
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_lossy_cast_chain_stays(self):
        # f32 -> f16 -> f32 rounds to 11 bits of mantissa: it is not the identity.
        x = torch.tensor([1.0 + 2.0 ** -20, 1e-8, 70000.0])
        self.assertFalse(torch.equal(x.half().float(), x))
        self.assert_not_fired(lambda x: x.half().float().exp(), x)

    def test_int_to_bool_chain_stays(self):
        # int -> bool keeps only "nonzero": 2 becomes 1.0 through bool, not 2.0 (this used to crash
        # the rule: torch.iinfo(torch.bool))
        self.assert_not_fired(lambda x: (x * 2).bool().float(), torch.tensor([0, 1, 2], dtype=torch.int32))

    def test_int_to_f16_chain_stays(self):
        # int32 -> f16 loses values above 2048 (and overflows above 65504).
        self.assert_not_fired(lambda x: x.half().float() + 1, torch.tensor([2049, 100000, 3], dtype=torch.int32))

    # ------------------------------------------------------------ views and layout

    def test_identity_view(self):
        result, text, gm = self.simplify(lambda x: x.view(2, 3) + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:identity_view": 1})
        self.assertEqual(count(gm, aten.view.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_view_chain(self):
        result, text, gm = self.simplify(lambda x: x.view(6).view(3, 2) + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:view_chain": 1})
        self.assertEqual(len([n for n in gm.graph.nodes if n.target is aten.view.default and n.users]), 1)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    view = torch.ops.aten.view.default(x_1, [6]);  view = None
    view_default = torch.ops.aten.view.default(x_1, [3, 2]);  x_1 = None
    add = torch.ops.aten.add.Tensor(view_default, 1);  view_default = None
    return add""")

    def test_identity_permute(self):
        result, text, gm = self.simplify(lambda x: aten.permute.default(x, [0, 1, -1]) + 1, torch.randn(2, 3, 4))
        self.assertEqual(fired(result), {"rule:identity_permute": 1})
        self.assertEqual(count(gm, aten.permute.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_permute_chain(self):
        # [2, 3, 4] -> permute(1, 0, 2) -> [3, 2, 4] -> permute(2, 0, 1) -> [4, 3, 2] = permute(2, 1, 0).
        result, text, gm = self.simplify(lambda x: x.permute(1, 0, 2).permute(2, 0, 1) + 1, torch.randn(2, 3, 4))
        self.assertEqual(fired(result), {"rule:permute_chain": 1})
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    permute = torch.ops.aten.permute.default(x_1, [1, 0, 2]);  permute = None
    permute_default = torch.ops.aten.permute.default(x_1, [2, 1, 0]);  x_1 = None
    add = torch.ops.aten.add.Tensor(permute_default, 1);  permute_default = None
    return add""")

    def test_permute_chain_to_identity(self):
        result, text, gm = self.simplify(lambda x: x.permute(2, 0, 1).permute(1, 2, 0) + 1, torch.randn(2, 3, 4))
        self.assertEqual(fired(result), {"rule:permute_chain": 1})
        self.assertEqual(len([n for n in gm.graph.nodes if n.target is aten.permute.default and n.users]), 0)

    def test_transpose_chain(self):
        fn = lambda x, y: x.t().t() + y.transpose(0, 2).transpose(2, 0)  # noqa: E731
        result, text, gm = self.simplify(fn, torch.randn(4, 4), torch.randn(2, 4, 4))
        self.assertEqual(fired(result), {"rule:transpose_chain": 2})
        self.assertExpectedInline(text, """\
def forward(self, x_1, y_1):
    t = torch.ops.aten.t.default(x_1);  t = None
    transpose = torch.ops.aten.transpose.int(y_1, 0, 2);  transpose = None
    add = torch.ops.aten.add.Tensor(x_1, y_1);  x_1 = y_1 = None
    return add""")

    def test_transpose_chain_not_for_different_dims(self):
        self.assert_not_fired(lambda x: x.transpose(0, 1).transpose(1, 2) + 1, torch.randn(2, 3, 4))

    def test_identity_expand(self):
        result, text, gm = self.simplify(lambda x: x.expand(2, 3) + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:identity_expand": 1})
        self.assertEqual(count(gm, aten.expand.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_identity_slice(self):
        fn = lambda x: x[0:] + aten.slice.Tensor(x, 1, 0, 3)  # noqa: E731
        result, text, gm = self.simplify(fn, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:identity_slice": 2})
        self.assertEqual(count(gm, aten.slice.Tensor), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, x_1);  x_1 = None
    return add""")

    def test_slice_that_drops_elements_stays(self):
        self.assert_not_fired(lambda x: x[1:] + x[:, :2].sum(), torch.randn(3, 3))

    def test_identity_clone(self):
        result, text, gm = self.simplify(lambda x: x.clone() + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:identity_clone": 1})
        self.assertEqual(count(gm, aten.clone.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_clone_of_transposed_tensor_feeding_view_stays(self):
        # contiguous() of x.t() changes strides; the view after it needs the contiguous copy.
        result, text = self.assert_not_fired(lambda x: x.t().contiguous().view(6) + 1, torch.randn(2, 3))
        self.assertEqual(result.stats["refused:identity_clone"], 1)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    t = torch.ops.aten.t.default(x_1);  x_1 = None
    clone = torch.ops.aten.clone.default(t, memory_format = torch.contiguous_format);  t = None
    view = torch.ops.aten.view.default(clone, [6]);  clone = None
    add = torch.ops.aten.add.Tensor(view, 1);  view = None
    return add""")

    def test_clone_of_input_that_is_written_later_stays(self):
        # c = x.clone(); x.copy_(y); c + 1: without the clone, the add would read y.
        def fn(x, y):
            c = x.clone()
            x.copy_(y)
            return c + 1

        x, y = torch.randn(3), torch.randn(3)
        gm = trace(fn, x.clone(), y)
        result = AlgebraicSimplification().run(gm)
        self.assertEqual(fired(result), {})
        self.assertEqual(count(gm, aten.clone.default), 1)
        expected = fn(x.clone(), y)
        assert_identical(gm(x.clone(), y), expected)

    def test_single_cat(self):
        result, text, gm = self.simplify(lambda x: torch.cat([x]) + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:single_cat": 1})
        self.assertEqual(count(gm, aten.cat.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    def test_alias(self):
        result, text, gm = self.simplify(lambda x: aten.alias.default(x) + 1, torch.randn(2, 3))
        self.assertEqual(fired(result), {"rule:alias": 1})
        self.assertEqual(count(gm, aten.alias.default), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    add = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    return add""")

    # ------------------------------------------------------------ symbolic shapes

    def test_symbolic_expression_to_input_symbol(self):
        # make_fx already maps `n * 3 // 3` back to n while tracing; Dynamo graphs keep such
        # chains, so build one by hand: repeat(x, [(n * 3) // 3]) with the vals sympy gives.
        gm = trace(lambda x, n: x.repeat(n), torch.randn(3), 2, symbolic=True)
        x_node, n_node = [node for node in gm.graph.nodes if node.op == "placeholder"]
        repeat = next(node for node in gm.graph.nodes if node.target is aten.repeat.default)
        with gm.graph.inserting_before(repeat):
            mul = gm.graph.call_function(operator.mul, (n_node, 3))
            div = gm.graph.call_function(operator.floordiv, (mul, 3))
        mul.meta["val"] = n_node.meta["val"] * 3
        div.meta["val"] = mul.meta["val"] // 3
        repeat.args = (x_node, [div])
        gm.recompile()
        self.assertEqual(str(div.meta["val"]), str(n_node.meta["val"]))

        result, text = run_pass(AlgebraicSimplification(), gm)
        self.assertEqual(fired(result), {"rule:symbolic_expression": 1})
        self.assertEqual(count(gm, operator.floordiv), 0)
        x = torch.randn(3)
        assert_identical(gm(x, 5), x.repeat(5))
        self.assertExpectedInline(text, """\
def forward(self, x_1, n_1):
    mul = n_1 * 3;  mul = None
    repeat = torch.ops.aten.repeat.default(x_1, [n_1]);  x_1 = n_1 = None
    return repeat""")

    def test_symbolic_expression_to_sym_size(self):
        # s0 * 3 // 3 is the size already read by sym_size.
        fn = lambda x: x.new_zeros(x.shape[0] * 3 // 3) + x.sum(1)  # noqa: E731
        result, text, gm = self.simplify(fn, torch.randn(4, 2), symbolic=True)
        self.assertEqual(fired(result), {"rule:symbolic_expression": 1})
        self.assertEqual(count(gm, operator.floordiv), 0)
        x = torch.randn(7, 2)
        assert_identical(gm(x), fn(x))
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    sym_size_int = torch.ops.aten.sym_size.int(x_1, 0)
    mul = sym_size_int * 3;  mul = None
    new_zeros = torch.ops.aten.new_zeros.default(x_1, [sym_size_int], pin_memory = False);  sym_size_int = None
    sum_1 = torch.ops.aten.sum.dim_IntList(x_1, [1]);  x_1 = None
    add = torch.ops.aten.add.Tensor(new_zeros, sum_1);  new_zeros = sum_1 = None
    return add""")

    def test_symbolic_expression_to_constant(self):
        # The `s == 4` branch specialises s to 4: s * 2 is the constant 8.
        def fn(x):
            s = x.shape[0]
            y = x.new_zeros(s * 2)
            return y + 1 if s == 4 else y

        result, text, gm = self.simplify(fn, torch.randn(4, 3), symbolic=True)
        self.assertEqual(fired(result), {"rule:symbolic_expression": 2})
        self.assertEqual(count(gm, operator.mul) + count(gm, aten.sym_size.int), 0)
        self.assertExpectedInline(text, """\
def forward(self, x_1):
    new_zeros = torch.ops.aten.new_zeros.default(x_1, [8], pin_memory = False);  x_1 = None
    add = torch.ops.aten.add.Tensor(new_zeros, 1);  new_zeros = None
    return add""")


class TestRuleTable(expecttest.TestCase):
    def test_every_rule_has_a_test(self):
        tested = {name[len("test_"):] for name in dir(TestAlgebraicSimplification) if name.startswith("test_")}
        # test_<rule> or test_<rule>_<variant>, e.g. test_pow_half_f32.
        missing = [r.name for r in RULES if not any(t == r.name or t.startswith(r.name + "_") for t in tested)]
        self.assertEqual(missing, [])

    def test_rule_names_are_unique(self):
        names = [rule.name for rule in RULES]
        self.assertEqual(len(names), len(set(names)))
