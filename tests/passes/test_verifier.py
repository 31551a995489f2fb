"""Tests for fusecc/passes/verifier.py: each invariant a pass can break is caught, with an error
that names the pass; deliberately broken toy passes trigger them through run_passes."""

from collections import Counter

import expecttest
import torch

from fusecc.passes.base import GraphPass, PassResult
from fusecc.passes.pipeline import run_passes
from fusecc.passes.verifier import OutputSignature, VerificationError, verify_graph
from graph_builders import assert_identical, code, trace

aten = torch.ops.aten
prims_convert = torch.ops.prims.convert_element_type.default


class ToyPass(GraphPass):
    """A pass whose `run` is the given function of the graph module."""

    def __init__(self, name, edit):
        self.name, self.edit = name, edit

    def run(self, gm):
        self.edit(gm)
        gm.recompile()
        return PassResult(gm, True, Counter())


def nodes(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


def _use_before_definition(gm):
    # Make the first mul read the add that comes after it.
    mul, add = nodes(gm, aten.mul.Tensor)[0], nodes(gm, aten.add.Tensor)[0]
    mul.args = (add, 2)


def _node_without_meta(gm):
    mul = nodes(gm, aten.mul.Tensor)[0]
    with gm.graph.inserting_after(mul):
        neg = gm.graph.call_function(aten.neg.default, (mul,))
    mul.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)


def _change_output_shape(gm):
    # Replace the [2, 3] output by its [3]-shaped row sum (meta set correctly: only the shape changes).
    out = gm.graph.output_node().args[0]
    with gm.graph.inserting_after(out):
        total = gm.graph.call_function(aten.sum.dim_IntList, (out, [0]))
    total.meta["val"] = out.meta["val"].sum(0)
    gm.graph.output_node().args = (total,)


def _change_output_dtype(gm):
    out = gm.graph.output_node().args[0]
    with gm.graph.inserting_after(out):
        cast = gm.graph.call_function(prims_convert, (out, torch.float64))
    cast.meta["val"] = out.meta["val"].to(torch.float64)
    gm.graph.output_node().args = (cast,)


def _return_input(gm):
    # A sloppy `x * 1 -> x` on an output.
    mul = nodes(gm, aten.mul.Tensor)[0]
    mul.replace_all_uses_with(mul.args[0])
    gm.graph.erase_node(mul)


def _merge_outputs(gm):
    # A sloppy CSE that ignores outputs: (x * 2, x * 2) -> (a, a).
    first, second = nodes(gm, aten.mul.Tensor)
    second.replace_all_uses_with(first)
    gm.graph.erase_node(second)


def _merge_output_with_view_output(gm):
    # (x * 2, (x * 2).view(-1)) -> (a, a.view(-1)): one storage.
    first, second = nodes(gm, aten.mul.Tensor)
    second.replace_all_uses_with(first)
    gm.graph.erase_node(second)


class TestVerifier(expecttest.TestCase):
    def broken(self, fn, edit, *inputs) -> str:
        gm = trace(fn, *inputs)
        with self.assertRaises(VerificationError) as ctx:
            run_passes(gm, [ToyPass("toy_broken", edit)])
        message = str(ctx.exception)
        self.assertIn("after pass 'toy_broken'", message)
        return message

    def test_lint_error(self):
        message = self.broken(lambda x: x * 2 + 1, _use_before_definition, torch.randn(2, 3))
        self.assertIn("graph.lint() failed", message)

    def test_missing_meta_val(self):
        message = self.broken(lambda x: (x * 2).exp(), _node_without_meta, torch.randn(2, 3))
        self.assertExpectedInline(message, """after pass 'toy_broken': node %neg_default : [num_users=1] = call_function[target=torch.ops.aten.neg.default](args = (%mul,), kwargs = {}) has no meta['val']""")

    def test_output_shape_change(self):
        message = self.broken(lambda x: x * 2, _change_output_shape, torch.randn(2, 3))
        self.assertExpectedInline(message, """after pass 'toy_broken': output 0 changed from ('tensor', ('torch.float32', ('2', '3'))) to ('tensor', ('torch.float32', ('3',)))""")

    def test_output_dtype_change(self):
        message = self.broken(lambda x: x * 2, _change_output_dtype, torch.randn(2, 3))
        self.assertIn("output 0 changed", message)
        self.assertIn("torch.float64", message)

    def test_new_alias_of_input(self):
        message = self.broken(lambda x: x * 1, _return_input, torch.randn(2, 3))
        self.assertExpectedInline(message, """after pass 'toy_broken': output 0 now aliases 'x_1' (before: None); returning an input or constant would let the caller mutate it""")

    def test_two_outputs_merged(self):
        message = self.broken(lambda x: (x * 2, x * 2), _merge_outputs, torch.randn(3))
        self.assertExpectedInline(message, """after pass 'toy_broken': outputs 0 and 1 now share storage (one tensor, or views of one)""")

    def test_output_merged_with_view_output(self):
        message = self.broken(lambda x: (x * 2, (x * 2).view(-1)), _merge_output_with_view_output, torch.randn(3))
        self.assertIn("outputs 0 and 1 now share storage", message)

    def test_existing_sharing_and_aliasing_are_fine(self):
        # Outputs that already alias an input or each other before the pass are the contract.
        def fn(x):
            y = x * 2
            return x.view(-1), y, y.t()

        x = torch.randn(2, 2)
        gm = trace(fn, x)
        before = OutputSignature.of(gm)
        verify_graph(gm, before, "noop")  # does not raise
        records = run_passes(gm, [ToyPass("noop", lambda gm: None)])
        self.assertEqual([r.name for r in records], ["noop"] * 4)  # reports modified: repeats to max_rounds
        assert_identical(gm(x), fn(x))

    def test_correct_rewrite_passes(self):
        # x * 1 -> x on an internal node is fine.
        def rewrite(gm):
            mul = nodes(gm, aten.mul.Tensor)[0]
            mul.replace_all_uses_with(mul.args[0])
            gm.graph.erase_node(mul)

        x = torch.randn(3)
        gm = trace(lambda x: (x * 1).exp(), x)
        run_passes(gm, [ToyPass("ok", rewrite)], max_rounds=1)
        self.assertEqual(code(gm), """\
def forward(self, x_1):
    exp = torch.ops.aten.exp.default(x_1);  x_1 = None
    return exp""")

    def test_verify_false_skips_checks(self):
        gm = trace(lambda x: x * 1, torch.randn(3))
        run_passes(gm, [ToyPass("toy_broken", _return_input)], verify=False, max_rounds=1)
        self.assertEqual(len(nodes(gm, aten.mul.Tensor)), 0)


def test_ops_returning_nothing_need_no_meta_val():
    # .item() captured in the graph brings aten._assert_scalar nodes, which return nothing.
    import torch._dynamo

    f = lambda x: torch.ones((x > 0).sum().item())  # noqa: E731
    x = torch.randn(8)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        got = torch.compile(f, backend="fusecc", options={"strict": True})(x)
    torch._dynamo.reset()
    assert torch.equal(got, f(x))
