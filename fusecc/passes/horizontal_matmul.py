"""Horizontal matmul fusion: matmuls that read the same activation with constant weights become one.

Attention's q/k/v projections (and any other group of linears sharing their input) are separate
GEMMs in a traced Hugging Face model. At decode sizes each is a short, launch- and latency-bound
GEMV (measured on an H100 with cuBLAS: an output width of 1024 reads its weight at under 40% of
copy bandwidth, a width of 6144 at over 80%), so with frozen weights we concatenate them once, at
compile time, and run one GEMM:

    before:  %q = aten.mm(%x, %wq_t)                      # bf16[s0, 2048], %wq_t = permute(get_attr)
             %k = aten.mm(%x, %wk_t)                      # bf16[s0, 512]
             %v = aten.mm(%x, %wv_t)                      # bf16[s0, 512]
    after:   %w = get_attr[_hfused0]                      # bf16[3072, 2048]: wq | wk | wv
             %qkv = aten.mm(%x, aten.permute(%w, [1, 0])) # bf16[s0, 3072]
             %q = aten.clone(aten.slice(%qkv, 1, 0, 2048))       # contiguous, as before
             %k = aten.clone(aten.slice(%qkv, 1, 2048, 2560))
             %v = aten.clone(aten.slice(%qkv, 1, 2560, 3072))

`addmm` groups (q/k/v with bias, Qwen2) concatenate the biases too. The clone keeps every user
seeing the contiguous tensor it was traced with (no stride in the graph changes, so no user's
meta goes stale); a clone feeding a fused kernel costs nothing (codegen folds it into the loads).

Only constant weights are fused (`freeze=True`): concatenating parameters at run time would copy
them every call. The new constant is an extra copy of those weights (the caller's module keeps
its own), so a group whose concatenation is larger than `max_bytes` (the constant-folding limit)
is left alone: at the defaults that fuses q/k/v of Llama-3-8B (48 MiB per layer) but not its
gate/up pair (224 MiB).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.constants import constant_value, insert_constant_node
from fusecc.passes.dce import DeadCodeElimination
from fusecc.graph.node_kinds import is_view

aten = torch.ops.aten


class HorizontalMatmulFusion(GraphPass):
    name = "horizontal_matmul_fusion"
    repeat_to_fixed_point = False

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        groups: dict[tuple, list[tuple[fx.Node, torch.Tensor, torch.Tensor | None]]] = defaultdict(list)
        for node in gm.graph.nodes:
            member = _as_member(gm, node)
            if member is None:
                continue
            x, weight, bias = member
            key = (node.target, x, weight.dtype, weight.device, weight.shape[0],
                   None if bias is None else bias.dtype)
            groups[key].append((node, weight, bias))
        for (target, _, *_), members in groups.items():
            if len(members) < 2:
                continue
            # the shared input as the graph has it now: an earlier group may have fused (and
            # replaced) the matmul that computed it
            x = members[0][0].args[1 if target is aten.addmm.default else 0]
            nbytes = sum(w.numel() * w.element_size() for _, w, _ in members)
            if nbytes > self.max_bytes:
                stats["skipped:too_large"] += 1
                continue
            self._fuse(gm, target, x, members)
            stats["fused_groups"] += 1
            stats["fused_matmuls"] += len(members)
        modified = stats["fused_groups"] > 0
        if modified:
            stats["constants_freed"] = DeadCodeElimination().run(gm).stats["constants_freed"]
            gm.recompile()
        return PassResult(gm, modified, stats)

    def _fuse(self, gm: fx.GraphModule, target, x: fx.Node, members: list) -> None:
        graph = gm.graph
        first = min((m[0] for m in members), key=_position(graph))
        fake_mode = first.meta["val"].fake_mode
        weights = [w for _, w, _ in members]
        # Linear weights arrive as the transpose of a contiguous [N, K] parameter: concatenate
        # those rows (keeping the layout cuBLAS was given); anything else as a contiguous [K, N].
        transposed = all(w.stride(0) == 1 and w.stride(1) == w.shape[0] for w in weights)
        if transposed:
            value = torch.cat([w.t() for w in weights], 0)
        else:
            value = torch.cat(weights, 1).contiguous()
        fake = fake_mode.from_tensor(value, static_shapes=True)
        const = insert_constant_node(gm, "_hfused", value, fake, before=first)
        with graph.inserting_before(first):
            rhs = const
            if transposed:
                rhs = graph.call_function(aten.permute.default, (const, [1, 0]))
                rhs.meta["val"] = fake.permute(1, 0)
            if target is aten.addmm.default:
                bias_value = torch.cat([b for _, _, b in members])
                bias_fake = fake_mode.from_tensor(bias_value, static_shapes=True)
                bias = insert_constant_node(gm, "_hfused_bias", bias_value, bias_fake, before=first)
                fused = graph.call_function(aten.addmm.default, (bias, x, rhs))
                fused.meta["val"] = torch.ops.aten.addmm.default(bias_fake, x.meta["val"], rhs.meta["val"])
            else:
                fused = graph.call_function(aten.mm.default, (x, rhs))
                fused.meta["val"] = torch.ops.aten.mm.default(x.meta["val"], rhs.meta["val"])
            offset = 0
            for node, weight, _ in members:
                width = weight.shape[1]
                part = graph.call_function(aten.slice.Tensor, (fused, 1, offset, offset + width))
                part.meta["val"] = aten.slice.Tensor(fused.meta["val"], 1, offset, offset + width)
                copy = graph.call_function(aten.clone.default, (part,), {"memory_format": torch.contiguous_format})
                copy.meta["val"] = aten.clone.default(part.meta["val"], memory_format=torch.contiguous_format)
                node.replace_all_uses_with(copy)
                offset += width
        for node, _, _ in members:
            graph.erase_node(node)


def _as_member(gm: fx.GraphModule, node: fx.Node):
    """(shared input, weight value [K, N], bias value or None) if `node` is a fusable matmul."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default and len(node.args) == 2 and not node.kwargs:
        bias_node, x, w_node = None, *node.args
    elif (node.target is aten.addmm.default and len(node.args) == 3
          and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1):
        bias_node, x, w_node = node.args
    else:
        return None
    if not isinstance(x, fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    weight = _constant(gm, w_node)
    if weight is None or weight.dim() != 2:
        return None
    bias = None
    if bias_node is not None:
        bias = _constant(gm, bias_node)
        # a bias broadcast from [N] only (a [M, N] bias is per-row data, not a linear's)
        if bias is None or bias.dim() != 1 or bias.shape[0] != weight.shape[1]:
            return None
    return x, weight, bias


def _constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a constant reached through views only (no copies), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = constant_value(gm, node)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "call_function" and is_view(node) and isinstance(node.args[0], fx.Node):
        base = _constant(gm, node.args[0])
        if base is None:
            return None
        try:
            return node.target(base, *node.args[1:], **node.kwargs)
        except Exception:
            return None
    return None


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__
