"""Cache keys: what must match for a stored compilation to be reused.

    key = sha256(format version, fusecc's own source, torch/triton/python versions, the device,
                 the options, the shape settings, the graph's code and its inputs' metadata)

A change to any fusecc source file (a pass, the code generator) changes every key, as vLLM hashes
its compiler's files: a stale entry is never loaded, it is simply not found (`fusecc cache clear`
removes the orphans). Weights are not part of the key: a compiled graph reads them as inputs, or,
when frozen, recomputes its constants from them on the first call (see artifact.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import platform
from pathlib import Path
from typing import Any, Iterable

import torch

FORMAT_VERSION = 1


@functools.lru_cache(maxsize=None)
def fusecc_source_hash() -> str:
    """sha256 over every .py file of the fusecc package (relative path and contents)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def system_factors(device: torch.device | str | None) -> dict[str, Any]:
    """Versions and the device that compiled code depends on (generated kernels are specialised
    to a GPU's architecture; the interpreter's CPU kernels to TRITON_INTERPRET)."""
    from fusecc.triton_support import interpreting

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    factors: dict[str, Any] = {"format": FORMAT_VERSION, "fusecc": fusecc_source_hash(),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "triton": triton_version, "triton_interpret": interpreting()}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        factors["device"] = (torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                             torch.version.cuda)
    else:
        factors["device"] = str(device.type) if device is not None else "none"
    return factors


def shape_settings() -> dict[str, Any]:
    """Settings that change how the same Dynamo graph is traced to ATen."""
    import torch.fx.experimental._config as fx_config

    return {"backed_size_oblivious": bool(getattr(fx_config, "backed_size_oblivious", False)),
            "grad_enabled": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled()}


def describe_value(value: Any, dynamic: bool = False) -> Any:
    """An input's metadata as text: what Dynamo guards on and the compilation depends on.
    dynamic (a dynamic=True compilation): only the shape class of sizes and ints, as Dynamo sees
    them: 0, 1 and "n" for any other, a dimension marked static (torch._dynamo.mark_static) by its
    value. A KV pool sized from free GPU memory then finds the graph an earlier process stored for
    another pool size; whoever loads an entry checks its guards (function_cache.load_or_compile)."""
    if isinstance(value, torch.Tensor):
        if dynamic:
            static = set(getattr(value, "_dynamo_static_indices", ()))
            shape = tuple(str(s) if i in static or s in (0, 1) else "n" for i, s in enumerate(value.shape))
            # the order of the strides, not their values (they follow dynamic sizes)
            layout = tuple(sorted(range(value.dim()), key=lambda d: -value.stride(d)))
        else:
            shape, layout = tuple(str(s) for s in value.shape), tuple(str(s) for s in value.stride())
        return ("tensor", shape, layout, str(value.dtype), str(value.device), bool(value.requires_grad),
                isinstance(value, torch.nn.Parameter))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return (type(value).__name__, str(value.node.expr))
    if dynamic and isinstance(value, int) and not isinstance(value, bool):
        return ("int", repr(value) if value in (0, 1) else "n")
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, repr(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [describe_value(v, dynamic) for v in value])
    if isinstance(value, dict):
        return ("dict", [(repr(k), describe_value(v, dynamic)) for k, v in value.items()])
    if dataclasses.is_dataclass(value):  # e.g. attention metadata: its fields, tensors by metadata
        return (type(value).__qualname__, [(f.name, describe_value(getattr(value, f.name), dynamic))
                                           for f in dataclasses.fields(value)])
    return (type(value).__module__, type(value).__qualname__)  # never its repr: it may hold values


def digest(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def graph_key(gm: torch.fx.GraphModule, example_inputs: list, weight_flags: list[bool], options_factors: dict,
              device: torch.device | str | None) -> str:
    """The key of a Dynamo graph's compilation: its code (ops, attribute names, constants inlined as
    literals), the metadata of its inputs, the values of its tensor attributes, and the rest."""
    return digest([system_factors(device), shape_settings(), sorted(options_factors.items()), _code_and_attributes(gm),
                   [describe_value(x) for x in example_inputs], list(weight_flags)])


def _code_and_attributes(gm: torch.fx.GraphModule) -> list:
    """A graph's code and what its get_attr nodes read: tensors by value, and the graph modules of
    nested compile regions (invoke_subgraph) by their own code and attributes, recursively."""
    attributes = []
    for node in gm.graph.find_nodes(op="get_attr"):
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part, None)
        if isinstance(value, torch.Tensor) and not value.is_meta:
            data = value.detach().cpu().contiguous().view(torch.uint8) if value.numel() else value.cpu()
            attributes.append((node.target, describe_value(value), hashlib.sha256(data.numpy().tobytes()).hexdigest()))
        elif isinstance(value, torch.fx.GraphModule):
            attributes.append((node.target, _code_and_attributes(value)))
        else:
            attributes.append((node.target, repr(type(value))))
    return [gm.code, attributes]
