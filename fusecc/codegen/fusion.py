"""Fusion: partition the ATen graph into groups that each become one generated Triton kernel.

    before:  %pow = aten.mul(%h, %h)                        # f32[2, 8, 64]
             %mean = aten.mean.dim(%pow, [-1], True)        # f32[2, 8, 1]
             %add = aten.add(%mean, 1e-6)
             %rsqrt = aten.rsqrt(%add)
             %mul = aten.mul(%h, %rsqrt)
             %out = aten.mul(%w, %mul)                      # f32[2, 8, 64]
             %v = aten.view(%out, [16, 64]);  %mm = aten.mm(%v, %wt)
    after:   %kernel_0 = call_module[kernel_0](%h, %w)      # RMSNorm in one kernel
             %out = getitem(%kernel_0, 0)
             %v = aten.view(%out, [16, 64]);  %mm = aten.mm(%v, %wt)

Groups form greedily in topological order: a fusible node joins the groups of its producers
when their iteration spaces agree (same number of elements for pointwise groups; same rows and
reduced size for reductions over the last dim, with pointwise prologues and epilogues) and the
merge creates no cycle in the dependency DAG. Views join the group of their input and are
folded into index expressions; a view whose users are all outside the group runs as an ATen
view. Matmuls, custom ops and ops without a lowering are boundaries. Every node left out of a
group is reported with the reason (`reasons`: node name -> (kind, why), kind "cycle" or "not fused")
so the dump answers "why is this op not fused?".

A KV-cache write `index_copy_(cache, dim, pos, k)` into a graph input joins the kernel computing
`k` as its last op (the kernel stores straight into the cache rows), only where that cannot
reorder an access to the cache: the kernel runs where its last op stood, so the write stays
that last op (nothing joins a kernel after its write), and nothing may touch the cache between
the kernel's first op and the write (a node there that reads a kernel output is moved after the
kernel).

Every in-place write (fused or not: `index_copy_`, `index_put_`, `copy_` into an input) orders
the other accesses to its storage: a read before it stays before it, a read after it stays
after it. Readers do not consume the write's result, so these are extra edges (`_write_order`)
in the cycle check and in the topological sort after contraction; a group whose members would
straddle a write is a cycle and is not formed.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from typing import Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from fusecc.codegen.index_math import product, shape_of
from fusecc.codegen.lowerings import classify
from fusecc.graph.node_kinds import alias_root, is_view, may_write, storage_users
from fusecc.passes.base import GraphPass, PassResult

_FUSIBLE = ("pointwise", "view", "cat", "reduction")
_INDEX_COPY = torch.ops.aten.index_copy_.default
_MATERIALISED_VIEW = "view of a materialised tensor: runs as an ATen view (no copy)"


class _Group:
    """Nodes of one future kernel and its iteration space:
    ("p", numel) for pointwise groups, ("r", rows_shape, reduced_size) for reductions."""

    def __init__(self, node: fx.Node, space: tuple, shapes: set):
        self.nodes: list[fx.Node] = [node]
        self.space = space
        self.shapes = shapes  # output shapes of the group's pointwise/cat members

    def has_compute(self) -> bool:
        return any(classify(n).kind != "view" for n in self.nodes)


def _key(shape) -> tuple:
    return tuple(sympy.expand(s) for s in shape)


def _space(node: fx.Node, kind: str) -> tuple:
    if kind == "reduction":
        src = _key(shape_of(node.args[0]))
        return ("r", src[:-1], src[-1])
    return ("p", sympy.expand(product(shape_of(node))))


def _row_shapes(space: tuple) -> set:
    """Shapes a pointwise member of a reduction kernel may have: per element or per row."""
    rows, size = space[1], space[2]
    return {rows + (size,), rows + (sympy.Integer(1),), rows}


def _merge_spaces(a: _Group, b: _Group) -> Optional[tuple]:
    """The iteration space of a kernel containing both groups, or None if they cannot share one."""
    sa, sb = a.space, b.space
    if sa[0] == "p" and sb[0] == "p":
        return sa if sympy.simplify(sa[1] - sb[1]) == 0 else None
    if sa[0] == "r" and sb[0] == "r":
        same = sa[1] == sb[1] and sa[2] == sb[2]
        return sa if same and (a.shapes | b.shapes) <= _row_shapes(sa) else None
    red = sa if sa[0] == "r" else sb
    return red if (a.shapes | b.shapes) <= _row_shapes(red) else None


class Fusion(GraphPass):
    name = "fusion"
    repeat_to_fixed_point = False

    def __init__(self, min_nodes: int = 1):
        self.min_nodes = min_nodes
        self.reasons: dict[str, tuple[str, str]] = {}  # node name -> (kind, why it is not fused)

    def run(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        after = _write_order(graph, order)
        group_of: dict[fx.Node, _Group] = {}
        self.reasons = {}
        stats: Counter = Counter()
        for node in graph.nodes:
            c = classify(node)
            if c.kind == "index_copy":
                why = _join_index_copy(node, group_of, order, after)
                if why is None:
                    stats["index_copy_fused"] += 1
                else:
                    kind = "cycle" if "cycle" in why else "not fused"
                    self.reasons[node.name] = (kind, f"runs as ATen index_copy_: {why}")
                    stats["not_fused:index_copy"] += 1
                continue
            if c.kind not in _FUSIBLE:
                if c.reason:
                    self.reasons[node.name] = ("not fused", c.reason)
                    stats[f"not_fused:{c.kind}"] += 1
                continue
            producers = []
            producer_input = {}  # id(group) -> the input of `node` it computes (named in the notes)
            for inp in node.all_input_nodes:
                g = group_of.get(inp)
                if g is not None and g not in producers:
                    if g.nodes[-1].target is _INDEX_COPY:
                        # the kernel ends with its cache write: an op joining it would run before
                        # the write is stored, though it came after it
                        self.reasons.setdefault(node.name, ("not fused", f"its producer kernel ends with the cache "
                                                                         f"write {g.nodes[-1].name}: starts a new kernel"))
                        stats["blocked:after_cache_write"] += 1
                        continue
                    producers.append(g)
                    producer_input[id(g)] = inp
            if c.kind == "view":
                if len(producers) == 1:
                    producers[0].nodes.append(node)
                    group_of[node] = producers[0]
                else:
                    self.reasons[node.name] = ("not fused", _MATERIALISED_VIEW)
                continue
            group = _Group(node, _space(node, c.kind),
                           set() if c.kind == "reduction" else {_key(shape_of(node))})
            group_of[node] = group
            for producer in producers:
                merged_space = _merge_spaces(producer, group)
                inlined = False
                if merged_space is None and _only_feeds(producer, group, node):
                    # A pointwise producer read only by this node is recomputed at its index.
                    merged_space, inlined = group.space, True
                if merged_space is None:
                    stats["blocked:iteration_space"] += 1
                    self.reasons.setdefault(node.name, ("not fused", f"iteration space {group.space} differs from "
                                                                     f"that of {producer_input[id(producer)].name}'s "
                                                                     f"group {producer.space}: starts a new kernel"))
                    continue
                candidate = producer.nodes + group.nodes
                if _creates_cycle(candidate, order, after):
                    stats["blocked:cycle"] += 1
                    self.reasons.setdefault(node.name, ("cycle", _cycle_reason(producer_input[id(producer)], producer)))
                    continue
                producer.nodes = sorted(candidate, key=order.__getitem__)
                producer.space = merged_space
                producer.shapes = group.shapes if inlined else producer.shapes | group.shapes
                for n in group.nodes:
                    group_of[n] = producer
                group = producer
        groups = []
        for g in {id(g): g for g in group_of.values()}.values():
            _drop_trailing_views(g, self.reasons)
            if g.has_compute() and len(g.nodes) >= self.min_nodes:
                groups.append(g)
            else:
                for n in g.nodes:
                    self.reasons.setdefault(n.name, ("not fused", _MATERIALISED_VIEW))
        if not groups:
            return PassResult(gm, False, stats)
        groups.sort(key=lambda g: order[g.nodes[0]])
        partitions = [sorted(g.nodes, key=order.__getitem__) for g in groups]
        stats["kernels"] = len(groups)
        stats["nodes_fused"] = sum(len(g.nodes) for g in groups)
        stats["reduction_kernels"] = sum(1 for g in groups if g.space[0] == "r")
        _contract(gm, partitions, prefix="kernel_", after=after)
        gm.recompile()
        return PassResult(gm, True, stats)


def _join_index_copy(node: fx.Node, group_of: dict, order: dict, after: dict) -> Optional[str]:
    """Add `dest.index_copy_(dim, index, src)` to the kernel computing `src`; else why not."""
    dest, _dim, index, src = node.args
    if dest.op != "placeholder":
        return "the destination is not a graph input"
    if node.users:
        return "its result is read"
    group = group_of.get(src)
    if group is None:
        return "its source is not computed by a generated kernel"
    if group.space[0] != "p" or sympy.simplify(group.space[1] - product(shape_of(src))) != 0:
        return "its source is not over the whole iteration space of a pointwise kernel"
    if group_of.get(index) is group:
        return "its index is computed by the same kernel"
    first = min(order[n] for n in group.nodes)
    members = set(group.nodes)
    for accessor in _accessors(dest):
        if accessor is node:
            continue
        if accessor in members:
            return "the kernel computing its source reads the destination"
        if first < order[accessor] < order[node]:
            return f"{accessor.name} touches the destination between the kernel's first op and the write"
    if _creates_cycle(group.nodes + [node], order, after):
        return _cycle_reason(src, group)
    group.nodes.append(node)
    group_of[node] = group
    return None


def _cycle_reason(producer: fx.Node, group: _Group) -> str:
    """Name the producer, and the path back, so the dump says which fusion was refused."""
    first, last = group.nodes[0].name, group.nodes[-1].name
    span = first if first == last else f"{first} .. {last}"
    return (f"fusing with the group of its producer {producer.name} ({span}) would create a cycle: another path "
            f"from that group to this node leaves the group (through another op, or an in-place write's order)")


def _only_feeds(producer: _Group, group: _Group, node: fx.Node) -> bool:
    """True if `producer` is pointwise and nothing outside it reads its values except `node`'s group."""
    if producer.space[0] != "p":
        return False
    inside = set(producer.nodes) | set(group.nodes) | {node}
    return all(user in inside for n in producer.nodes for user in n.users)


def _drop_trailing_views(group: _Group, reasons: dict) -> None:
    """Views whose users are all outside the group are evaluated as ATen views instead."""
    changed = True
    while changed:
        changed = False
        members = set(group.nodes)
        for n in list(group.nodes):
            if classify(n).kind == "view" and not any(u in members for u in n.users):
                group.nodes.remove(n)
                reasons[n.name] = ("not fused", "view read only outside its group: runs as an ATen view (no copy)")
                changed = True


def _accessors(node: fx.Node) -> set[fx.Node]:
    """Who reads or writes the storage `node` lives in (making a view of it touches no data)."""
    return {user for user in storage_users(node) if not is_view(user)}


def _write_order(graph: fx.Graph, order: dict) -> dict[fx.Node, list[fx.Node]]:
    """node -> the nodes that must run before it beyond its data inputs: around every op that may
    write a tensor in place (a KV-cache `index_copy_`, `copy_` into an input, ...), each other
    access to that storage keeps its side of the write. Readers of a buffer do not take the
    write's output as an input, so without these edges a kernel placed where its last op stood,
    or the topological sort after contraction, could move a read across the write."""
    before: dict[fx.Node, list[fx.Node]] = {}
    for writer in graph.nodes:
        if not may_write(writer):
            continue
        roots = {alias_root(inp) for inp in writer.all_input_nodes}
        for root in roots:
            for accessor in _accessors(root):
                if accessor is writer:
                    continue
                if order[accessor] < order[writer]:
                    before.setdefault(writer, []).append(accessor)
                else:
                    before.setdefault(accessor, []).append(writer)
    return before


def _creates_cycle(nodes: list[fx.Node], order: dict, after: dict) -> bool:
    """Would contracting `nodes` into one kernel make the dependency graph cyclic?

    Builds the DAG of everything upstream of the members back to the earliest member (nothing
    earlier can lie on a member -> outside -> member path), over data inputs and the ordering
    around in-place writes (`after`, from _write_order), contracts the members into one vertex,
    and asks networkx whether it is still acyclic."""
    members = set(nodes)
    lowest = min(order[n] for n in nodes)
    dag = nx.DiGraph()
    vertex = lambda n: "kernel" if n in members else n  # noqa: E731
    stack, seen = list(members), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for inp in list(current.all_input_nodes) + after.get(current, []):
            if order[inp] < lowest:
                continue
            if vertex(inp) != vertex(current):
                dag.add_edge(vertex(inp), vertex(current))
            stack.append(inp)
    return not nx.is_directed_acyclic_graph(dag)


def _contract(gm: fx.GraphModule, partitions: list[list[fx.Node]], prefix: str, after: dict) -> None:
    """Replace each partition (nodes in graph order) by a call_module of its subgraph, placed where
    its last node stood, with one getitem per value read outside it (a partition of writes only
    has none), then restore a topological order — data inputs and `after` (the ordering around
    in-place writes, see _write_order) — that moves as few nodes as possible.

    (torch's fuse_by_partitions does the same, but before torch 2.13 it places the call after the
    last *output* and fails on a partition without outputs.)"""
    graph = gm.graph
    kernel_of: dict[fx.Node, fx.Node] = {}
    for index, nodes in enumerate(partitions):
        name = f"{prefix}{index}"
        sub, inputs, outputs = _lift(gm, nodes, name)
        gm.add_submodule(name, sub)
        with graph.inserting_after(nodes[-1]):
            call = graph.call_module(name, args=inputs)
        call.meta["val"] = tuple(out.meta.get("val") for out in outputs)
        anchor = call
        for i, out in enumerate(outputs):
            with graph.inserting_after(anchor):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = out.meta.get("val")
            out.replace_all_uses_with(item)
            anchor = item
        for node in nodes:
            kernel_of[node] = call
        for node in reversed(nodes):
            graph.erase_node(node)
    must_follow: dict[fx.Node, set[fx.Node]] = {}
    for node, preds in after.items():
        here = kernel_of.get(node, node)
        for pred in preds:
            there = kernel_of.get(pred, pred)
            if there is not here:
                must_follow.setdefault(here, set()).add(there)
    _stable_topological_sort(graph, must_follow)
    graph.lint()


def _lift(gm: fx.GraphModule, nodes: list[fx.Node], name: str):
    """(module running `nodes` and returning a tuple of the values read outside them, its inputs
    in gm, those outputs in gm). As torch's fuse_as_graphmodule, minus its cycle check (ours ran
    already) and with a lazy module: a kernel's group is compiled to Python only if it runs as
    ATen; a model has hundreds of groups and codegen reads just their graphs."""
    members = set(nodes)
    subgraph = fx.Graph()
    placeholder_of: dict[fx.Node, fx.Node] = {}
    copy_of: dict[fx.Node, fx.Node] = {}

    def remap(x: fx.Node) -> fx.Node:
        if x in members:
            return copy_of[x]
        if x not in placeholder_of:
            placeholder = subgraph.placeholder(x.name, type_expr=x.type)
            placeholder.meta = dict(x.meta)
            placeholder_of[x] = placeholder
        return placeholder_of[x]

    for node in nodes:
        copy_of[node] = subgraph.node_copy(node, remap)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    subgraph.output(tuple(copy_of[n] for n in outputs))
    return _LazyGraphModule(gm, subgraph, class_name=name), tuple(placeholder_of), tuple(outputs)


def _stable_topological_sort(graph: fx.Graph, must_follow: dict[fx.Node, set[fx.Node]]) -> None:
    """Kahn's algorithm taking the earliest ready node first: nodes already in a valid place stay.
    A node waits for its data inputs and for the nodes `must_follow[node]` names."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    successors: dict[fx.Node, list[fx.Node]] = {n: list(n.users) for n in graph.nodes}
    waiting = {n: len(n.all_input_nodes) for n in graph.nodes}
    for node, preds in must_follow.items():
        waiting[node] += len(preds)
        for pred in preds:
            successors[pred].append(node)
    ready = [(position[n], n) for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for successor in successors[node]:
            waiting[successor] -= 1
            if waiting[successor] == 0:
                heapq.heappush(ready, (position[successor], successor))
    if len(ordered) != len(position):
        raise RuntimeError("fusion produced a cyclic graph")  # the cycle check should make this impossible
    previous = ordered[0]
    for node in ordered[1:]:
        if previous.next is not node:
            previous.append(node)
        previous = node
