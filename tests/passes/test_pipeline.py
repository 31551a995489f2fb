"""Tests for fusecc/passes/pipeline.py and the ordered list in fusecc/passes/__init__.py:
fixed-point rounds, passes that run once, disable_passes, and the per-pass records."""

from collections import Counter

import expecttest
import torch

from fusecc.config import FuseccOptions
from fusecc.passes import build_pipeline, run_passes
from fusecc.passes.base import GraphPass, PassResult
from graph_builders import assert_identical, code, freeze_input, op_counts, trace

aten = torch.ops.aten


class CountingPass(GraphPass):
    """Reports `modified` for its first `changes` runs, then nothing; records each call."""

    def __init__(self, name, changes, calls, repeat=True):
        self.name, self.changes, self.calls = name, changes, calls
        self.repeat_to_fixed_point = repeat

    def run(self, gm):
        self.calls.append(self.name)
        modified = self.changes > 0
        self.changes -= 1
        return PassResult(gm, modified, Counter({"seen": 1}))


class FakeDump:
    def __init__(self):
        self.written = []

    def write_graph(self, name, gm):
        self.written.append(name)


class TestPipeline(expecttest.TestCase):
    def test_default_pipeline_order(self):
        self.assertEqual([p.name for p in build_pipeline(FuseccOptions())],
                         ["moe_matching", "quantized_linear_matching", "dce", "constant_folding",
                          "algebraic_simplification", "cse", "dce",
                          "horizontal_matmul_fusion", "attention_matching", "reinplace"])

    def test_rounds_stop_when_nothing_changes(self):
        calls = []
        passes = [CountingPass("a", 2, calls), CountingPass("b", 0, calls)]
        records = run_passes(trace(lambda x: x + 1, torch.randn(2)), passes, max_rounds=10)
        # Rounds 0 and 1 change something (a), round 2 changes nothing and ends the loop.
        self.assertEqual(calls, ["a", "b"] * 3)
        self.assertEqual([(r.name, r.round, r.modified) for r in records],
                         [("a", 0, True), ("b", 0, False), ("a", 1, True), ("b", 1, False),
                          ("a", 2, False), ("b", 2, False)])

    def test_rounds_capped_by_max_rounds(self):
        calls = []
        run_passes(trace(lambda x: x + 1, torch.randn(2)), [CountingPass("a", 100, calls)], max_rounds=3)
        self.assertEqual(calls, ["a"] * 3)

    def test_pass_not_repeated_runs_once_between_groups(self):
        calls = []
        passes = [CountingPass("a", 1, calls), CountingPass("once", 5, calls, repeat=False),
                  CountingPass("b", 1, calls)]
        records = run_passes(trace(lambda x: x + 1, torch.randn(2)), passes, max_rounds=4)
        self.assertEqual(calls, ["a", "a", "once", "b", "b"])
        self.assertEqual([r.round for r in records], [0, 1, 0, 0, 1])

    def test_real_pipeline_reaches_fixed_point(self):
        # Round 0: x * 1 and the pow go, leaving dead nodes; the (exp(x*x)) twins merge; DCE
        # cleans up. Round 1 changes nothing.
        def fn(x):
            y = (x * 1) ** 2
            return y.exp() + y.exp()

        x = torch.randn(3)
        gm = trace(fn, x)
        records = run_passes(gm, build_pipeline(FuseccOptions()), max_rounds=4)
        names = ["dce", "constant_folding", "algebraic_simplification", "cse", "dce"]
        once = [("horizontal_matmul_fusion", 0), ("attention_matching", 0), ("reinplace", 0)]  # once each
        self.assertEqual([(r.name, r.round) for r in records],
                         [("moe_matching", 0), ("quantized_linear_matching", 0)]
                         + [(n, 0) for n in names] + [(n, 1) for n in names] + once)
        self.assertFalse(any(r.modified for r in records if r.round == 1))
        by_name = {r.name: r for r in records if r.round == 0 and r.name != "dce"}
        self.assertEqual(by_name["algebraic_simplification"].stats,
                         Counter({"rule:mul_by_one": 1, "rule:pow_two": 1}))
        self.assertEqual(by_name["cse"].stats["merged:aten.exp"], 1)
        self.assertEqual(op_counts(gm), {"aten.mul": 1, "aten.exp": 1, "aten.add": 1})
        assert_identical(gm(x), fn(x))
        self.assertExpectedInline(code(gm), """\
def forward(self, x_1):
    mul_tensor = torch.ops.aten.mul.Tensor(x_1, x_1);  x_1 = None
    exp = torch.ops.aten.exp.default(mul_tensor);  mul_tensor = None
    add = torch.ops.aten.add.Tensor(exp, exp);  exp = None
    return add""")

    def test_records_have_times_and_op_counts(self):
        x, w = torch.randn(3), torch.randn(3)
        gm = trace(lambda x, w: x + (w * 2).exp() + x * 1, x, w)
        freeze_input(gm, 1, w)
        records = run_passes(gm, build_pipeline(FuseccOptions()))
        for r in records:
            self.assertGreaterEqual(r.seconds, 0.0)
            self.assertLess(r.seconds, 10.0)
        first = records[3]  # after moe_matching, quantized_linear_matching and dce
        self.assertEqual((first.name, first.ops_before, first.ops_after), ("constant_folding", 5, 3))
        self.assertEqual(first.stats["folded"], 1)
        for before, after in zip(records, records[1:]):
            self.assertEqual(after.ops_before, before.ops_after)  # each pass starts where the last ended
        assert_identical(gm(x, torch.zeros(3)), x + (w * 2).exp() + x)

    def test_disable_passes_skips_them(self):
        options = FuseccOptions(disable_passes=("cse", "dce"))
        self.assertEqual([p.name for p in build_pipeline(options)], ["moe_matching", "quantized_linear_matching",
                                                                       "constant_folding", "algebraic_simplification",
                                                                       "horizontal_matmul_fusion",
                                                                       "attention_matching", "reinplace"])
        gm = trace(lambda x: x.exp() + x.exp(), torch.randn(2))
        records = run_passes(gm, build_pipeline(options))
        self.assertNotIn("cse", [r.name for r in records])
        self.assertEqual(op_counts(gm)["aten.exp"], 2)  # nothing merged them

    def test_unknown_pass_name_raises(self):
        with self.assertRaisesRegex(ValueError, r"unknown pass\(es\) \['no_such_pass'\]"):
            build_pipeline(FuseccOptions(disable_passes=("cse", "no_such_pass")))

    def test_dump_gets_only_graphs_a_pass_changed(self):
        calls, dump = [], FakeDump()
        passes = [CountingPass("a", 2, calls), CountingPass("b", 0, calls)]
        run_passes(trace(lambda x: x + 1, torch.randn(2)), passes, dump=dump)
        self.assertEqual(dump.written, ["a", "a.round1"])
