"""Re-inplacing of functionalized input mutations (static KV caches).

AOTAutograd functionalizes `cache.index_copy_(2, pos, k)` into an out-of-place `index_copy`
that copies the whole cache, followed by a `copy_` back into the graph input:

    before:  %new = aten.index_copy(%cache, 2, %pos, %k)    # f16[1, 8, 4096, 64]: full copy
             ...reads of %new...
             %_ = aten.copy_(%cache, %new)                  # second full copy
    after:   %_ = aten.index_copy_(%cache, 2, %pos, %k)     # writes only the new rows
             ...reads of %cache...

Safe only when nothing reads the old value of `%cache` after the scatter: every other reader of
the placeholder must come earlier in the graph. The same holds for index_put and the
slice/select scatters that `cache[:, :, pos] = k` functionalizes into.

Custom ops that mutate their inputs (the paged KV-cache write) are functionalized into
`auto_functionalized_v2`, which clones every mutated base; the same rule turns them back:

    before:  %af = auto_functionalized_v2(fusecc.write_kv_cache, k=%k, v=%v, slot_mapping=%s,
                                          _k_cache_base_index=0, _v_cache_base_index=1, _all_bases=[%kc, %vc])
             %kc_new = getitem(%af, 1) ...reads of %kc_new...;  copy_(%kc, %kc_new)   # same for %vc
    after:   fusecc.write_kv_cache(%k, %v, %kc, %vc, %s)                               # in place, no clone
             ...reads of %kc...
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult
from fusecc.graph.node_kinds import feeds_output, is_view, storage_users
from fusecc.graph.op_counts import op_name

aten = torch.ops.aten

_INPLACE = {
    aten.index_copy.default: aten.index_copy_.default,
    aten.index_put.default: aten.index_put_.default,
}


class Reinplace(GraphPass):
    name = "reinplace"
    repeat_to_fixed_point = False

    def run(self, gm: fx.GraphModule) -> PassResult:
        stats: Counter = Counter()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for copy in list(gm.graph.nodes):
            if copy.target is not aten.copy_.default:
                continue
            dest, src = copy.args[0], copy.args[1]
            if dest.op != "placeholder" or not isinstance(src, fx.Node) or src.target not in _INPLACE:
                continue
            if src.args[0] is not dest:
                continue
            # readers of the old value: users of the input or of any view of it (a slice taken
            # before the scatter and read after it sees the old rows only while it is functional)
            later_readers = [u for u in storage_users(dest)
                             if u not in (src, copy) and not is_view(u) and order[u] > order[src]]
            if later_readers:
                stats["skipped:old_value_read_later"] += 1
                continue
            if copy.users or feeds_output(src):
                # the new value is returned (directly, through a view, or as copy_'s result):
                # in place, the output would be the input itself, a new alias
                stats["skipped:result_is_output"] += 1
                continue
            with gm.graph.inserting_before(src):
                inplace = gm.graph.call_function(_INPLACE[src.target], src.args, src.kwargs)
            inplace.meta.update(src.meta)
            src.replace_all_uses_with(dest, delete_user_cb=lambda user: user is not copy)
            gm.graph.erase_node(copy)
            gm.graph.erase_node(src)
            stats[f"reinplaced:{op_name(_INPLACE[src.target])}"] += 1
        for node in list(gm.graph.nodes):
            if node.target is _AUTO_FUNCTIONALIZED_V2:
                stats[_reinplace_auto_functionalized(gm, node, order)] += 1
        if stats:
            gm.recompile()
        modified = any(k.startswith("reinplaced") for k in stats)
        return PassResult(gm, modified, stats)


_AUTO_FUNCTIONALIZED_V2 = getattr(torch.ops.higher_order, "auto_functionalized_v2", None)


def _reinplace_auto_functionalized(gm: fx.GraphModule, node: fx.Node, order: dict) -> str:
    """Rewrite one auto_functionalized_v2 whose bases are graph inputs mutated exactly in place
    (each mutable argument IS a base, not a view of one) into the mutating op; returns a stat key."""
    op, kwargs = node.args[0], dict(node.kwargs)
    if not isinstance(op, torch._ops.OpOverload):
        return "skipped:auto_functionalized_not_an_op"
    bases = list(kwargs.pop("_all_bases", []))
    if not bases or any(not isinstance(b, fx.Node) or b.op != "placeholder" for b in bases):
        return "skipped:auto_functionalized_base_not_input"
    schema = op._schema
    call_kwargs = {}
    for arg in schema.arguments:
        mutable = arg.alias_info is not None and arg.alias_info.is_write
        if mutable:
            index = kwargs.get(f"_{arg.name}_base_index")
            if not isinstance(index, int) or any(k.startswith(f"_{arg.name}_") and not k.endswith("_base_index")
                                                 for k in kwargs):
                return "skipped:auto_functionalized_view_of_base"
            call_kwargs[arg.name] = bases[index]
        elif arg.name in kwargs:
            call_kwargs[arg.name] = kwargs[arg.name]
    num_outputs = len(schema.returns) if len(schema.returns) > 1 else 1
    copies, new_values = [], {}
    for user in node.users:
        if user.target is not operator.getitem:
            return "skipped:auto_functionalized_untupled_use"
        i = user.args[1] - num_outputs
        if i < 0:
            if user.users:
                return "skipped:auto_functionalized_result_used"
            continue
        new_values[user] = bases[i]
        for reader in user.users:
            if reader.target is aten.copy_.default and reader.args[0] is bases[i] and reader.args[1] is user:
                if reader.users:  # copy_'s result (the input itself) is returned
                    return "skipped:result_is_output"
                copies.append(reader)
        if feeds_output(user):
            # the new value is returned, directly or through a view: in place, the output would
            # be the input itself, a new alias
            return "skipped:result_is_output"
    if len(copies) != len(set(bases)):
        return "skipped:auto_functionalized_no_copy_back"
    for base in bases:
        if any(u is not node and u not in copies and not is_view(u) and order[u] > order[node]
               for u in storage_users(base)):
            return "skipped:old_value_read_later"
    with gm.graph.inserting_before(node):
        inplace = gm.graph.call_function(op, (), call_kwargs)
    inplace.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
    inplace.meta["val"] = None  # the op returns nothing; its effect is on the bases
    for copy in copies:
        gm.graph.erase_node(copy)
    for getitem in list(node.users):
        if getitem in new_values:
            getitem.replace_all_uses_with(new_values[getitem])
        gm.graph.erase_node(getitem)
    gm.graph.erase_node(node)
    return f"reinplaced:{op_name(op)}"
