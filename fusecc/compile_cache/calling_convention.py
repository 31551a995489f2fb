"""Whether AOTAutograd's runtime wrapper around a compiled ATen graph does nothing that a stored
graph would have to redo.

A stored graph replaces AOTAutograd's output, so it is called with Dynamo's inputs exactly as
the ATen graph takes them. That holds when AOTAutograd lifted no parameters, deduplicated no
inputs, left every input mutation inside the graph (keep_inference_input_mutations), returns no
output that aliases an input or another output, and used no tokens, subclasses or RNG state. The
decoder graphs fusecc compiles are like that; any other graph is simply not stored.
"""

from __future__ import annotations

from typing import Optional


def convention_problem(num_aten_inputs: int, num_dynamo_inputs: int, params_flat: list) -> Optional[str]:
    """None where a stored graph may stand in for AOTAutograd's wrapped function, else why not."""
    from torch._guards import TracingContext

    if params_flat:
        return "AOTAutograd lifted parameters"
    if num_aten_inputs != num_dynamo_inputs:
        return f"AOTAutograd changed the inputs ({num_dynamo_inputs} -> {num_aten_inputs}: duplicates or aliases)"
    context = TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None) if context is not None else None
    if meta is None:
        return "no AOTAutograd metadata"
    if getattr(meta, "num_mutated_inp_runtime_indices", 0):
        return "input mutations applied outside the graph"
    if any(getattr(o.output_type, "name", "") != "non_alias" for o in meta.output_info):
        return "outputs alias inputs or other outputs"
    if getattr(meta, "num_intermediate_bases", 0) or getattr(meta, "tokens", None):
        return "intermediate bases or side-effect tokens"
    if any(type(m).__name__ == "SubclassCreationMeta" for m in getattr(meta, "subclass_inp_meta", []) or []):
        return "tensor subclass inputs"
    if getattr(meta, "is_rng_op_functionalized", False):
        return "functionalized RNG"
    return None
