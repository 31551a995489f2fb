"""fusecc's passes keep functional collectives (fusecc/graph/node_kinds.py: collectives are
impure): every rank must issue the same collectives in the same order, so CSE merges no two
identical all-reduces, DCE removes no unused one, constant folding evaluates none at compile time."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fusecc.distributed.collectives import all_reduce
from fusecc.graph.node_kinds import is_collective, is_impure, may_write
from fusecc.passes.constant_folding import ConstantFolding
from fusecc.passes.cse import CommonSubexpressionElimination
from fusecc.passes.dce import DeadCodeElimination


def _collectives(gm):
    return [n.target.__name__ for n in gm.graph.nodes if is_collective(n)]


def test_cse_dce_and_folding_keep_every_collective_in_order():
    def f(x):
        twin_a = all_reduce(x * 2, "0")
        twin_b = all_reduce(x * 2, "0")  # identical to twin_a: still a second collective
        all_reduce(x + 1, "0")  # unused
        all_reduce(torch.ones(3), "0")  # constant input: must not run at compile time
        return twin_a + twin_b

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3))
    before = _collectives(gm)
    assert before == ["all_reduce.default", "wait_tensor.default"] * 4
    for node in gm.graph.nodes:
        if is_collective(node):
            assert is_impure(node) and not may_write(node)
    for p in (ConstantFolding(), CommonSubexpressionElimination(), DeadCodeElimination()):
        p.run(gm)
    assert _collectives(gm) == before
    muls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert len(muls) == 1  # the pure twins above the collectives still merge
