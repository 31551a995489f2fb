"""What the fusecc backend returns for a graph it can store: a callable that torch's AOT compile
(`torch.compile(...).aot_compile`, `save_compiled_function`) can serialize, because it implements
torch's SerializableCallable (torch/_dynamo/aot_compile_types.py), as vLLM's
VllmSerializableFunction does.

    FuseccCompiledGraph(artifact, runner)   just compiled: calls the runner AOTAutograd wrapped
    FuseccCompiledGraph(artifact)           loaded: the runner is built on the first call (it
                                            recomputes frozen constants from that call's weights)

Dynamo calls it with the graph's flat inputs (tensors and SymInt values), unboxed.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from fusecc.compile_cache.artifact import GraphArtifact

log = logging.getLogger("fusecc.compile_cache")

try:  # torch >= 2.10 (the class moved from aot_compile.py to aot_compile_types.py)
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # pragma: no cover - depends on the torch version
    try:
        from torch._dynamo.aot_compile import SerializableCallable
    except ImportError:
        SerializableCallable = None

HAS_SERIALIZABLE_CALLABLE = SerializableCallable is not None
_Base = SerializableCallable if HAS_SERIALIZABLE_CALLABLE else object


class FuseccCompiledGraph(_Base):
    def __init__(self, artifact: GraphArtifact, runner: Optional[Callable] = None):
        self.artifact = artifact
        self._call = runner

    def __call__(self, *args):
        if self._call is None:
            boxed = self.artifact.load(list(args))

            def call(*inputs):
                return boxed(list(inputs))

            self._call = call
        return self._call(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: "FuseccCompiledGraph") -> bytes:
        return fn.artifact.to_bytes()

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> "FuseccCompiledGraph":
        return cls(GraphArtifact.from_bytes(data))
