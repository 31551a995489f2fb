"""Code generation: fusion groups -> generated Triton kernels + a Python wrapper that runs them.

`lower(gm, options, dump, example_inputs)` is what the backend calls after the passes; it
returns the boxed callable AOTAutograd runs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from fusecc.config import FuseccOptions
from fusecc.passes.node_kinds import is_mutated


def wants_triton(options: FuseccOptions, example_inputs: list) -> bool:
    if options.codegen == "triton":
        return True
    if options.codegen == "aten":
        return False
    # "auto": generated kernels for CUDA graphs. CPU graphs run as ATen: Triton reaches the CPU
    # only through its (slow) interpreter, which tests request explicitly with codegen="triton".
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)


def with_kernel_autotuning(runner: Callable, enabled: bool) -> Callable:
    """Run a compiled graph (boxed call) with the attention kernels' config search on or off, as
    the graph's `autotune` option says (off by default: a hand-picked tile config per shape class,
    no seconds of compiling and timing the alternatives on the first call; mode="max-autotune"
    turns it on)."""
    from fusecc.kernels.attention_tile import kernel_autotuning

    def call(args):
        with kernel_autotuning(enabled):
            return runner(args)

    call._boxed_call = True
    return call


def lower(gm: fx.GraphModule, options: FuseccOptions, dump, example_inputs: list,
          weight_inputs: list[bool]) -> tuple[Callable, list]:
    """Fuse, generate kernels and the wrapper; returns (boxed callable, pass records)."""
    from fusecc.codegen.wrapper import compile_wrapper
    from fusecc.passes.fusion import Fusion
    from fusecc.passes.pipeline import run_passes

    # Before fusion: a fused kernel (call_module) that writes an input no longer shows as a write.
    mutated_inputs = [i for i, p in enumerate(gm.graph.find_nodes(op="placeholder")) if is_mutated(p)]
    fusion = Fusion()
    records = run_passes(gm, [fusion], verify=options.verify, dump=dump)
    compiled = compile_wrapper(gm, check_kernels=options.check_kernels,
                                emulate_precision_casts=options.emulate_precision_casts)
    # inside the CUDA-graph runner: a replay launches nothing, so it needs no scope
    call = with_kernel_autotuning(compiled.call, options.autotune)
    if options.cudagraphs and any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        from fusecc.codegen.cudagraphs import CUDAGraphRunner

        call = CUDAGraphRunner(call, mutated_inputs=mutated_inputs,
                               persistent_inputs=[i for i, w in enumerate(weight_inputs) if w])
    if dump is not None:
        dump.write_text("wrapper.py", compiled.source)
        for ks in compiled.kernels.values():
            dump.write_file(f"kernels/{ks.name}.py", ks.source)
        for node_name, reason in sorted(fusion.reasons.items()):
            dump.note(f"not fused: {node_name}: {reason}")
        for module_name, reason in sorted(compiled.fallbacks.items()):
            dump.note(f"group {module_name} runs as ATen ops: {reason}")
        dump.note(f"{compiled.launches_per_call} kernel launches and {compiled.extern_calls_per_call} "
                  f"extern/ATen calls per call")
        if compiled.precompiled:
            dump.note(f"{compiled.precompiled} kernels compiled in parallel before the first call "
                      f"({compiled.precompile_seconds:.2f} s)")
        dump.facts.update(kernel_launches=compiled.launches_per_call, extern_calls=compiled.extern_calls_per_call,
                          codegen_fallbacks=len(compiled.fallbacks), precompile_seconds=compiled.precompile_seconds)
    return call, records
