"""Freezing: parameters and buffers the graph never mutates become compile-time constants.

With inlined nn.Modules, Dynamo passes weights to the graph as ordinary inputs. When the user
promises the weights will not change (`freeze=True`), each such input is replaced by a
`get_attr` constant holding the real tensor, which lets constant folding precompute weight
transposes, casts and tables. The placeholder stays (it is the calling convention) but has no
users. Anything we cannot map with certainty is left as an input, and the dump says so.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from fusecc.debug.dump import NoDump
from fusecc.graph.constants import insert_constant_node
from fusecc.graph.node_kinds import is_mutated


def is_weight_input(dynamo_node: fx.Node, example) -> bool:
    if isinstance(example, torch.nn.Parameter):
        return True
    grapharg = dynamo_node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", "")
    name = source() if callable(source) else str(source)
    return "._parameters[" in name or "._buffers[" in name


def freeze_weights(aten_gm: fx.GraphModule, flat_inputs: list, is_weight: list[bool],
                   dump: NoDump = NoDump()) -> dict[int, torch.Tensor]:
    """Turn unmutated weight placeholders of `aten_gm` into constants; returns {input position:
    the tensor frozen there} (FrozenWeightsCheck's argument)."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        dump.note(f"freeze skipped: ATen graph has {len(placeholders)} inputs but "
                  f"{len(flat_inputs)} were passed (deduplicated or synthetic inputs)", kind="freeze")
        return {}
    frozen: dict[int, torch.Tensor] = {}
    first_op = next((n for n in aten_gm.graph.nodes if n.op != "placeholder"), None)
    for position, (node, value, weight) in enumerate(zip(placeholders, flat_inputs, is_weight)):
        if not weight or not isinstance(value, torch.Tensor) or type(value) not in (torch.Tensor, torch.nn.Parameter):
            continue
        if is_mutated(node):
            dump.note(f"not frozen: {node.name} is mutated by the graph", kind="freeze")
            continue
        constant = insert_constant_node(aten_gm, "_frozen_param", value.detach(), node.meta["val"], before=first_op)
        node.replace_all_uses_with(constant)
        frozen[position] = value
    if frozen:
        aten_gm.recompile()
    return frozen


def unfrozen_copy(aten_gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph as it is now (taken before freezing), for FrozenWeightsCheck's fallback.
    Node metadata is shared, not copied: the copy is never transformed."""
    graph = fx.Graph()
    output = graph.graph_copy(aten_gm.graph, {})
    graph.output(output)
    # lazy: its Python code (tenths of a second for a large model) is generated on first use only
    return _LazyGraphModule(aten_gm, graph)


class FrozenWeightsCheck:
    """The compiled graph, run only with the weights it froze.

    Dynamo passes an inlined module's weights to the graph as inputs and guards on their shapes,
    not on which tensors they are: a second instance of the same model class (a draft and a
    target model, two checkpoints) reuses a graph compiled for the first. With frozen weights that
    graph would compute with the first model's. Each call checks that every frozen input is the
    tensor frozen (the same object, or the same storage); a call with other weights runs the
    unfrozen ATen graph instead, correct and slower, with a warning (strict: an error)."""

    _boxed_call = True

    def __init__(self, runner, frozen: dict[int, torch.Tensor], fallback: fx.GraphModule, strict: bool):
        self.runner = runner
        self.frozen = [(i, t, t.data_ptr()) for i, t in frozen.items()]
        self.fallback = fallback
        self.strict = strict
        self.warned = False

    def __call__(self, args: list):
        for i, tensor, ptr in self.frozen:
            given = args[i]
            if given is not tensor and given.data_ptr() != ptr:
                return self._other_weights(args, i)
        return self.runner(args)

    def _other_weights(self, args: list, position: int):
        message = (f"fusecc: this graph was compiled with freeze=True for other weights (input {position} is "
                   "not the tensor frozen): another instance of the same model class reuses it")
        advice = "compile without freeze to share one compiled graph between models"
        if self.strict:
            raise RuntimeError(f"{message}; {advice}")
        message = f"{message}. Running it unoptimized; {advice}."
        if not self.warned:
            warnings.warn(message, stacklevel=2)
            self.warned = True
        values = list(args)
        args.clear()  # boxed calling convention: the callee owns (and may free) the inputs
        return self.fallback(*values)
