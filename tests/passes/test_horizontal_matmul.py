"""Tests for fusecc/passes/horizontal_matmul.py: linears that share an input and have frozen
weights become one GEMM on the concatenated weight (biases too), and nothing else does: weights
that are graph inputs, different inputs, mm next to addmm, groups over the size limit."""

import expecttest
import torch
import torch.nn.functional as F

from fusecc.passes.cse import CommonSubexpressionElimination
from fusecc.passes.horizontal_matmul import HorizontalMatmulFusion
from graph_builders import code, constants, count, freeze_input, op_counts, run_pass, trace

aten = torch.ops.aten


def qkv(x, wq, wk, wv):
    return F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)


def qkv_bias(x, wq, wk, wv, bq, bk, bv):
    return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)


class TestHorizontalMatmulFusion(expecttest.TestCase):
    def setUp(self):
        torch.manual_seed(0)

    def fuse(self, fn, *inputs, frozen=(), max_bytes=64 * 1024 * 1024, symbolic=False, cse_first=False):
        gm = trace(fn, *inputs, symbolic=symbolic)
        for index in frozen:
            freeze_input(gm, index, inputs[index])
        if cse_first:  # as in the pipeline: the views of a 3-D input merge first
            CommonSubexpressionElimination().run(gm)
        result, text = run_pass(HorizontalMatmulFusion(max_bytes=max_bytes), gm)
        expected = fn(*inputs)
        actual = gm(*inputs)
        self.assertEqual(len(actual), len(expected))
        for a, e in zip(actual, expected):
            self.assertEqual((a.dtype, a.shape, a.stride()), (e.dtype, e.shape, e.stride()))
            # one wider GEMM may block its sums differently: fp32 rounding, not a different result
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        for node in gm.graph.nodes:  # every node's fake value matches what it computes
            if node.op == "get_attr":
                real, fake = getattr(gm, node.target), node.meta["val"]
                self.assertEqual((real.shape, real.stride()), (fake.shape, fake.stride()))
        return result, text, gm

    def test_q_k_v_projections_become_one_mm(self):
        x = torch.randn(3, 8)
        wq, wk, wv = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
        result, text, gm = self.fuse(qkv, x, wq, wk, wv, frozen=[1, 2, 3])
        self.assertTrue(result.modified)
        self.assertEqual((result.stats["fused_groups"], result.stats["fused_matmuls"]), (1, 3))
        self.assertEqual(result.stats["constants_freed"], 3)  # the three separate weights
        self.assertEqual(count(gm, aten.mm.default), 1)
        self.assertEqual(constants(gm), ["_hfused3"])  # numbered after the frozen _frozen_param0..2
        # The fused constant is [wq; wk; wv] (rows = output features), used transposed.
        torch.testing.assert_close(gm._hfused3, torch.cat([wq, wk, wv]), rtol=0, atol=0)
        self.assertExpectedInline(text, """\
def forward(self, x_1, wq_1, wk_1, wv_1):
    _hfused3 = self._hfused3
    permute_default = torch.ops.aten.permute.default(_hfused3, [1, 0]);  _hfused3 = None
    mm_default = torch.ops.aten.mm.default(x_1, permute_default);  x_1 = permute_default = None
    slice_tensor = torch.ops.aten.slice.Tensor(mm_default, 1, 0, 8)
    clone_default = torch.ops.aten.clone.default(slice_tensor, memory_format = torch.contiguous_format);  slice_tensor = None
    slice_tensor_1 = torch.ops.aten.slice.Tensor(mm_default, 1, 8, 12)
    clone_default_1 = torch.ops.aten.clone.default(slice_tensor_1, memory_format = torch.contiguous_format);  slice_tensor_1 = None
    slice_tensor_2 = torch.ops.aten.slice.Tensor(mm_default, 1, 12, 16);  mm_default = None
    clone_default_2 = torch.ops.aten.clone.default(slice_tensor_2, memory_format = torch.contiguous_format);  slice_tensor_2 = None
    return (clone_default, clone_default_1, clone_default_2)""")

    def test_biased_projections_concatenate_biases(self):
        # Qwen2's q/k/v carry a bias: addmm(bias, x, w^T) each, fused into one addmm.
        x = torch.randn(5, 8)
        weights = [torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)]
        biases = [torch.randn(8), torch.randn(4), torch.randn(4)]
        result, _, gm = self.fuse(qkv_bias, x, *weights, *biases, frozen=range(1, 7))
        self.assertEqual((result.stats["fused_groups"], result.stats["fused_matmuls"]), (1, 3))
        self.assertEqual(count(gm, aten.addmm.default), 1)
        self.assertEqual(count(gm, aten.mm.default), 0)
        weight_name, bias_name = sorted(constants(gm))  # numbered after the six frozen inputs
        self.assertRegex(weight_name, r"^_hfused\d+$")
        self.assertRegex(bias_name, r"^_hfused_bias\d+$")
        torch.testing.assert_close(getattr(gm, bias_name), torch.cat(biases), rtol=0, atol=0)
        torch.testing.assert_close(getattr(gm, weight_name), torch.cat(weights), rtol=0, atol=0)

    def test_three_d_input_with_symbolic_tokens(self):
        # A [batch, seq, hidden] activation is flattened per linear; after CSE the flattening is
        # shared and the group forms. The token count stays symbolic (no recompile per length).
        x = torch.randn(2, 3, 8)
        wq, wk, wv = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
        result, _, gm = self.fuse(qkv, x, wq, wk, wv, frozen=[1, 2, 3], symbolic=True, cse_first=True)
        self.assertEqual(result.stats["fused_matmuls"], 3)
        self.assertEqual(count(gm, aten.mm.default), 1)
        longer = torch.randn(2, 7, 8)
        for a, e in zip(gm(longer, wq, wk, wv), qkv(longer, wq, wk, wv)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)

    def test_gate_and_up_fuse_but_down_does_not(self):
        # SwiGLU: gate and up read x, down reads their product: one group of two, down alone.
        def mlp(x, w_gate, w_up, w_down):
            return (F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down),)

        x = torch.randn(3, 8)
        result, _, gm = self.fuse(mlp, x, torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16),
                                  frozen=[1, 2, 3])
        self.assertEqual((result.stats["fused_groups"], result.stats["fused_matmuls"]), (1, 2))
        self.assertEqual(count(gm, aten.mm.default), 2)

    def test_a_group_reading_a_fused_member_of_another(self):
        # h = a(x), g = b(x) fuse; c(h), d(h) fuse too, on h as the first fusion left it (the
        # second group used to be built on the erased h: the graph failed lint)
        def chained(x, wa, wb, wc, wd):
            h = F.linear(x, wa)
            return F.linear(h, wc), F.linear(h, wd), F.linear(x, wb)

        x = torch.randn(3, 8)
        result, _, gm = self.fuse(chained, x, torch.randn(8, 8), torch.randn(8, 8), torch.randn(4, 8),
                                  torch.randn(4, 8), frozen=[1, 2, 3, 4])
        self.assertEqual((result.stats["fused_groups"], result.stats["fused_matmuls"]), (2, 4))
        self.assertEqual(count(gm, aten.mm.default), 2)

    def test_weights_that_are_inputs_are_left_alone(self):
        # Without freezing, concatenating would copy the weights on every call.
        x = torch.randn(3, 8)
        before = op_counts(trace(qkv, x, torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)))
        result, _, gm = self.fuse(qkv, x, torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8))
        self.assertFalse(result.modified)
        self.assertEqual(op_counts(gm), before)

    def test_different_inputs_are_not_grouped(self):
        def two(x, y, wa, wb):
            return F.linear(x, wa), F.linear(y, wb)

        result, _, gm = self.fuse(two, torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8),
                                  torch.randn(4, 8), frozen=[2, 3])
        self.assertFalse(result.modified)
        self.assertEqual(count(gm, aten.mm.default), 2)

    def test_mm_and_addmm_are_not_mixed(self):
        def mixed(x, wa, wb, bb):
            return F.linear(x, wa), F.linear(x, wb, bb)

        result, _, gm = self.fuse(mixed, torch.randn(3, 8), torch.randn(4, 8), torch.randn(4, 8),
                                  torch.randn(4), frozen=[1, 2, 3])
        self.assertFalse(result.modified)
        self.assertEqual((count(gm, aten.mm.default), count(gm, aten.addmm.default)), (1, 1))

    def test_group_over_size_limit_is_skipped(self):
        x = torch.randn(3, 8)
        weights = [torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)]  # 512 bytes together
        result, _, gm = self.fuse(qkv, x, *weights, frozen=[1, 2, 3], max_bytes=511)
        self.assertFalse(result.modified)
        self.assertEqual(result.stats["skipped:too_large"], 1)
        self.assertEqual(count(gm, aten.mm.default), 3)
        result, _, _ = self.fuse(qkv, x, *weights, frozen=[1, 2, 3], max_bytes=512)
        self.assertEqual(result.stats["fused_groups"], 1)


if __name__ == "__main__":
    import unittest

    unittest.main()
