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
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from fusecc.passes.base import GraphPass, PassResult

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
            later_readers = [u for u in dest.users if u not in (src, copy) and order[u] > order[src]]
            if later_readers:
                stats["skipped:old_value_read_later"] += 1
                continue
            if any(u.op == "output" for u in src.users):
                stats["skipped:result_is_output"] += 1
                continue
            with gm.graph.inserting_before(src):
                inplace = gm.graph.call_function(_INPLACE[src.target], src.args, src.kwargs)
            inplace.meta.update(src.meta)
            src.replace_all_uses_with(dest, delete_user_cb=lambda user: user is not copy)
            gm.graph.erase_node(copy)
            gm.graph.erase_node(src)
            stats[f"reinplaced:{_INPLACE[src.target]._overloadpacket.__name__}"] += 1
        if stats:
            gm.recompile()
        modified = any(k.startswith("reinplaced") for k in stats)
        return PassResult(gm, modified, stats)
