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
from typing import Callable

import torch
import torch.fx as fx

from fusecc.codegen.fusion import Fusion
from fusecc.codegen.program import Program, runner_for, with_kernel_autotuning  # noqa: F401 (re-exported)
from fusecc.config import FuseccOptions
from fusecc.debug.dump import NoDump
from fusecc.graph.node_kinds import is_mutated
from fusecc.passes.pipeline import PassRecord, run_passes


@dataclass
class Lowered:
    runner: Callable                                         # boxed call
    records: list[PassRecord] = field(default_factory=list)  # fusion's, for the pass table
    seconds: dict[str, float] = field(default_factory=dict)  # "codegen", "kernel precompile"
    summary: dict[str, int] = field(default_factory=dict)    # per call: kernel launches, extern calls, fallbacks
    program: Program | None = None                            # what rebuilds `runner` (compile_cache)


def wants_triton(options: FuseccOptions, example_inputs: list) -> bool:
    if options.codegen == "triton":
        return True
    if options.codegen == "aten":
        return False
    # "auto": generated kernels for CUDA graphs. CPU graphs run as ATen: Triton reaches the CPU
    # only through its (slow) interpreter, which tests request explicitly with codegen="triton".
    return any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs)


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
