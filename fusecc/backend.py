"""The torch.compile entry point: capture -> passes -> codegen -> callable.

Registered under the `torch_dynamo_backends` entry-point group, so

    torch.compile(model, backend="fusecc", mode=..., options={...})

works without importing fusecc first. See config.py for the options.

A graph compiled before (by this or an earlier process) is loaded from the compile cache instead
(fusecc/compile_cache/): the key is taken on the Dynamo graph, so a hit skips everything below.

AOTAutograd hands `InferenceCompiler` the ATen inference graph, which runs three stages in one
direction, each timing itself: freeze (weights -> constants, with `freeze`), optimize (the pass
pipeline, fusecc/passes/), lower (fusion + Triton kernels + wrapper, or the ATen graph as it
is; fusecc/codegen/). Every stage writes to the graph's dump, which does nothing when dumping is off.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._dynamo.exc import ShortenTraceback
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.fx._lazy_graph_module import _LazyGraphModule

from fusecc.capture import capture_aten, keep_sdpa_whole
from fusecc.codegen.lower import Program, lower
from fusecc.compile_cache.artifact import GraphArtifact, NotCacheable, build_artifact
from fusecc.compile_cache.calling_convention import convention_problem
from fusecc.compile_cache.compiled_graph import FuseccCompiledGraph
from fusecc.compile_cache.graph_cache import cache_enabled, load_graph, options_factors, store_graph
from fusecc.compile_cache.key import graph_key
from fusecc.compile_cache.lineage import ConstantLineage
from fusecc.compile_cache.stats import counters
from fusecc.config import FuseccOptions
from fusecc.debug.dump import GraphDump, NoDump
from fusecc.debug.report import CompileReport
from fusecc.freeze import FrozenWeightsCheck, freeze_weights, is_weight_input, unfrozen_copy
from fusecc.graph.nested_regions import inline_nested_regions
from fusecc.graph.op_counts import count_ops, op_histogram
from fusecc.passes import build_pipeline, run_passes
from fusecc.passes.pipeline import PassRecord
from fusecc.triton_support import has_triton_driver

log = logging.getLogger("fusecc.compile_cache")


class FuseccOptionError(ShortenTraceback, TypeError, ValueError):
    """A mistake in how the backend was asked for (an unknown or badly typed option). Dynamo
    wraps a backend's exceptions in BackendCompilerFailed under a line of its own, but passes a
    ShortenTraceback through as it is: so the user's error is this one line, first. It is also a
    TypeError and a ValueError, as the checks that found it raise."""

    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


def fusecc_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    try:
        options = _options(kwargs, example_inputs)
    except (TypeError, ValueError) as exc:
        # a bad option is the caller's error, not a compile failure to fall back from
        raise FuseccOptionError(str(exc)) from None

    start = time.perf_counter()
    dump = GraphDump.create(options.dump_dir)
    dump.write_graph("dynamo", gm)

    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        warnings.warn(
            "fusecc compiles inference graphs only; this graph needs autograd (grad mode is on and an input "
            "requires grad), so it runs unoptimized. Wrap the call in torch.no_grad() or torch.inference_mode().",
            stacklevel=2,
        )
        dump.note("needs autograd (grad mode on, an input requires grad): runs unoptimized", kind="fallback")
        _write_unoptimized_report(dump, gm, example_inputs, options, start)
        return gm.forward

    weight_flags = [
        is_weight_input(node, ex)
        for node, ex in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)
    ]
    counters["backend_calls"] += 1
    key = _cache_key(gm, example_inputs, weight_flags, options)
    if key is not None and not dump.enabled:
        cached = load_graph(key, example_inputs)
        if cached is not None:
            return cached
    try:
        num_sdpa = keep_sdpa_whole(gm)
        compiler = InferenceCompiler(options, dump, list(example_inputs), weight_flags, num_sdpa,
                                     record_artifact=key is not None)
        with _no_aot_autograd_cache():
            runner = capture_aten(gm, list(example_inputs), compiler)
        if compiler.artifact is None:
            return runner
        store_graph(key, compiler.artifact, f"{len(gm.graph.nodes)} Dynamo nodes, {len(example_inputs)} inputs, "
                                            f"{_device_summary(example_inputs)}, mode={options.mode}, "
                                            f"freeze={options.freeze}, codegen={options.codegen}")
        return FuseccCompiledGraph(compiler.artifact, runner)
    except Exception as exc:
        if _is_dynamo_control_flow(exc):
            # Not a failure: Dynamo asks to re-trace the frame (e.g. to specialize a float
            # scalar) and will call us again with a new graph. Swallowing it would run the
            # graph eagerly for good.
            dump.discard()
            raise
        if options.strict:
            raise
        warnings.warn(f"fusecc failed to compile a graph and runs it unoptimized instead: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)
        dump.note(f"compilation failed, graph runs eagerly: {type(exc).__name__}: {exc}", kind="fallback")
        dump.write_text("error.txt", f"{type(exc).__name__}: {exc}\n")
        _write_unoptimized_report(dump, gm, example_inputs, options, start)
        return gm.forward


def _cache_key(gm: fx.GraphModule, example_inputs: list, weight_flags: list, options: FuseccOptions) -> str | None:
    if not cache_enabled():
        return None
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
    try:
        return graph_key(gm, example_inputs, weight_flags, options_factors(options), device)
    except Exception as exc:  # a graph we cannot describe is compiled every time, as without a cache
        log.info("fusecc: no cache key for this graph: %s: %s", type(exc).__name__, exc)
        return None


def _device_summary(example_inputs: list) -> str:
    return next((str(x.device) for x in example_inputs if isinstance(x, torch.Tensor)), "no tensors")


def _no_aot_autograd_cache():
    """torch's AOT compile (`.aot_compile`) asks AOTAutograd to use and insist on its own cache,
    which holds only Inductor's output; fusecc stores its compiled graphs itself."""
    import torch._functorch.config as functorch_config

    settings = {name: False for name in ("strict_autograd_cache", "force_autograd_cache", "bundled_autograd_cache")
                if hasattr(functorch_config, name)}
    return functorch_config.patch(settings) if settings else contextlib.nullcontext()


def _options(kwargs: dict, example_inputs: list) -> FuseccOptions:
    mode = kwargs.pop("mode", None)
    options_arg = kwargs.pop("options", None)
    if kwargs:
        raise TypeError(f"fusecc backend got unexpected arguments {sorted(kwargs)}; use options={{...}}")
    options = FuseccOptions.from_sources(mode=mode, options=options_arg)
    build_pipeline(options)  # checks disable_passes
    _check_codegen_device(options, example_inputs)
    return options


def _check_codegen_device(options: FuseccOptions, example_inputs: list) -> None:
    # Triton reaches CPU tensors only through its interpreter, which must be on before kernels are
    # defined; otherwise the first call fails deep inside Triton ("0 active drivers")
    cpu = any(isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dim() > 0 for x in example_inputs)
    if options.codegen == "triton" and cpu and not has_triton_driver():
        raise ValueError("fusecc: option codegen='triton' on CPU tensors needs Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before fusecc is imported); on CPU use codegen='auto' or 'aten'")


def _write_unoptimized_report(dump: NoDump, gm: fx.GraphModule, example_inputs: list, options: FuseccOptions,
                              start: float) -> None:
    """The report of a graph that runs as Dynamo captured it, so that `fusecc dump` lists it too."""
    if not dump.enabled:
        return
    dump.write_report(CompileReport(
        graph=dump.folder.name, status="unoptimized", compile_seconds=time.perf_counter() - start,
        num_inputs=len(example_inputs), options=_options_summary(options), ops_aten="-", ops_final=count_ops(gm),
        op_histogram_final=dict(op_histogram(gm))))


def _is_dynamo_control_flow(exc: BaseException) -> bool:
    from torch._dynamo import exc as dynamo_exc

    return isinstance(exc, (dynamo_exc.RestartAnalysis, dynamo_exc.ShortenTraceback))


@dataclass
class _Compilation:
    """What the stages of one graph's compilation hand each other."""
    gm: fx.GraphModule
    fake_inputs: list
    weight_inputs: list[bool]                 # per ATen input: a parameter/buffer (freezable)
    params_flat: list                         # parameters AOTAutograd prepended to the inputs
    frozen: dict = field(default_factory=dict)  # input position -> the tensor frozen there
    unfrozen: fx.GraphModule | None = None    # the graph before freezing (FrozenWeightsCheck's fallback)
    records: list[PassRecord] = field(default_factory=list)
    runner: Callable | None = None
    codegen_summary: dict = field(default_factory=dict)
    program: Program | None = None            # what rebuilds the runner (stored by compile_cache)
    lineage: ConstantLineage | None = None    # how frozen constants derive from the weights


class InferenceCompiler:
    """Called by AOTAutograd with the ATen inference graph; returns what runs it."""

    def __init__(self, options: FuseccOptions, dump: NoDump, dynamo_inputs: list, weight_flags: list,
                 num_sdpa: int, record_artifact: bool = False):
        self.options = options
        self.dump = dump
        self.dynamo_inputs = dynamo_inputs
        self.weight_flags = weight_flags
        self.num_sdpa = num_sdpa
        self.record_artifact = record_artifact
        self.artifact: GraphArtifact | None = None  # set when the compiled graph can be stored

    def __call__(self, aten_gm: fx.GraphModule, fake_inputs: list) -> Callable:
        counters["aten_traces"] += 1
        # AOTAutograd calls us inside its fake mode; freezing and folding handle real tensors.
        with unset_fake_temporarily():
            return self._compile(aten_gm, fake_inputs)

    def _compile(self, aten_gm: fx.GraphModule, fake_inputs: list) -> Callable:
        start, dump_seconds_before = time.perf_counter(), self.dump.seconds
        regions = inline_nested_regions(aten_gm)
        if regions:
            self.dump.note(f"inlined {regions} calls of nested compile regions (traced once each)", kind="regions")
        # Passes call gm.recompile() after each change; regenerating the Python code of a graph of
        # thousands of nodes is ~0.1 s each time. A lazy graph module regenerates it only when
        # something reads the code or runs forward (the dump, the ATen runner), once.
        aten_gm = _LazyGraphModule.from_graphmodule(aten_gm)
        self.dump.write_graph("aten", aten_gm)
        ops_aten, hist_aten = count_ops(aten_gm), op_histogram(aten_gm)
        params_flat = _aot_params_flat()
        weight_inputs = [True] * len(params_flat) + self.weight_flags
        if len(weight_inputs) != len(fake_inputs):
            weight_inputs = [False] * len(fake_inputs)  # cannot map inputs: treat none as weights
        c = _Compilation(aten_gm, fake_inputs, weight_inputs, params_flat)
        phase_seconds: dict[str, float] = {}
        phase_seconds.update(self._freeze(c))
        if self.record_artifact and c.frozen:
            c.lineage = ConstantLineage(c.frozen)
        with c.lineage if c.lineage is not None else contextlib.nullcontext():
            for stage in (self._optimize, self._lower):
                phase_seconds.update(stage(c))
        runner = FrozenWeightsCheck(c.runner, c.frozen, c.unfrozen, self.options.strict) if c.frozen else c.runner
        if self.record_artifact:
            self.artifact = self._artifact(c)
        seconds = time.perf_counter() - start
        if self.dump.enabled:
            phase_seconds["of which dump writing"] = self.dump.seconds - dump_seconds_before
            self.dump.write_graph("final", aten_gm)
            self.dump.write_report(CompileReport(
                graph=self.dump.folder.name, status="compiled", compile_seconds=seconds,
                phase_seconds=phase_seconds, num_inputs=len(fake_inputs), num_frozen=len(c.frozen),
                num_sdpa_kept_whole=self.num_sdpa, ops_aten=ops_aten, ops_final=count_ops(aten_gm),
                options=_options_summary(self.options), passes=[r.to_json() for r in c.records],
                op_histogram_aten=dict(hist_aten), op_histogram_final=dict(op_histogram(aten_gm)),
                codegen=c.codegen_summary))
        return runner

    # --- the stages: each updates the compilation and returns its own timings ---

    def _freeze(self, c: _Compilation) -> dict[str, float]:
        start = time.perf_counter()
        if self.options.freeze:
            c.unfrozen = unfrozen_copy(c.gm)
            c.frozen = freeze_weights(c.gm, list(c.params_flat) + self.dynamo_inputs, c.weight_inputs, self.dump)
        return {"freeze": time.perf_counter() - start}

    def _optimize(self, c: _Compilation) -> dict[str, float]:
        start = time.perf_counter()
        c.records += run_passes(c.gm, build_pipeline(self.options), max_rounds=self.options.max_pass_rounds,
                                verify=self.options.verify, dump=self.dump)
        return {"passes": time.perf_counter() - start}

    def _artifact(self, c: _Compilation) -> GraphArtifact | None:
        num_inputs = len(c.gm.graph.find_nodes(op="placeholder"))
        problem = convention_problem(num_inputs, len(self.dynamo_inputs), c.params_flat)
        if problem is None and c.program is None:
            problem = "nothing to store"
        if problem is None:
            try:
                return build_artifact(c.program, c.frozen, c.unfrozen, c.lineage, self.options.strict)
            except NotCacheable as exc:
                problem = str(exc)
            except Exception as exc:  # storing is optional: the compiled graph runs regardless
                problem = f"{type(exc).__name__}: {exc}"
        counters["graph_uncacheable"] += 1
        log.info("fusecc: compiled graph not stored: %s", problem)
        self.dump.note(f"not stored in the compile cache: {problem}", kind="cache")
        return None

    def _lower(self, c: _Compilation) -> dict[str, float]:
        counters["codegen_runs"] += 1
        lowered = lower(c.gm, self.options, self.dump, c.fake_inputs, c.weight_inputs)
        c.runner, c.codegen_summary, c.program = lowered.runner, lowered.summary, lowered.program
        c.records += lowered.records
        return lowered.seconds


def _aot_params_flat() -> list:
    """Parameters AOTAutograd prepends to the graph inputs (empty when Dynamo inlined modules)."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    return list(getattr(context, "params_flat", None) or []) if context is not None else []


def _options_summary(options: FuseccOptions) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in vars(options).items() if k != "extra")
