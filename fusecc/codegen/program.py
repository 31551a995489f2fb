"""What runs a lowered graph, as data (`Program`) and as the boxed call built from it (`runner_for`).

lower.py builds a Program once per compilation; compile_cache/artifact.py stores its parts and
builds the same runner from them in a later process. This module imports neither the passes nor
AOTAutograd, so loading a stored graph does not pay their import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch.fx as fx

if TYPE_CHECKING:
    from fusecc.codegen.wrapper import CompiledWrapper


@dataclass
class Program:
    """What `runner_for` turns into the boxed call, in this process or a later one: the optimized
    ATen graph (`graph`), or a wrapper's source, globals and launches (`wrapper`), plus how to run it."""
    graph: fx.GraphModule | None = None
    wrapper: "CompiledWrapper | None" = None
    autotune: bool = False
    cudagraphs: bool = False
    mutated_inputs: list[int] = field(default_factory=list)
    weight_inputs: list[bool] = field(default_factory=list)


def runner_for(program: Program) -> Callable:
    if program.graph is not None:
        return with_kernel_autotuning(make_boxed(program.graph.forward), program.autotune)
    call = with_kernel_autotuning(program.wrapper.call, program.autotune)
    if program.cudagraphs:
        from fusecc.codegen.cudagraphs import CUDAGraphRunner

        # inside the CUDA-graph runner: a replay launches nothing, so it needs no scope
        call = CUDAGraphRunner(call, mutated_inputs=program.mutated_inputs,
                               persistent_inputs=[i for i, w in enumerate(program.weight_inputs) if w])
    return call


def with_kernel_autotuning(runner: Callable, enabled: bool) -> Callable:
    """Run a compiled graph (boxed call) with the attention kernels' config search on or off, as
    the graph's `autotune` option says (off by default: a hand-picked tile config per shape class,
    no seconds of compiling and timing the alternatives on the first call; mode="max-autotune"
    turns it on)."""
    from fusecc.kernels.launch import kernel_autotuning

    def call(args):
        with kernel_autotuning(enabled):
            return runner(args)

    call._boxed_call = True
    return call


def make_boxed(f: Callable) -> Callable:
    """`f(*args)` called with one list of arguments (AOTAutograd's boxed calling convention)."""
    def call(args: list):
        return f(*args)

    call._boxed_call = True
    return call
