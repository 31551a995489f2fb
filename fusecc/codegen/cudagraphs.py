"""mode="reduce-overhead": replay the wrapper from a CUDA graph.

One graph per input signature (shapes, strides, dtypes): the first call of a signature runs
normally (warm-up), the second records a graph, later calls replay it; a new sequence length
records a new graph. Every call executes the compiled function exactly once, as its inputs may
be mutated (a KV cache). Per-call inputs (token ids, positions) are copied into graph-owned
buffers; weights and mutated inputs (KV caches) are read in place, and a call that passes them as
other tensors than at capture runs without the graph. Outputs are cloned, because the next
replay overwrites the static outputs. The capture itself is fusecc/cuda_graph.py's, shared with
the runtime's decode graphs (which pad batches instead of keying on signatures: see there).
"""

from __future__ import annotations

from typing import Callable

import torch

from fusecc.cuda_graph import CapturedCall


class _Captured:
    def __init__(self, call: CapturedCall, static_inputs: list):
        self.call = call
        self.static_inputs = static_inputs


class CUDAGraphRunner:
    _boxed_call = True

    def __init__(self, call: Callable, mutated_inputs: list[int], persistent_inputs: list[int]):
        self.call = call
        self.warmed_up: set[tuple] = set()
        self.mutated_inputs = set(mutated_inputs)
        # Weights and mutated buffers (KV caches) are read in place; everything else is copied
        # into a graph-owned buffer (never into the caller's tensor).
        self.persistent_inputs = set(persistent_inputs) | self.mutated_inputs
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = None
        # Argument positions by role, fixed on the first call.
        self._int_args: list[int] | None = None
        self._volatile: list[int] = []
        self._persistent: list[int] = []

    def _signature(self, args: list) -> tuple:
        """Dynamo already guards every static size, so a graph is identified by the integer
        (SymInt) arguments and the shapes of the per-call tensors alone."""
        if self._int_args is None:
            self._int_args = [i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
            self._volatile = [i for i, a in enumerate(args)
                              if isinstance(a, torch.Tensor) and i not in self.persistent_inputs]
            self._persistent = [i for i, a in enumerate(args)
                                if isinstance(a, torch.Tensor) and i in self.persistent_inputs]
        return tuple(args[i] for i in self._int_args) + tuple(args[i].shape for i in self._volatile)

    def __call__(self, args: list):
        key = self._signature(args)
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.warmed_up:
                # First call of a signature runs normally: it is the warm-up (lazy cuBLAS and
                # Triton initialisation must not happen during capture), and it must execute
                # exactly once, because the graph may mutate its inputs (KV caches).
                self.warmed_up.add(key)
                return self.call(args)
            captured = self._capture(list(args))
            self.graphs[key] = captured
        static = captured.static_inputs
        for i in self._persistent:
            if args[i] is not static[i] and args[i].data_ptr() != static[i].data_ptr():
                # A weight or cache passed as another tensor than at capture: the graph would
                # read (and write) the old one, so this call runs without the graph.
                return self.call(args)
        for i in self._volatile:
            static[i].copy_(args[i])
        static_outputs = captured.call.replay()
        args.clear()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in static_outputs)

    def _capture(self, args: list) -> _Captured:
        """Record one call into a CUDA graph without executing it; the caller replays it."""
        static_inputs = [a if i in self.persistent_inputs or not isinstance(a, torch.Tensor) else a.clone()
                         for i, a in enumerate(args)]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # boxed call: the callee clears its argument list, so it gets a copy of the static one
        return _Captured(CapturedCall(lambda: self.call(list(static_inputs)), (), self.pool), static_inputs)
