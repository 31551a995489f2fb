"""How the constants of a frozen graph were computed from the weights, so that a process loading
the compiled graph recomputes them from its own weights instead of reading gigabytes from disk.

With freeze=True, constant folding and horizontal matmul fusion turn weights into new constants
(`_folded3 = clone(permute(w))`, `_hfused0 = cat([wq.t(), wk.t(), wv.t()])`). While the passes
run, `ConstantLineage` watches every ATen op on real tensors; an op reading a weight, or a
tensor computed from one, is recorded as a step. Afterwards each constant of the graph is either

    InputView(position, size, stride, offset)   a view of the weight the graph takes at `position`
    Derived(step, index)                         output `index` of a recorded op over such sources
    None                                         not from the weights: stored by value (artifact.py)

and a constant computed from the weights by something that cannot be replayed (an in-place op, a
large tensor that is not a weight) is "tainted": its graph is not stored at all.

Recipes are small Python objects (ops by name, shapes): no tensor data, except small literals.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from fusecc.compile_cache.tensor_bytes import TensorBytes

# a tensor argument that is not derived from a weight (a scale, a mask) is kept by value up to this
MAX_LITERAL_BYTES = 1 << 20


@dataclass(frozen=True)
class InputView:
    position: int
    size: tuple
    stride: tuple
    offset: int  # storage offset relative to the input's own


@dataclass(eq=False)
class Step:
    op: tuple            # (namespace, name, overload) of the ATen op
    args: Any            # (args, kwargs) with tensors replaced by InputView / Derived / Literal
    outputs: int = 1


@dataclass(frozen=True, eq=False)
class Derived:
    step: Step
    index: int


@dataclass(frozen=True, eq=False)
class Literal:
    value: TensorBytes


def op_key(op: torch._ops.OpOverload) -> tuple:
    return (op.namespace, op._opname, op._overloadname)


def resolve_op(key: tuple) -> torch._ops.OpOverload:
    namespace, name, overload = key
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


class ConstantLineage(TorchDispatchMode):
    def __init__(self, frozen: dict[int, torch.Tensor]):
        super().__init__()
        # storage address -> (graph input position, the input)
        self.roots = {t.untyped_storage().data_ptr(): (pos, t) for pos, t in frozen.items()}
        self.recipes: dict[int, tuple[weakref.ref, Derived]] = {}
        # computed from the weights by something not recorded (an in-place op, a large literal):
        # such a constant can be neither recomputed nor stored by value (it would be stale)
        self.tainted: dict[int, weakref.ref] = {}

    def source_of(self, t: torch.Tensor):
        """InputView, Derived, or None for a real tensor."""
        if is_fake(t) or t.is_meta:
            return None
        # a view of a weight (the weight itself, its transpose, a slice): exactly an as_strided
        root = self.roots.get(t.untyped_storage().data_ptr())
        if root is not None and t.dtype == root[1].dtype:
            position, base = root
            return InputView(position, tuple(t.shape), tuple(t.stride()), t.storage_offset() - base.storage_offset())
        entry = self.recipes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def is_tainted(self, t: torch.Tensor) -> bool:
        ref = self.tainted.get(id(t))
        return ref is not None and ref() is t

    def _taint(self, t: torch.Tensor) -> None:
        self.tainted[id(t)] = weakref.ref(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # recording is bookkeeping: it must never fail the compilation
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self._taint(o)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        if not isinstance(func, torch._ops.OpOverload):
            return
        flat, spec = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if not tensors or any(is_fake(t) for t in tensors):
            return
        results = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        sources = [self.source_of(a) if isinstance(a, torch.Tensor) else a for a in flat]
        from_weights = any(isinstance(s, (InputView, Derived)) or (isinstance(a, torch.Tensor) and self.is_tainted(a))
                           for s, a in zip(sources, flat))
        if func._schema.is_mutable:
            for t in tensors:  # a recorded value changed in place: its recipe no longer holds
                self.recipes.pop(id(t), None)
                if from_weights:
                    self._taint(t)
            return
        if not from_weights:
            return
        mapped = []
        for a, s in zip(flat, sources):
            if isinstance(a, torch.Tensor) and s is None:
                if self.is_tainted(a) or a.numel() * a.element_size() > MAX_LITERAL_BYTES:
                    for o in results:  # not reproducible cheaply
                        self._taint(o)
                    return
                s = Literal(TensorBytes.pack(a))
            mapped.append(s)
        step = Step(op_key(func), tree_unflatten(mapped, spec), len(results))
        for index, o in enumerate(results):
            self.recipes[id(o)] = (weakref.ref(o), Derived(step, index))


def evaluate(source, inputs: list, memo: dict) -> torch.Tensor:
    """The tensor a recipe describes, computed from the graph's inputs of this process."""
    if isinstance(source, InputView):
        base = inputs[source.position]
        return base.as_strided(source.size, source.stride, base.storage_offset() + source.offset)
    if isinstance(source, Literal):
        return source.value.unpack()
    if isinstance(source, Derived):
        step = source.step
        if id(step) not in memo:
            args, kwargs = tree_map(lambda s: evaluate(s, inputs, memo)
                                    if isinstance(s, (InputView, Derived, Literal)) else s, step.args)
            result = resolve_op(step.op)(*args, **kwargs)
            memo[id(step)] = [o for o in tree_flatten(result)[0] if isinstance(o, torch.Tensor)]
        return memo[id(step)][source.index]
    raise TypeError(f"not a constant recipe: {source!r}")
