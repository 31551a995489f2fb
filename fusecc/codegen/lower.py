"""Lowering the optimized ATen graph to what runs: fusion groups -> generated Triton kernels + a
Python wrapper (optionally replayed from a CUDA graph), or the ATen graph itself.

    lowered = lower(gm, options, dump, fake_inputs, weight_inputs)
    lowered.runner(args)      # boxed call

`lowered.records` are the fusion pass's records (for the report's pass table), `seconds` the
stage's time split into "codegen" and "kernel precompile", `summary` what one call launches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import make_boxed_func

from fusecc.codegen.fusion import Fusion
from fusecc.config import FuseccOptions
from fusecc.debug.dump import NoDump
from fusecc.graph.node_kinds import is_mutated
from fusecc.passes.pipeline import PassRecord, run_passes

if TYPE_CHECKING:
    from fusecc.codegen.wrapper import CompiledWrapper


@dataclass
class Lowered:
    runner: Callable                                         # boxed call
    records: list[PassRecord] = field(default_factory=list)  # fusion's, for the pass table
    seconds: dict[str, float] = field(default_factory=dict)  # "codegen", "kernel precompile"
    summary: dict[str, int] = field(default_factory=dict)    # per call: kernel launches, extern calls, fallbacks
    program: "Program | None" = None                          # what rebuilds `runner` (compile_cache)


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
        return with_kernel_autotuning(make_boxed_func(program.graph.forward), program.autotune)
    call = with_kernel_autotuning(program.wrapper.call, program.autotune)
    if program.cudagraphs:
        from fusecc.codegen.cudagraphs import CUDAGraphRunner

        # inside the CUDA-graph runner: a replay launches nothing, so it needs no scope
        call = CUDAGraphRunner(call, mutated_inputs=program.mutated_inputs,
                               persistent_inputs=[i for i, w in enumerate(program.weight_inputs) if w])
    return call


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


def lower(gm: fx.GraphModule, options: FuseccOptions, dump: NoDump, example_inputs: list,
          weight_inputs: list[bool]) -> Lowered:
    start = time.perf_counter()
    if not wants_triton(options, example_inputs):
        program = Program(graph=gm, autotune=options.autotune)
        return Lowered(runner_for(program), seconds={"codegen": time.perf_counter() - start, "kernel precompile": 0.0},
                       program=program)
    from fusecc.codegen.wrapper import compile_wrapper

    # Before fusion: a fused kernel (call_module) that writes an input no longer shows as a write.
    mutated_inputs = [i for i, p in enumerate(gm.graph.find_nodes(op="placeholder")) if is_mutated(p)]
    fusion = Fusion()
    records = run_passes(gm, [fusion], verify=options.verify, dump=dump)
    compiled = compile_wrapper(gm, check_kernels=options.check_kernels,
                               emulate_precision_casts=options.emulate_precision_casts)
    cudagraphs = options.cudagraphs and any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    program = Program(wrapper=compiled, autotune=options.autotune, cudagraphs=cudagraphs,
                      mutated_inputs=mutated_inputs, weight_inputs=list(weight_inputs))
    call = runner_for(program)
    dump.write_text("wrapper.py", compiled.source)
    for group_name, ks in compiled.kernels.items():
        dump.write_file(f"kernels/{group_name}.py", f"# {group_name}: Triton kernel {ks.name}\n{ks.source}")
    for node_name, (kind, reason) in fusion.reasons.items():
        dump.note(f"not fused: {node_name}: {reason}", kind="cycle" if kind == "cycle" else "not fused")
    for module_name, reason in compiled.fallbacks.items():
        dump.note(f"group {module_name} runs as ATen ops: {reason}", kind="fallback")
    dump.note(f"{compiled.launches_per_call} kernel launches and {compiled.extern_calls_per_call} "
              f"extern/ATen calls per call")
    if compiled.precompiled:
        dump.note(f"{compiled.precompiled} kernels compiled in parallel before the first call "
                  f"({compiled.precompile_seconds:.2f} s)")
    seconds = {"codegen": time.perf_counter() - start - compiled.precompile_seconds,
               "kernel precompile": compiled.precompile_seconds}
    summary = {"kernel_launches": compiled.launches_per_call, "extern_calls": compiled.extern_calls_per_call,
               "codegen_fallbacks": len(compiled.fallbacks)}
    return Lowered(call, records, seconds, summary, program)
