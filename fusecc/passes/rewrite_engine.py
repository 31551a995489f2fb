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
Refusals are counted as `refused:<rule>`, once per (rule, node) however many fixed-point rounds
see the match again, and listed with the node and the reason, so the report shows rules that
matched but were unsafe, and where.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

from fusecc.graph.node_kinds import alias_root, feeds_output, is_impure, is_mutated, storage_users


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


def apply_rules(gm: fx.GraphModule, rules: Sequence[Rule],
                refused: dict[tuple[str, str], str] | None = None) -> tuple[Counter, list[Refusal]]:
    """Apply `rules` to every node once; returns (stats, refusals new in this call). `refused`
    remembers (rule, node name) pairs across calls (fixed-point rounds), so that a refusal seen
    again is neither counted nor listed again."""
    refused = {} if refused is None else refused
    by_target: dict[Any, list[Rule]] = {}
    for rule in rules:
        for target in rule.targets:
            by_target.setdefault(target, []).append(rule)
    stats: Counter = Counter()
    refusals: list[Refusal] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in by_target or not node.users and not is_impure(node):
            continue
        for rule in by_target[node.target]:
            replacement = rule.rewrite(node)
            if replacement is None:
                continue
            name = node.name
            why = _replace(gm, node, replacement)
            if why is None:
                stats[f"rule:{rule.name}"] += 1
                break
            if (rule.name, name) not in refused:
                refused[(rule.name, name)] = why
                refusals.append(Refusal(rule.name, name, why))
                stats[f"refused:{rule.name}"] += 1
    return stats, refusals


@dataclass(frozen=True)
class Refusal:
    """A rule matched `node` but the engine refused its replacement as unsafe."""
    rule: str
    node: str
    why: str


def _replace(gm: fx.GraphModule, node: fx.Node, replacement: Replacement) -> str | None:
    """Replace `node`; None when done, else why the replacement is unsafe."""
    val = node.meta.get("val")
    if isinstance(replacement, NewNode):
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(replacement.target, replacement.args, replacement.kwargs)
        new.meta.update(node.meta)
        try:
            new_val = replacement.target(*_fake_args(new.args), **_fake_args(new.kwargs))
        except Exception as exc:
            gm.graph.erase_node(new)
            return f"the replacement fails on fake tensors ({type(exc).__name__})"
        if not same_tensor_meta(val, new_val):
            gm.graph.erase_node(new)
            return f"the replacement's {_meta_text(new_val)} differs from the node's {_meta_text(val)}"
        new.meta["val"] = new_val
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return None
    if isinstance(replacement, fx.Node):
        if not same_tensor_meta(val, replacement.meta.get("val")) and not _same_symbol(val, replacement):
            return (f"{replacement.name}'s {_meta_text(replacement.meta.get('val'))} differs from "
                    f"the node's {_meta_text(val)}")
        if feeds_output(node) and alias_root(replacement).op in ("placeholder", "get_attr"):
            return f"the node is an output and {replacement.name} aliases an input or constant"
        if any(user.op == "call_function" and is_impure(user) for user in node.users):
            return "a user of the node mutates it"
        # `clone(x)` -> `x` is wrong if x is written anywhere (`copy_(x, y)`): the clone's users
        # would read the new value. (A view of x shares x's storage, so the write shows in both.)
        if alias_root(node) is not alias_root(replacement) and is_mutated(replacement):
            return f"{replacement.name}'s storage is written in the graph"
        if feeds_output(node) and any(user.op == "output" for user in storage_users(replacement)):
            return f"two outputs would share {replacement.name}'s storage"
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        return None
    if isinstance(replacement, (int, float)) and isinstance(val, (torch.SymInt, torch.SymFloat)):
        node.replace_all_uses_with(replacement)  # type: ignore[arg-type]
        gm.graph.erase_node(node)
        return None
    return f"a {type(replacement).__name__} cannot replace a {type(val).__name__}"


def _meta_text(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).replace('torch.', '')}{list(val.shape)} stride {list(val.stride())}"
    return type(val).__name__


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
        return simplified_expr(val) == simplified_expr(other)
    return False


def simplified_expr(val: torch.SymInt):
    """A SymInt's expression as its shape environment simplifies it (its guards applied)."""
    shape_env = val.node.shape_env
    return shape_env.simplify(val.node.expr) if shape_env is not None else val.node.expr


def _fake_args(tree):
    from torch.utils._pytree import tree_map

    return tree_map(lambda a: a.meta["val"] if isinstance(a, fx.Node) else a, tree)
