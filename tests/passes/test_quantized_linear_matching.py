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
from graph_builders import count, freeze_input, run_pass, trace
from quantized_modules import (FP8RowwiseLinear, Int4EightPerWord, Int4TwoPerByte, Int8Linear, Int8ScaleAfter,
                               QuantizedMLP)

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


def match(module, x, freeze=True):
    """Run the pass on module(x)'s graph; its output still equals eager. -> (PassResult, code, graph)"""
    gm, inputs = traced(module, x, freeze)
    result, text = run_pass(QuantizedLinearMatching(), gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(x), rtol=1e-5, atol=1e-5)
    return result, text, gm


class TestQuantizedLinearMatching(expecttest.TestCase):

    def test_int8_and_int4_linears_become_weight_only_linear(self):
        x = torch.randn(2, 3, 32)
        block = torch.nn.Sequential(Int8Linear(32, 16), Int4TwoPerByte(16, 24, group=8))
        result, text, gm = match(block, x)
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


@pytest.mark.parametrize("make,kind", [
    (lambda: Int4TwoPerByte(32, 8, group=16, high_first=True), "int4_group16"),  # other nibble order
    (lambda: Int4EightPerWord(32, 8, group=8), "int4_group8"),  # int32 words, zero point 8 as a number
    (lambda: Int8ScaleAfter(32, 8), "int8_per_channel"),  # scale after the matmul: stays, on the output
    (lambda: FunctionOf(lambda x, q, s, z: F.linear(x, (q.float() - z[:, None]) * s[:, None]),  # GPTQ-8-like
                        q=torch.randint(0, 256, (8, 32), dtype=torch.uint8), s=torch.rand(8) * 0.01,
                        z=torch.full((8,), 128.0)), "int8_per_channel"),  # unsigned 0..255: offset into zeros
    (lambda: FunctionOf(lambda x, q, s: x @ (q.to(x.dtype) * s).t(),  # int4 values in an int8 tensor
                        q=torch.randint(-8, 8, (8, 32), dtype=torch.int8), s=torch.rand(8, 1)), "int4_per_channel"),
    (lambda: FunctionOf(lambda x, q, s, z: F.linear(x, (q.float() - z.repeat_interleave(16, 1))  # scales [N, K]
                                                    * s.repeat_interleave(16, 1)),
                        q=torch.randint(0, 16, (8, 32), dtype=torch.uint8), s=torch.rand(8, 2),
                        z=torch.randint(0, 16, (8, 2)).float()), "int4_group16"),
    (lambda: FunctionOf(lambda x, p, s: F.linear(x, (torch.stack([p & 15, p >> 4], -1).float().view(8, 32) - 8) * s),
                        p=torch.randint(0, 256, (8, 16), dtype=torch.uint8), s=torch.rand(8, 1)),  # cast, then view
     "int4_per_channel"),
])
def test_other_packings_and_forms(make, kind):
    result, _, gm = match(make(), torch.randn(3, 32))
    assert (result.stats[f"rewritten:{kind}"], count(gm, FUSED), count(gm, aten.mm.default)) == (1, 1, 0)


@pytest.mark.parametrize("make,reason", [
    (lambda: FunctionOf(lambda x, q, s, m: F.linear(x, q.float() * s[:, None] + m[:, None]),  # q * s + m
                        q=torch.randint(0, 16, (8, 32), dtype=torch.uint8), s=torch.rand(8), m=torch.rand(8)),
     "scale_applied_before_zero_point"),
    (lambda: FunctionOf(lambda x, q, s: F.linear(x, q.float() * s),  # a scale per weight element
                        q=torch.randint(-127, 128, (8, 32), dtype=torch.int8), s=torch.rand(8, 32)),
     "scale_varies_within_group"),
    (lambda: FunctionOf(lambda x, q, s: x @ (q.float() * s),  # stored [K, N]: x @ W without a transpose
                        q=torch.randint(-127, 128, (32, 8), dtype=torch.int8), s=torch.rand(8)),
     "weight_not_stored_output_channel_first"),
    (lambda: FunctionOf(lambda x, q, s: F.linear(x, q.float() * s[:, None]),
                        q=torch.randint(-1000, 1000, (8, 32), dtype=torch.int16), s=torch.rand(8)),
     "integer_values_beyond_8_bits"),
])
def test_what_is_not_matched_stays_and_says_why(make, reason):
    result, _, gm = match(make(), torch.randn(3, 32))
    assert not result.modified
    assert count(gm, FUSED) == 0
    assert result.stats[f"skipped:{reason}"] == 1
    assert [k for k in result.stats if k.startswith("linear ")] == [f"linear mm: not fused, {reason}"]


def test_packed_weights_that_are_graph_inputs_are_refused():
    # freeze=False: the packing is known only at run time; converting it per call would cost a pass over it
    result, _, gm = match(Int4TwoPerByte(32, 8, group=16), torch.randn(3, 32), freeze=False)
    assert (result.stats["skipped:weights_not_frozen"], count(gm, FUSED)) == (1, 0)


@pytest.mark.parametrize("make", [lambda: Int8Linear(32, 8), lambda: Int8ScaleAfter(32, 8)])
def test_int8_weights_that_are_graph_inputs_are_used_as_they_are(make):
    result, _, gm = match(make(), torch.randn(3, 32), freeze=False)
    assert (result.stats["rewritten:int8_per_channel"], count(gm, FUSED)) == (1, 1)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] in ([], ["_quantized_scales0"])


def test_float_linears_are_not_reported():
    result, _, _ = match(torch.nn.Linear(32, 8), torch.randn(3, 32))
    assert dict(result.stats) == {}


def compile_and_run(module, x, dump_dir, **options):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=fusecc_backend, options={"dump_dir": str(dump_dir), **options})
    with torch.no_grad():
        return compiled(x)


def dumped(dump_dir, pattern: str) -> str:
    return "\n".join(open(f).read() for f in sorted(glob.glob(os.path.join(dump_dir, "*", pattern))))


def weight_sized_float_constants(final: str, numel: int) -> list[str]:
    """get_attr lines of the dumped final graph holding a float tensor of at least `numel` elements."""
    found = []
    for dtype, dims in re.findall(r'_\w+: "(f32|f16|bf16)\[([\d, ]*)\]\[[\d, ]*\]\w*" = self\._', final):
        size = 1
        for d in dims.split(","):
            size *= int(d) if d.strip() else 1
        if size >= numel:
            found.append(f"{dtype}[{dims}]")
    return found


def test_compiled_model_runs_one_fused_linear_per_quantized_linear(tmp_path):
    torch.manual_seed(0)
    model = QuantizedMLP(hidden=64, inter=48, group=16).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = model(x)
    out = compile_and_run(model, x, tmp_path, freeze=True, codegen="triton")  # through the interpreter on CPU
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    final = dumped(tmp_path, "*final.py")
    assert final.count("torch.ops.fusecc.weight_only_linear.default(") == 4
    assert "aten.mm" not in final and "aten.addmm" not in final
    assert weight_sized_float_constants(final, 48 * 64) == []  # no dequantized weight (each is 48 x 64 or 64 x 48)
    assert "f32[64, 3]" in weight_sized_float_constants(final, 1)  # what it does see: the int4 scales, [N, K/G]
    report = json.loads(dumped(tmp_path, "report.json"))
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "quantized_linear_matching")
    assert {k: v for k, v in stats.items() if k.startswith("linear ")} == {
        "linear up (addmm): fused, int8_per_channel": 1, "linear gate (mm): fused, int4_group16": 1,
        "linear down (mm_1): fused, int8_per_channel": 1, "linear out (mm_2): fused, int4_group16": 1}
    # one extern call per linear; the activations (and gpt-fast's scale after the matmul) fuse into kernels
    linears = [n for n in report["notes"] if n.endswith("fusecc.weight_only_linear: extern kernel")]
    assert len(linears) == 4 and report["codegen"]["kernel_launches"] == 3


def test_unfrozen_model_fuses_its_int8_linears_and_the_report_says_why_not_int4(tmp_path):
    torch.manual_seed(0)
    model = QuantizedMLP(hidden=64, inter=48, group=16).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(compile_and_run(model, x, tmp_path), expected, rtol=1e-5, atol=1e-5)
    assert dumped(tmp_path, "*final.py").count("torch.ops.fusecc.weight_only_linear.default(") == 2  # the int8 ones
    report = dumped(tmp_path, "report.md")
    assert "skipped:weights_not_frozen=2" in report
    assert "linear gate (mm): not fused, weights_not_frozen" in report


def _scaled_mm_runs_on_cpu() -> bool:
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _scaled_mm_runs_on_cpu(), reason="this torch has no CPU kernel for rowwise _scaled_mm")
def test_scaled_mm_stays_one_extern_call_with_its_scales_fused_around_it(tmp_path):
    torch.manual_seed(0)
    model = FP8RowwiseLinear(64, 32).eval()
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        expected = model(x)
    out = compile_and_run(model, x, tmp_path, freeze=True, codegen="triton")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    final = dumped(tmp_path, "*final.py")
    assert final.count("torch.ops.aten._scaled_mm.default(") == 1
    graph, kernels = final.split("class kernel_", 1)
    # the activation scale (amax, divisions, clamp) and the bias epilogue run in generated kernels
    assert "aten.amax" not in graph and "aten.amax" in kernels and "aten.add" in kernels
    assert json.loads(dumped(tmp_path, "report.json"))["codegen"]["kernel_launches"] == 2


@pytest.mark.gpu
def test_gpu_bf16_quantized_model_at_real_sizes(tmp_path):
    torch.manual_seed(0)
    model = QuantizedMLP(hidden=2048, inter=5632, group=128).eval().unit_gain_().cuda()
    for module in model.modules():  # bf16 scales: the dequantization runs in bf16, as such models do
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(torch.bfloat16))
    model.up.bias.data = model.up.bias.data.to(torch.bfloat16)
    for tokens in (1, 300):
        x = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            expected = model(x)
        out = compile_and_run(model, x, tmp_path / str(tokens), freeze=True)
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
        assert dumped(tmp_path / str(tokens), "*final.py").count("torch.ops.fusecc.weight_only_linear.default(") == 4


@pytest.mark.gpu
def test_gpu_scaled_mm_at_real_sizes(tmp_path):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    torch.manual_seed(0)
    model = FP8RowwiseLinear(4096, 4096, out_dtype=torch.bfloat16).eval().cuda()
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    out = compile_and_run(model, x, tmp_path, freeze=True)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert dumped(tmp_path, "*final.py").count("torch.ops.aten._scaled_mm.default(") == 1
