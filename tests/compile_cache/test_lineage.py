"""Frozen constants are recomputed from the loading process's weights, by the ops that made them."""

import torch

from fusecc.compile_cache.lineage import ConstantLineage, Derived, InputView, evaluate


def test_concatenated_transposed_weights_are_recomputed_from_new_weights():
    wq, wk, scale = torch.randn(6, 4), torch.randn(2, 4), torch.tensor(3.0)
    with ConstantLineage({1: wq, 3: wk}) as lineage:
        fused = torch.cat([wq.t(), wk.t()], 1).contiguous() * scale   # [4, 8]
        view = wq[2:]                                                 # a view: no new storage
    assert isinstance(lineage.source_of(fused), Derived)
    assert isinstance(lineage.source_of(view), InputView)
    new_q, new_k = torch.randn(6, 4), torch.randn(2, 4)
    inputs = [None, new_q, None, new_k]
    expected = torch.cat([new_q.t(), new_k.t()], 1) * 3.0
    torch.testing.assert_close(evaluate(lineage.source_of(fused), inputs, {}), expected)
    torch.testing.assert_close(evaluate(lineage.source_of(view), inputs, {}), new_q[2:])


def test_values_not_derived_from_weights_have_no_recipe():
    weight = torch.randn(4)
    with ConstantLineage({0: weight}) as lineage:
        table = torch.arange(8.0).cos()
    assert lineage.source_of(table) is None and not lineage.is_tainted(table)


def test_weight_values_written_in_place_are_tainted_not_stored():
    """A recipe cannot replay an in-place write: the result must not be stored by value either
    (it would hold this process's weights), so it is marked and its graph is not stored."""
    weight = torch.randn(4)
    with ConstantLineage({0: weight}) as lineage:
        changed = weight * 2
        changed.add_(1)                  # mutated after it was recorded
        buffer = torch.empty(4)
        buffer.copy_(weight)             # filled from a weight in place
        derived = buffer + 1             # and what is computed from it
    for t in (changed, buffer, derived):
        assert lineage.source_of(t) is None and lineage.is_tainted(t)
