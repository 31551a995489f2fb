"""Process-wide counters of what the backend did, for tests and `fusecc cache` users to see
whether a start was warm (as torch._dynamo.utils.counters does for Dynamo):

    backend_calls        graphs Dynamo handed to the fusecc backend
    aten_traces          AOTAutograd traces that reached fusecc's compiler (0 on a warm start)
    codegen_runs         lowerings (fusion + kernel/wrapper generation, or the ATen runner)
    graph_hits / graph_misses / graph_stores / graph_uncacheable / graph_discarded
    function_hits / function_misses / function_stores / function_discarded
    function_hits_not_compilable      (compile_cache.aot_compile and the runtime's forward)
    function_guard_rejects            stored functions of the call's shape class whose guards
                                      rejected it (specialised to other sizes): compiled anew
"""

from __future__ import annotations

from collections import Counter

counters: Counter = Counter()
