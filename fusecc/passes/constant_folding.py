"""Constant folding: evaluate once, at compile time, every pure subgraph whose inputs are
all constants, and replace it by its result.

Constants are `get_attr` tensors (frozen weights when `freeze=True`, earlier folds) and
factory ops with static arguments (`arange(0, 16)`, `full([4], 2.0)`):

    before:  %w = get_attr[_frozen_param0]          # f32[64, 32]
             %wt = aten.permute(%w, [1, 0])         # view
             %wc = aten.clone(%wt, contiguous)      # f32[32, 64]
             %wh = aten._to_copy(%wc, dtype=f16)    # f16[32, 64]
             %y = aten.mm(%x, %wh)
    after:   %c = get_attr[_folded0]                # f16[32, 64], computed once
             %y = aten.mm(%x, %c)

Only the boundary of a constant subgraph is materialised (a constant that a run-time node
reads); intermediates are evaluated and dropped. Not folded: random or impure ops; anything
reading a SymInt (its value is not known until run time); views (they cost nothing at run
time, and folding them would copy the weight); results larger than `max_bytes`; results whose
eager strides differ from the traced ones; and nodes that would turn a graph output into a
bare constant (the caller could then mutate our constant).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from fusecc.passes.base import GraphPass, PassResult
from fusecc.passes.dce import DeadCodeElimination
from fusecc.graph.constants import constant_value, insert_constant_node
from fusecc.graph.node_kinds import feeds_output, is_pure, is_view
from fusecc.passes.rewrite_engine import same_tensor_meta


class ConstantFolding(GraphPass):
    name = "constant_folding"

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        known = self._evaluate(gm, stats)
        # Materialise only at the boundary: a constant that a run-time node (or the output)
        # reads. Constants read only by other constants are subsumed by them. A view is not
        # materialised (it costs nothing, and folding it would copy the weight): the node it
        # views is materialised instead, and the view stays, reading that constant.
        def is_alias_step(n):
            return is_view(n) or n.target is torch.ops.aten.lift_fresh_copy.default

        worklist = [n for n in known if n.op == "call_function" and any(u not in known for u in n.users)]
        to_fold: set[fx.Node] = set()
        rejected: set[fx.Node] = set()
        while worklist:
            base = worklist.pop()
            while base.op == "call_function" and is_alias_step(base):
                base = base.args[0]
            if base.op != "call_function" or base in to_fold or base in rejected:
                continue
            reason = self._refusal(base, known[base])
            if reason is None:
                to_fold.add(base)
                continue
            # Left to run time: the constants it reads now have a run-time reader.
            stats[f"skipped:{reason}"] += 1
            rejected.add(base)
            worklist.extend(a for a in base.all_input_nodes if a in known and a.op == "call_function")
        for node in [n for n in gm.graph.nodes if n in to_fold]:
            value = known[node]
            fake = node.meta["val"]
            replacement = insert_constant_node(gm, "_folded", value.clone() if value._base is not None else value,
                                               fake.fake_mode.from_tensor(value, static_shapes=True)
                                               if hasattr(fake, "fake_mode") else fake, before=node)
            node.replace_all_uses_with(replacement)
            stats["folded"] += 1
        modified = stats["folded"] > 0
        if modified:
            stats["constants_freed"] = DeadCodeElimination().run(gm).stats["constants_freed"]
            gm.recompile()
        return PassResult(gm, modified, stats)

    def _evaluate(self, gm: fx.GraphModule, stats: Counter) -> dict:
        """node -> its real value, for every node whose inputs are all constants."""
        known: dict[fx.Node, torch.Tensor] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = constant_value(gm, node)
                if isinstance(value, torch.Tensor):
                    known[node] = value
                continue
            if node.op != "call_function" or not self._foldable(node, known):
                continue
            args, kwargs = tree_map(lambda a: known[a] if isinstance(a, fx.Node) else a, (node.args, node.kwargs))
            try:
                value = node.target(*args, **kwargs)
            except Exception as exc:  # leave it to run time, where it will raise properly
                stats[f"skipped:eval_error:{type(exc).__name__}"] += 1
                continue
            if isinstance(value, torch.Tensor):
                known[node] = value
        return known

    def _refusal(self, node: fx.Node, value: torch.Tensor):
        """Why `node` must not become a constant, or None."""
        if feeds_output(node):
            return "graph_output"  # the caller could mutate our constant
        if value.numel() * value.element_size() > self.max_bytes:
            return "too_large"
        if not same_tensor_meta(node.meta["val"], value):
            # Eager gave other strides (or shape/dtype) than the traced fake tensor: users
            # traced against the fake one (a view, say) might not accept the real one.
            return "meta_mismatch"
        return None

    @staticmethod
    def _foldable(node: fx.Node, known: dict) -> bool:
        if not is_pure(node) or not isinstance(node.meta.get("val"), torch.Tensor):
            return False
        flat, _ = tree_flatten((node.args, node.kwargs))
        for a in flat:
            if isinstance(a, fx.Node) and a not in known:
                return False
            if isinstance(a, torch.SymInt) or isinstance(a, torch.SymFloat):
                return False
        return True
