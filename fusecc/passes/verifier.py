"""Checks run after every pass (design.md: lint, meta['val'] consistency, no new aliasing).

A pass that breaks one of these is a compiler bug; the verifier turns a silent miscompile
into an error naming the pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fusecc.graph.node_kinds import alias_root


class VerificationError(RuntimeError):
    pass


@dataclass(frozen=True)
class OutputSignature:
    """What the graph promises its caller: per output, its type/shape/dtype and what it aliases."""

    entries: tuple

    @staticmethod
    def of(gm: fx.GraphModule) -> "OutputSignature":
        out_node = gm.graph.output_node()
        flat = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
        entries = []
        first_seen: dict[fx.Node, int] = {}
        for i, value in enumerate(flat):
            if not isinstance(value, fx.Node):
                entries.append(("const", repr(value), None, None))
                continue
            val = value.meta.get("val")
            root = alias_root(value)
            # Which earlier output shares this one's storage: the very same tensor or a view of
            # the same base (None if it is the first). `(y, y.view(-1))` may share; `(a, b)` may not start to.
            same_as = first_seen.setdefault(root, i)
            same_as = None if same_as == i else same_as
            # An output that aliases a graph input or a constant is part of the contract.
            root_kind = root.target if root.op in ("placeholder", "get_attr") else None
            if isinstance(val, torch.Tensor):
                entries.append(("tensor", (str(val.dtype), tuple(str(s) for s in val.shape)), root_kind, same_as))
            else:
                entries.append(("other", type(val).__name__, root_kind, same_as))
        return OutputSignature(tuple(entries))


def verify_graph(gm: fx.GraphModule, before: OutputSignature, pass_name: str) -> None:
    where = f"after pass '{pass_name}'"
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises plain RuntimeError/AssertionError
        raise VerificationError(f"{where}: graph.lint() failed: {exc}") from exc
    for node in gm.graph.nodes:
        if node.op in ("call_function", "placeholder", "get_attr") and "val" not in node.meta \
                and not _returns_nothing(node):
            raise VerificationError(f"{where}: node {node.format_node()} has no meta['val']")
    after = OutputSignature.of(gm)
    if len(after.entries) != len(before.entries):
        raise VerificationError(f"{where}: number of outputs changed {len(before.entries)} -> {len(after.entries)}")
    for i, (b, a) in enumerate(zip(before.entries, after.entries)):
        if a[:2] != b[:2] and b[0] != "const":
            raise VerificationError(f"{where}: output {i} changed from {b[:2]} to {a[:2]}")
        if a[2] is not None and a[2] != b[2]:
            raise VerificationError(
                f"{where}: output {i} now aliases {a[2]!r} (before: {b[2]!r}); "
                "returning an input or constant would let the caller mutate it"
            )
        if a[3] is not None and a[3] != b[3]:
            raise VerificationError(f"{where}: outputs {a[3]} and {i} now share storage (one tensor, or views of one)")


def _returns_nothing(node: fx.Node) -> bool:
    """Ops like aten._assert_scalar return no value, so capture gives them no meta['val']."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and len(target._schema.returns) == 0
