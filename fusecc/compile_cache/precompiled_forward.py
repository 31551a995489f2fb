"""A module's forward, compiled ahead of time graph by graph, so that a restarted engine traces nothing.

    forward = PrecompiledForward(model, options, fallback)      # fallback: torch.compile(model, ...)
    logits = forward(input_ids, positions, kv_caches, metadata)

Where Dynamo would compile a graph for a new kind of call (decode-only or mixed steps, a size it
specialises), this asks `load_or_compile` (function_cache.py) for a stored function for that call:
the first process compiles and stores it, a restarted one loads it without tracing. Each call runs
the first function whose guards accept it. Where a call cannot be compiled ahead of time (a graph
break, an unstorable graph), the forward falls back to `fallback` from then on, as before.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch

from fusecc.compile_cache.function_cache import load_or_compile, missing_torch_support

log = logging.getLogger("fusecc.compile_cache")


def call_module(model: torch.nn.Module, *args, **kwargs):
    """What is compiled: a module-level function (its code is part of the cache key), the module an argument."""
    return model(*args, **kwargs)


class PrecompiledForward:
    """`while_compiling(*args, **kwargs)`, when given, is a context manager entered around each
    compilation (and around every call of `fallback`, which may compile at any call): where the
    arguments need Dynamo markings (torch._dynamo.mark_static) to compile well. They must be gone
    when a stored function's guards are checked: a loaded function's guards remember the markings
    as absent and reject a marked tensor."""

    def __init__(self, model: torch.nn.Module, options: dict, fallback: Callable, max_graphs: int,
                 dynamic: bool = True, while_compiling: Callable | None = None):
        self.model = model
        self.while_compiling = while_compiling or (lambda *args, **kwargs: contextlib.nullcontext())
        self.options = options
        self.fallback = fallback
        self.max_graphs = max_graphs
        self.dynamic = dynamic
        self.functions: list = []
        self.use_fallback = False
        from fusecc.compile_cache.graph_cache import cache_enabled

        missing = missing_torch_support() or (None if cache_enabled() else "the compile cache is off")
        if missing:
            log.info("fusecc: %s; the forward is compiled with torch.compile (traced in every process)", missing)
            self.use_fallback = True

    def __call__(self, *args, **kwargs):
        if self.use_fallback:
            return self._call_fallback(*args, **kwargs)
        for fn in self.functions:
            if fn.guard_check(self.model, *args, **kwargs):
                return fn(self.model, *args, **kwargs)
        if len(self.functions) >= self.max_graphs:
            log.warning("fusecc: the forward needed more than %d graphs; compiling with torch.compile", self.max_graphs)
            self.use_fallback = True
            return self._call_fallback(*args, **kwargs)
        fn = load_or_compile(call_module, (self.model, *args), kwargs, options=self.options, dynamic=self.dynamic,
                             while_compiling=lambda: self.while_compiling(*args, **kwargs))
        if fn is None:
            self.use_fallback = True
            return self._call_fallback(*args, **kwargs)
        fn.disable_guard_check()  # checked here, before the call
        self.functions.append(fn)
        return fn(self.model, *args, **kwargs)

    def _call_fallback(self, *args, **kwargs):
        with self.while_compiling(*args, **kwargs):
            return self.fallback(*args, **kwargs)

    @property
    def num_graphs(self) -> int:
        return len(self.functions)
