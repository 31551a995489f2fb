"""The torch.compile entry point: capture -> passes -> (codegen) -> callable.

Registered under the `torch_dynamo_backends` entry-point group, so

    torch.compile(model, backend="fusecc", mode=..., options={...})

works without importing fusecc first. See config.py for the options.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx._lazy_graph_module import _LazyGraphModule

from fusecc.codegen import lower, wants_triton, with_kernel_autotuning
from fusecc.capture import capture_aten, keep_sdpa_whole
from fusecc.config import FuseccOptions
from fusecc.debug.dump import GraphDump
from fusecc.freeze import FrozenWeightsCheck, freeze_weights, is_weight_input, unfrozen_copy
from fusecc.passes import build_pipeline, run_passes
from fusecc.passes.pipeline import count_ops, op_histogram


def fusecc_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    mode = kwargs.pop("mode", None)
    options_arg = kwargs.pop("options", None)
    if kwargs:
        raise TypeError(f"fusecc backend got unexpected arguments {sorted(kwargs)}; use options={{...}}")
    options = FuseccOptions.from_sources(mode=mode, options=options_arg)
    build_pipeline(options)  # a bad disable_passes is the caller's error, not a compile failure to fall back from
    _check_codegen_device(options, example_inputs)

    start = time.perf_counter()
    dump = GraphDump.create(options.dump_dir)
    if dump is not None:
        dump.write_graph("dynamo", gm)

    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn(
            "fusecc compiles inference graphs only; this graph needs autograd (grad mode is on and an input "
            "requires grad), so it runs unoptimized. Wrap the call in torch.no_grad() or torch.inference_mode().",
            stacklevel=2,
        )
        if dump is not None:
            dump.note("needs autograd (grad mode on, an input requires grad): runs unoptimized")
            _write_unoptimized_report(dump, gm, example_inputs, options, start)
        return gm.forward

    weight_flags = [
        is_weight_input(node, ex)
        for node, ex in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
    ]
    try:
        num_sdpa = keep_sdpa_whole(gm)
        compiler = InferenceCompiler(options, dump, list(example_inputs), weight_flags, num_sdpa)
        return capture_aten(gm, list(example_inputs), compiler)
    except Exception as exc:
        if _is_dynamo_control_flow(exc):
            # Not a failure: Dynamo asks to re-trace the frame (e.g. to specialize a float
            # scalar) and will call us again with a new graph. Swallowing it would run the
            # graph eagerly for good.
            if dump is not None:
                dump.discard()
            raise
        if options.strict:
            raise
        warnings.warn(f"fusecc failed to compile a graph and runs it unoptimized instead: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)
        if dump is not None:
            dump.note(f"compilation failed, graph runs eagerly: {type(exc).__name__}: {exc}")
            dump.write_text("error.txt", f"{type(exc).__name__}: {exc}\n")
            _write_unoptimized_report(dump, gm, example_inputs, options, start)
        return gm.forward


def _check_codegen_device(options: FuseccOptions, example_inputs: list) -> None:
    # Triton reaches CPU tensors only through its interpreter, which must be on before kernels are
    # defined; otherwise the first call fails deep inside Triton ("0 active drivers")
    cpu = any(isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 0 for x in example_inputs)
    if options.codegen == "triton" and cpu and not _triton_has_a_driver():
        raise ValueError("fusecc: option codegen='triton' on CPU tensors needs Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before fusecc is imported); on CPU use codegen='auto' or 'aten'")


def _triton_has_a_driver() -> bool:
    """The interpreter, a GPU, or a stand-in driver that only compiles (tests/kernels/hopper_compile_check.py)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        from triton.runtime import driver

        driver.active.get_current_target()
        return True
    except Exception:  # "0 active drivers": no GPU and no interpreter
        return False


def _write_unoptimized_report(dump, gm: fx.GraphModule, example_inputs: list, options: FuseccOptions,
                              start: float) -> None:
    """The report of a graph that runs as Dynamo captured it, so that `fusecc dump` lists it too."""
    hist = op_histogram(gm)
    dump.write_report({
        "graph": dump.folder.name,
        "status": "unoptimized",
        "compile_seconds": time.perf_counter() - start,
        "num_inputs": len(example_inputs),
        "num_frozen": 0,
        "num_sdpa_kept_whole": 0,
        "ops_aten": "-",
        "ops_final": count_ops(gm),
        "options": _options_summary(options),
        "passes": [],
        "op_histogram_aten": {},
        "op_histogram_final": dict(hist),
    })


def _is_dynamo_control_flow(exc: BaseException) -> bool:
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.RestartAnalysis, dynamo_exc.ShortenTraceback))


class InferenceCompiler:
    """Called by AOTAutograd with the ATen inference graph; returns what runs it."""

    def __init__(self, options: FuseccOptions, dump, dynamo_inputs: list, weight_flags: list, num_sdpa: int):
        self.options = options
        self.dump = dump
        self.dynamo_inputs = dynamo_inputs
        self.weight_flags = weight_flags
        self.num_sdpa = num_sdpa

    def __call__(self, aten_gm: fx.GraphModule, fake_inputs: list) -> Callable:
        # AOTAutograd calls us inside its fake mode; freezing and folding handle real tensors.
        with unset_fake_temporarily():
            return self._compile(aten_gm, fake_inputs)

    def _compile(self, aten_gm: fx.GraphModule, fake_inputs: list) -> Callable:
        start = time.perf_counter()
        options, dump = self.options, self.dump
        # Passes call gm.recompile() after each change; regenerating the Python code of a graph of
        # thousands of nodes is ~0.1 s each time. A lazy graph module regenerates it only when
        # something reads the code or runs forward (the dump, the ATen runner), once.
        aten_gm = _LazyGraphModule.from_graphmodule(aten_gm)
        dump_seconds_before = dump.seconds if dump is not None else 0.0
        if dump is not None:
            dump.write_graph("aten", aten_gm)
        ops_aten, hist_aten = count_ops(aten_gm), op_histogram(aten_gm)
        frozen = {}
        params_flat = _aot_params_flat()
        weight_inputs = [True] * len(params_flat) + self.weight_flags
        if len(weight_inputs) != len(fake_inputs):
            weight_inputs = [False] * len(fake_inputs)  # cannot map inputs: treat none as weights
        marks = [time.perf_counter()]
        if options.freeze:
            unfrozen = unfrozen_copy(aten_gm)
            frozen = freeze_weights(aten_gm, list(params_flat) + self.dynamo_inputs, weight_inputs, dump)
        marks.append(time.perf_counter())
        records = run_passes(aten_gm, build_pipeline(options), max_rounds=options.max_pass_rounds,
                             verify=options.verify, dump=dump)
        marks.append(time.perf_counter())
        if wants_triton(options, fake_inputs):
            runner, codegen_records = lower(aten_gm, options, dump, fake_inputs, weight_inputs)
            records += codegen_records
        else:
            runner = with_kernel_autotuning(make_boxed_func(aten_gm.forward), options.autotune)
        if frozen:
            runner = FrozenWeightsCheck(runner, frozen, unfrozen, options.strict)
        marks.append(time.perf_counter())
        seconds = marks[-1] - start
        if dump is not None:
            precompile = dump.facts.get("precompile_seconds", 0.0)
            dump_writing = dump.seconds - dump_seconds_before
            dump.write_graph("final", aten_gm)
            dump.write_report({
                "graph": dump.folder.name,
                "status": "compiled",
                "compile_seconds": seconds,
                # where it went, in ms in report.md; every phase includes writing its part of the dump
                "phase_seconds": {"freeze": marks[1] - marks[0], "passes": marks[2] - marks[1],
                                  "codegen": marks[3] - marks[2] - precompile, "kernel precompile": precompile,
                                  "of which dump writing": dump_writing},
                "num_inputs": len(fake_inputs),
                "num_frozen": len(frozen),
                "num_sdpa_kept_whole": self.num_sdpa,
                "ops_aten": ops_aten,
                "ops_final": count_ops(aten_gm),
                "options": _options_summary(options),
                "passes": [
                    {"name": r.name, "round": r.round, "seconds": r.seconds, "ops_before": r.ops_before,
                     "ops_after": r.ops_after, "modified": r.modified, "stats": dict(r.stats)}
                    for r in records
                ],
                "op_histogram_aten": dict(hist_aten),
                "op_histogram_final": dict(op_histogram(aten_gm)),
            })
        return runner


def _aot_params_flat() -> list:
    """Parameters AOTAutograd prepends to the graph inputs (empty when Dynamo inlined modules)."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    return list(getattr(context, "params_flat", None) or []) if context is not None else []


def _options_summary(options: FuseccOptions) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items() if k != "extra")
