"""One call recorded into a CUDA graph and replayed: the capture step both CUDA-graph users share.

    captured = CapturedCall(fn, static_args, pool)   # records fn(*static_args), runs nothing
    outputs = captured.replay()                      # the same static outputs, recomputed

Two policies sit on top, and they cannot be one because only one of them knows what its inputs
mean:
- the compiler's mode="reduce-overhead" (codegen/cudagraphs.py) runs arbitrary graphs: it
  captures lazily per input signature, copies every per-call input into graph-owned buffers and
  clones the outputs (it cannot know which dimension is a batch, so it cannot pad one);
- the runtime (runtime/model_runner.py) knows its decode step: it captures once at start-up per
  batch-size bucket, largest first into one shared pool, pads a batch to its bucket with rows
  that write nothing (slot -1, context length 0) and reads the outputs before the next replay.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class CapturedCall:
    def __init__(self, fn: Callable, args: tuple | list, pool=None):
        """Record `fn(*args)` (without executing it: capture only records kernel launches).
        `args` are the buffers every replay reads; `pool` a torch.cuda.graph_pool_handle() that
        several graphs share (they never run at once), or None for a private one."""
        torch.cuda.synchronize()  # nothing in flight may be recorded by accident
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs: Any = fn(*args)

    def replay(self) -> Any:
        """Rerun the recorded kernels on the current contents of the capture-time buffers; the
        outputs are the same tensors each time, overwritten by the next replay."""
        self.graph.replay()
        return self.outputs
