"""Dynamo FX graph (torch IR) -> ATen inference graph.

Two steps:
1. `keep_sdpa_whole` rewrites `F.scaled_dot_product_attention` calls into the opaque custom
   op `fusecc::sdpa`, so AOTAutograd does not lower SDPA to a backend-specific kernel op.
2. AOTAutograd traces the graph into functional ATen with our decomposition table
   (decompositions.py), mutations of inputs kept in the graph as `copy_` (so a static KV
   cache is updated in place, not copied back by a wrapper).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.*)
from fusecc.decompositions import decomposition_table

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def keep_sdpa_whole(gm: fx.GraphModule) -> int:
    """Replace dropout-free SDPA calls by `fusecc::sdpa`; returns how many were replaced.

        before:  %out = torch._C._nn.scaled_dot_product_attention(%q, %k, %v, is_causal=True)
        after:   %out = torch.ops.fusecc.sdpa.default(%q, %k, %v, None, True, None, False)
    """
    replaced = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = dict(zip(_SDPA_PARAMS, node.args))
        bound.update(node.kwargs)
        if set(bound) - set(_SDPA_PARAMS):
            continue  # a newer SDPA argument we do not know: keep the call as it is
        if bound.get("dropout_p", 0.0) != 0.0:
            continue  # dropout draws random numbers: leave it to ATen
        if any(isinstance(bound.get(k), fx.Node) for k in ("is_causal", "scale", "enable_gqa", "dropout_p")):
            continue  # traced non-constant flags: cannot be a custom-op literal
        node.target = torch.ops.fusecc.sdpa.default
        node.args = (bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                     bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False)))
        node.kwargs = {}
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def capture_aten(gm: fx.GraphModule, example_inputs: list, inference_compiler: Callable) -> Callable:
    """Run AOTAutograd on `gm`; `inference_compiler(aten_gm, fake_inputs)` receives the ATen
    inference graph and returns the boxed callable that will run it. A compiler whose `options`
    will run the graph as ATen ops gets the activations whole (see decompositions.py)."""
    from fusecc.codegen.lower import wants_triton

    options = getattr(inference_compiler, "options", None)
    for_aten_runner = options is not None and not wants_triton(options, example_inputs)
    backend = aot_autograd(
        fw_compiler=inference_compiler,
        inference_compiler=inference_compiler,
        decompositions=decomposition_table(for_aten_runner),
        keep_inference_input_mutations=True,
    )
    return backend(gm, example_inputs)
