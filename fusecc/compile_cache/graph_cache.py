"""The backend's persistent cache of compiled graphs, keyed on the Dynamo graph (key.py).

A hit skips AOTAutograd, fusecc's passes and code generation: the backend returns the stored
program (artifact.py), built with the first call's inputs. Dynamo still traces the Python code
(it must, to find the graph and its guards); fusecc.compile_cache.aot_compile (function_cache.py) skips that too.

Off when FUSECC_DISABLE_COMPILE_CACHE=1 or torch.compiler.config.force_disable_caches is set.
Reads are skipped while dumping (a dump shows the passes running), writes are not.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fusecc.compile_cache.artifact import GraphArtifact
from fusecc.compile_cache.compiled_graph import FuseccCompiledGraph
from fusecc.compile_cache.location import graphs_dir
from fusecc.compile_cache.stats import counters
from fusecc.compile_cache.store import discard, read_entry, write_entry

log = logging.getLogger("fusecc.compile_cache")

# options that change nothing in the compiled code
_NOT_IN_KEY = ("dump_dir", "extra")


def cache_enabled() -> bool:
    if os.environ.get("FUSECC_DISABLE_COMPILE_CACHE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    compiler_config = getattr(torch.compiler, "config", None)
    return not getattr(compiler_config, "force_disable_caches", False)


def options_factors(options) -> dict:
    return {k: v for k, v in vars(options).items() if k not in _NOT_IN_KEY}


def load_graph(key: str, example_inputs: list) -> Optional[FuseccCompiledGraph]:
    """The stored graph ready to run (built against `example_inputs`, the first call's), or None."""
    payload = read_entry(graphs_dir(), key)
    if payload is None:
        counters["graph_misses"] += 1
        return None
    try:
        with unset_fake_temporarily():
            artifact = GraphArtifact.from_bytes(payload)
            runner = artifact.load(list(example_inputs))
    except Exception as exc:  # written by another fusecc, or an op that no longer exists
        discard(graphs_dir() / f"{key}.fcc", f"cannot be loaded: {type(exc).__name__}: {exc}")
        counters["graph_discarded"] += 1
        return None
    counters["graph_hits"] += 1

    def boxed_to_args(*args):
        return runner(list(args))

    return FuseccCompiledGraph(artifact, boxed_to_args)


def store_graph(key: str, artifact: GraphArtifact, description: str) -> None:
    try:
        payload = artifact.to_bytes()
    except Exception as exc:  # something in the program pickles only by accident: not stored
        counters["graph_uncacheable"] += 1
        log.info("fusecc: compiled graph not stored: %s: %s", type(exc).__name__, exc)
        return
    try:
        write_entry(graphs_dir(), key, payload, description)
        counters["graph_stores"] += 1
    except OSError as exc:  # a read-only or full disk costs the next start a compile, nothing more
        log.warning("fusecc: cannot write the compile cache (%s): %s", graphs_dir(), exc)
