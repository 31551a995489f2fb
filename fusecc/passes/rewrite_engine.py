"""The engine that applies a table of local rewrite rules (tinygrad's `pm_*` tables as data).

A rule looks at one node and returns `None` (no match) or a `Replacement`:
- an existing `fx.Node` computing the same value (`x * 1` -> `x`),
- `NewNode(target, args, kwargs)` to create in its place (`x ** 2` -> `mul(x, x)`),
- a Python number, for SymInt-valued nodes whose expression sympy folds to a constant.

The engine, not each rule, enforces the safety conditions, so a sloppy rule cannot miscompile:
- the replacement has the same shape, dtype, strides and device as the node (a broadcasting
  `x * ones` that changes shape, or an `x + 0` that changes dtype, is refused);
- an existing-node replacement is refused if the node is a graph output (directly or through
  views) and the replacement aliases an input or constant, if any user mutates it, or if the
  replacement's storage is written anywhere in the graph (`clone(x)` -> `x` before `copy_(x, y)`).
Refusals are counted as `refused:<rule>` so the report shows rules that matched but were unsafe.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

from fusecc.passes.node_kinds import alias_root, feeds_output, is_impure, is_mutated, storage_users


@dataclass(frozen=True)
class NewNode:
    target: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)


Replacement = Union[fx.Node, NewNode, int, float, None]


@dataclass(frozen=True)
class Rule:
    name: str
    targets: tuple  # the op overloads (or callables) this rule inspects
    rewrite: Callable[[fx.Node], Replacement]


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule]) -> Counter:
    by_target: dict[Any, list[Rule]] = {}
    for rule in rules:
        for target in rule.targets:
            by_target.setdefault(target, []).append(rule)
    stats: Counter = Counter()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in by_target or not node.users and not is_impure(node):
            continue
        for rule in by_target[node.target]:
            replacement = rule.rewrite(node)
            if replacement is None:
                continue
            if _replace(gm, node, replacement):
                stats[f"rule:{rule.name}"] += 1
                break
            stats[f"refused:{rule.name}"] += 1
    return stats


def _replace(gm: fx.GraphModule, node: fx.Node, replacement: Replacement) -> bool:
    val = node.meta.get("val")
    if isinstance(replacement, NewNode):
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(replacement.target, replacement.args, replacement.kwargs)
        new.meta.update(node.meta)
        try:
            new_val = replacement.target(*_fake_args(new.args), **_fake_args(new.kwargs))
        except Exception:
            gm.graph.erase_node(new)
            return False
        if not same_tensor_meta(val, new_val):
            gm.graph.erase_node(new)
            return False
        new.meta["val"] = new_val
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True
    if isinstance(replacement, fx.Node):
        if not same_tensor_meta(val, replacement.meta.get("val")) and not _same_symbol(val, replacement):
            return False
        if feeds_output(node) and alias_root(replacement).op in ("placeholder", "get_attr"):
            return False
        if any(user.op == "call_function" and is_impure(user) for user in node.users):
            return False
        # `clone(x)` -> `x` is wrong if x is written anywhere (`copy_(x, y)`): the clone's users
        # would read the new value. (A view of x shares x's storage, so the write shows in both.)
        if alias_root(node) is not alias_root(replacement) and is_mutated(replacement):
            return False
        if feeds_output(node) and any(user.op == "output" for user in storage_users(replacement)):
            return False  # two outputs would share one storage (the other through any view of it)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        return True
    if isinstance(replacement, (int, float)) and isinstance(val, (torch.SymInt, torch.SymFloat)):
        node.replace_all_uses_with(replacement)  # type: ignore[arg-type]
        gm.graph.erase_node(node)
        return True
    return False


def same_tensor_meta(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.dtype != b.dtype or a.device != b.device or len(a.shape) != len(b.shape):
        return False
    if any(str(x) != str(y) for x, y in zip(a.shape, b.shape)):
        return False
    # Strides matter only where a dim has more than one element.
    for size, sa, sb in zip(a.shape, a.stride(), b.stride()):
        if str(size) != "1" and str(sa) != str(sb):
            return False
    return True


def _same_symbol(val, replacement: fx.Node) -> bool:
    other = replacement.meta.get("val")
    if isinstance(val, torch.SymInt) and isinstance(other, torch.SymInt):
        return _simplify(val) == _simplify(other)
    return False


def _simplify(val: torch.SymInt):
    shape_env = val.node.shape_env
    return shape_env.simplify(val.node.expr) if shape_env is not None else val.node.expr


def _fake_args(tree):
    from torch.utils._pytree import tree_map

    return tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, tree)
