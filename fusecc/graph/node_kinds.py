"""Which nodes a pass may remove, merge, reorder or evaluate early.

One place for these questions so that every pass answers them the same way:
- impure: mutates something, asserts, or is otherwise observable — never removed or merged;
- random: draws from an RNG — never merged (two draws differ) nor folded;
- view: returns an alias of an input — matters for aliasing checks and folding;
- collective: a functional collective (`_c10d_functional.all_reduce`, `wait_tensor`, ...) — impure:
  every rank must issue the same collectives in the same order, so none is removed (even when
  its result is unused), merged with a twin, folded or moved; it does not write its inputs.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops whose schema is not marked mutable but whose effect is observable.
_SIDE_EFFECT_OPS = {
    aten._assert_async.default,
    aten._assert_async.msg,
    aten._assert_scalar.default,
    aten.sym_constrain_range.default,
    aten.sym_constrain_range_for_size.default,
    aten._print.default,
}


def is_op_overload(target) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def is_random(node: fx.Node) -> bool:
    target = node.target
    if is_op_overload(target):
        return torch.Tag.nondeterministic_seeded in target.tags
    return False


_COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "namespace", None) in _COLLECTIVE_NAMESPACES


def is_impure(node: fx.Node) -> bool:
    """True if removing, merging or moving the node could change observable behaviour."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op != "call_function":
        # call_module / call_method: we do not know what they do.
        return node.op != "get_attr"
    target = node.target
    if target in _SIDE_EFFECT_OPS or is_collective(node):
        return True
    if is_op_overload(target):
        if target._schema.is_mutable:
            return True
        return False
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    return node.is_impure()


def may_write(node: fx.Node) -> bool:
    """True if the node may write to a tensor: impure calls other than asserts and prints."""
    return (node.op == "call_function" and is_impure(node) and node.target not in _SIDE_EFFECT_OPS
            and not is_collective(node))


def is_pure(node: fx.Node) -> bool:
    """Deterministic and side-effect free: may be merged with an identical twin or folded."""
    return not is_impure(node) and not is_random(node)


def is_view(node: fx.Node) -> bool:
    """A view op, or one result of a multi-output view op (split, unbind, chunk, tensor_split:
    the op returns a list of views that the graph reads through operator.getitem)."""
    target = node.target
    if node.op != "call_function":
        return False
    if target is operator.getitem:
        source = node.args[0] if node.args else None
        return isinstance(source, fx.Node) and is_view(source)
    return is_op_overload(target) and bool(target.is_view)


_AUTO_FUNCTIONALIZED = tuple(getattr(torch.ops.higher_order, name) for name in ("auto_functionalized",
                                                                               "auto_functionalized_v2")
                             if hasattr(torch.ops.higher_order, name))


def written_args(node: fx.Node) -> "list[fx.Node] | None":
    """The tensor arguments a writing op writes, from its schema's alias annotations (`Tensor(a!)`);
    None where that is not known (a Python callable, a higher-order op): assume it writes anything."""
    target = node.target
    if node.op == "call_function" and target in _AUTO_FUNCTIONALIZED:
        # a functionalized mutation (reinplaced later): count every tensor it reads as written
        return list(node.all_input_nodes)
    if node.op != "call_function" or not is_op_overload(target):
        return None
    written = []
    for position, argument in enumerate(target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        written += [v for v in values if isinstance(v, fx.Node)]
    return written


def alias_root(node: fx.Node) -> fx.Node:
    """Follow view ops back to the node that owns the storage."""
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def feeds_output(node: fx.Node) -> bool:
    """True if the node's value (or a view of it) is returned by the graph."""
    stack = [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            if user.op == "output":
                return True
            if is_view(user):
                stack.append(user)
    return False


def storage_users(node: fx.Node):
    """Every user of the storage `node` lives in: users of its alias root and of any view of that
    root, views included (a node using several of them comes once per use)."""
    stack, seen = [alias_root(node)], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            yield user
            if is_view(user):
                stack.append(user)


def is_mutated(node: fx.Node) -> bool:
    """True if the storage `node` lives in (its alias root, or any view of that root) is
    written by some op in the graph (conservatively: used by any call that may write)."""
    return any(may_write(user) for user in storage_users(node))


def cast_dtype(node) -> "torch.dtype | None":
    """The target dtype if `node` is a pure dtype conversion (`convert_element_type`, or a
    `_to_copy` that keeps device, layout and memory format and neither pins nor is non-blocking)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is torch.ops.prims.convert_element_type.default:
        return node.args[1]
    if node.target is not aten._to_copy.default or "dtype" not in node.kwargs or len(node.args) != 1:
        return None
    kw = node.kwargs
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if src is None or kw.get("device", src.device) != src.device or kw.get("layout", torch.strided) != torch.strided:
        return None
    if kw.get("memory_format") not in (None, torch.preserve_format) or kw.get("non_blocking") or kw.get("pin_memory"):
        return None
    return kw["dtype"]
