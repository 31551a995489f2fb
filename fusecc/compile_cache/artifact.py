"""A compiled graph as bytes: what a later process needs to run it without AOTAutograd, the
passes or code generation.

    payload = {program: pickled with every tensor replaced by a slot number,
               sources: per slot, how to get the tensor (lineage.py recipe, or stored by value),
               fallback: the unfrozen ATen graph (FrozenWeightsCheck's), launches: kernels to precompile}

The program is the optimized ATen graph (codegen="aten") or the generated wrapper's source and its
globals (codegen="triton": ATen ops by name, kernels by their source, which the kernel cache
loads and Triton's own cache has compiled). Weights are never stored: a frozen constant is
recomputed from the graph's inputs on the first call, which is why loading is lazy (`load` takes
the first call's arguments).
"""

from __future__ import annotations

import importlib
import io
import pickle
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fusecc.compile_cache.lineage import ConstantLineage, evaluate, op_key, resolve_op
from fusecc.compile_cache.tensor_bytes import TensorBytes
from fusecc.compile_cache.portable_module import from_graph_module, to_module

# constants that no recipe explains (factory results: arange, masks) are stored by value, up to this
MAX_STORED_CONSTANT_BYTES = 64 << 20


class NotCacheable(Exception):
    """Why a compiled graph cannot be stored (the graph still runs; it is compiled again next time)."""


@dataclass
class KernelRef:
    """A generated kernel in a stored wrapper's globals: loaded by its source (codegen/kernel_cache.py)."""
    source: Any  # KernelSource


def _resolve_packet(namespace: str, name: str):
    return getattr(getattr(torch.ops, namespace), name)


class _Pickler(pickle.Pickler):
    """Pickles a program with its tensors as slots and ATen ops by name."""

    def __init__(self, file):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._slot: dict[int, int] = {}

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in self._slot:
                self._slot[id(obj)] = len(self.tensors)
                self.tensors.append(obj)
            return self._slot[id(obj)]
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch._ops.OpOverload):
            return resolve_op, (op_key(obj),)
        if isinstance(obj, torch._ops.OpOverloadPacket):
            return _resolve_packet, tuple(obj._qualified_op_name.split("::"))
        if isinstance(obj, fx.GraphModule):
            return to_module, (from_graph_module(obj),)
        if isinstance(obj, types.ModuleType):  # `torch` in generated code's globals
            return importlib.import_module, (obj.__name__,)
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list[torch.Tensor]):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, slot):
        return self.tensors[slot]


def _dumps(obj) -> tuple[bytes, list[torch.Tensor]]:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.tensors


@dataclass
class GraphArtifact:
    program: bytes
    sources: list                      # per tensor slot: a lineage recipe, or None (stored by value)
    values: dict                       # slot -> TensorBytes, for the None sources
    fallback: Optional[bytes] = None   # the unfrozen graph, pickled the same way (its own slots)
    fallback_sources: list = field(default_factory=list)
    fallback_values: dict = field(default_factory=dict)
    frozen_positions: list[int] = field(default_factory=list)
    strict: bool = False
    launches: list = field(default_factory=list)  # (KernelSource, args, meta) to precompile

    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(data: bytes) -> "GraphArtifact":
        artifact = pickle.loads(data)
        if not isinstance(artifact, GraphArtifact):
            raise TypeError(f"not a fusecc graph artifact: {type(artifact).__name__}")
        return artifact

    def load(self, args: list) -> Callable:
        """The boxed runner, its constants computed from this first call's `args`."""
        from fusecc.codegen.program import runner_for
        from fusecc.freeze import FrozenWeightsCheck

        state = _load_pickled(self.program, self.sources, self.values, args)
        program = _rebuild_program(state)
        runner = runner_for(program)
        if self.launches:
            _precompile(self.launches)
        if not self.frozen_positions:
            return runner
        weights = {p: args[p] for p in self.frozen_positions}
        fallback = _LazyGraph(self.fallback, self.fallback_sources, self.fallback_values, weights)
        return FrozenWeightsCheck(runner, {p: args[p] for p in self.frozen_positions}, fallback, self.strict)


def build_artifact(program, frozen: dict[int, torch.Tensor], unfrozen: Optional[fx.GraphModule],
                   lineage: Optional[ConstantLineage], strict: bool) -> GraphArtifact:
    """Raises NotCacheable with the reason where the program holds something that cannot be stored."""
    state = {"graph": program.graph, "autotune": program.autotune, "cudagraphs": program.cudagraphs,
             "mutated_inputs": program.mutated_inputs, "weight_inputs": program.weight_inputs}
    launches = []
    if program.wrapper is not None:
        wrapper = program.wrapper
        kernel_of = {id(wrapper.namespace[name]): ks for name, ks in wrapper.kernels.items()
                     if name in wrapper.namespace}
        state["source"] = wrapper.source
        state["namespace"] = {name: KernelRef(kernel_of[id(value)]) if id(value) in kernel_of else value
                              for name, value in wrapper.namespace.items()}
        launches = [(kernel_of[id(launch.kernel)], launch.args, launch.meta)
                    for launch in wrapper.launch_examples if id(launch.kernel) in kernel_of]
    program_bytes, sources, values = _dumps_with_sources(state, frozen, lineage)
    artifact = GraphArtifact(program_bytes, sources, values, frozen_positions=sorted(frozen), strict=strict,
                             launches=launches)
    if frozen and unfrozen is not None:
        artifact.fallback, artifact.fallback_sources, artifact.fallback_values = \
            _dumps_with_sources(unfrozen, frozen, lineage)
    return artifact


def _dumps_with_sources(obj, frozen: dict, lineage: Optional[ConstantLineage]) -> tuple[bytes, list, dict]:
    try:
        data, tensors = _dumps(obj)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise NotCacheable(f"the compiled program cannot be pickled: {exc}") from None
    lineage = lineage or ConstantLineage(frozen)
    sources, by_value, stored_bytes = [], {}, 0
    for slot, tensor in enumerate(tensors):
        source = lineage.source_of(tensor) if tensor.device.type != "meta" else None
        if source is None and lineage.is_tainted(tensor):
            raise NotCacheable("a constant is computed from the weights by an op that cannot be replayed")
        if source is None:
            stored_bytes += tensor.numel() * tensor.element_size()
            by_value[slot] = TensorBytes.pack(tensor)
        sources.append(source)
    if stored_bytes > MAX_STORED_CONSTANT_BYTES:
        raise NotCacheable(f"{stored_bytes / 2**20:.0f} MiB of constants not derived from the weights "
                           f"(more than {MAX_STORED_CONSTANT_BYTES >> 20} MiB)")
    return data, sources, by_value


def _load_pickled(data: bytes, sources: list, values: dict, args):
    import fusecc.ops  # noqa: F401  (registers the torch.ops.fusecc.* a stored graph calls)

    memo: dict = {}
    tensors = [values[slot].unpack() if source is None else evaluate(source, args, memo)
               for slot, source in enumerate(sources)]
    return _Unpickler(io.BytesIO(data), tensors).load()


def _rebuild_program(state: dict):
    from fusecc.codegen.kernel_cache import default_cache_dir, kernel_cache
    from fusecc.codegen.program import Program
    from fusecc.codegen.wrapper import CompiledWrapper, load_wrapper

    wrapper = None
    if state.get("source") is not None:
        cache = kernel_cache(str(default_cache_dir()))
        namespace = {name: cache.load(value.source) if isinstance(value, KernelRef) else value
                     for name, value in state["namespace"].items()}
        wrapper = CompiledWrapper(call=load_wrapper(state["source"], namespace), source=state["source"],
                                  namespace=namespace)
    return Program(graph=state["graph"], wrapper=wrapper, autotune=state["autotune"], cudagraphs=state["cudagraphs"],
                   mutated_inputs=state["mutated_inputs"], weight_inputs=state["weight_inputs"])


def _precompile(launches: list) -> None:
    from fusecc.codegen.kernel_cache import default_cache_dir, kernel_cache
    from fusecc.codegen.precompile import KernelLaunch, precompile

    cache = kernel_cache(str(default_cache_dir()))
    precompile([KernelLaunch(cache.load(ks), list(args), dict(meta)) for ks, args, meta in launches])


class _LazyGraph:
    """The unfrozen fallback graph, unpickled only if a call ever needs it."""

    def __init__(self, data: bytes, sources: list, values: dict, weights: dict[int, torch.Tensor]):
        self._state = (data, sources, values, weights)  # weights: input position -> the first call's
        self._graph = None

    def __call__(self, *args):
        if self._graph is None:
            self._graph = _load_pickled(*self._state)
            self._state = None
        return self._graph(*args)
