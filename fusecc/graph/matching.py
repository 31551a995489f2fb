"""What the pattern-matching passes (attention, MoE, quantized linears) share: the exception a
matcher raises with the reason it gives up, and the node tests it is written in.

    try:
        ...                         # _is / tensor_value / tensor_shape, or raise NoMatch("reason")
    except NoMatch as e:
        stats[f"skipped:{e.reason}"] += 1
"""

from __future__ import annotations

import torch
from torch import fx


class NoMatch(Exception):
    """Raised by a matcher: `reason` is recorded in stats and `reasons`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_call(node, *targets) -> bool:
    """node is an fx call of one of `targets` (ops or functions)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def tensor_value(node) -> torch.Tensor:
    """The fake tensor a node computes; NoMatch for an operand without one (a Python number, a
    node without tensor meta)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        raise NoMatch("operand_without_tensor_meta")
    return value


def tensor_shape(node) -> tuple:
    return tuple(tensor_value(node).shape)
