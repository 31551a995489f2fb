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

Not folded: random or impure ops; anything reading a SymInt (its value is not known until
run time); views (they cost nothing at run time, and folding them would copy the weight);
results larger than `max_bytes`; and nodes that would turn a graph output into a bare
constant (the caller could then mutate our constant).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from fusecc.passes.base import GraphPass, PassResult
from fusecc.passes.dce import DeadCodeElimination
from fusecc.passes.constants import constant_value, insert_constant_node
from fusecc.passes.node_kinds import feeds_output, is_pure, is_view


class ConstantFolding(GraphPass):
    name = "constant_folding"

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        # node -> its real value, for nodes known to be constant.
        known: dict[fx.Node, torch.Tensor] = {}
        for node in list(gm.graph.nodes):
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
            if not isinstance(value, torch.Tensor):
                continue
            known[node] = value
            if is_view(node) or node.target is torch.ops.aten.lift_fresh_copy.default:
                continue  # materialised only if a non-view consumer gets folded
            if feeds_output(node):
                stats["skipped:graph_output"] += 1
                continue
            if value.numel() * value.element_size() > self.max_bytes:
                stats["skipped:too_large"] += 1
                continue
            if not self._worth_folding(node, known):
                continue
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

    @staticmethod
    def _worth_folding(node: fx.Node, known: dict) -> bool:
        """Fold only where a real consumer exists: a node all of whose users are themselves
        foldable will be subsumed by them, so folding it too would just keep an extra copy."""
        for user in node.users:
            if user.op != "call_function" or not ConstantFolding._foldable(user, known | {node: None}):
                return True
            if is_view(user):
                return True
        return False
