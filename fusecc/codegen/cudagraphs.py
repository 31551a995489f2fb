"""mode="reduce-overhead": replay the wrapper from a CUDA graph.

One graph per input signature (shapes, strides, dtypes): the first call of a signature runs
normally (warm-up), the second records a graph, later calls replay it; a new sequence length
records a new graph. Every call executes the compiled function exactly once, as its inputs may
be mutated (a KV cache). Inputs are copied into the graph's static buffers unless they already are those buffers
(weights and KV caches passed every call are the same tensors, so they cost nothing); inputs the
graph mutates are copied back when they were not. Outputs are cloned, because the next replay
overwrites the static outputs.
"""

from __future__ import annotations

from typing import Callable

import torch


class _Captured:
    def __init__(self, graph, static_inputs, static_outputs):
        self.graph = graph
        self.static_inputs = static_inputs
        self.static_outputs = static_outputs


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

    @staticmethod
    def _signature(args: list) -> tuple:
        sig = []
        for a in args:
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.stride(), a.dtype, a.device))
            else:
                sig.append(a)  # SymInt values: a new value is a new graph
        return tuple(sig)

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
        for static, real in zip(captured.static_inputs, args):
            if isinstance(real, torch.Tensor) and static.data_ptr() != real.data_ptr():
                static.copy_(real)
        captured.graph.replay()
        for i in self.mutated_inputs:
            real, static = args[i], captured.static_inputs[i]
            if isinstance(real, torch.Tensor) and static.data_ptr() != real.data_ptr():
                real.copy_(static)
        args.clear()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in captured.static_outputs)

    def _capture(self, args: list) -> _Captured:
        """Record one call into a CUDA graph without executing it; the caller replays it."""
        static_inputs = [a if i in self.persistent_inputs or not isinstance(a, torch.Tensor) else a.clone()
                         for i, a in enumerate(args)]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_outputs = self.call(list(static_inputs))
        return _Captured(graph, static_inputs, static_outputs)
