"""The generated call function: the fused graph -> Python source that allocates outputs, launches
kernels, calls extern/ATen ops, and drops each buffer at its last use (`del`), so the caching
allocator hands its memory to the next allocation of that size.

    def call(args):
        arg0_1, arg1_1, s0 = args
        args.clear()
        buf0 = empty_strided((s0, 64), (64, 1), dtype=torch.float32, device=device(type='cuda', index=0))
        kernel_0[((s0 + 3) // 4,)](arg0_1, _frozen_param0, buf0, s0, s0, XBLOCK=4, RBLOCK=64, num_warps=2)
        view = aten_view_default(buf0, [s0, 64])
        mm = aten_mm_default(view, _frozen_param1); del view
        ...
        return (mm,)

A kernel is called by its fusion group's name (`kernel_0`), the name the fusion notes and the
dump's `kernels/kernel_0.py` use; the Triton function behind it is named after its structure
(`fused_reduction_3f2a...`), so groups of the same structure share one compiled kernel.
Groups the kernel writer cannot handle run as their FX submodule (ATen ops), never wrongly;
the reason goes to the dump.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

from fusecc.codegen.expr_printer import print_expr
from fusecc.codegen.index_math import CodegenUnsupported, sym
from fusecc.codegen.kernel_cache import default_cache_dir, kernel_cache
from fusecc.codegen.kernel_writer import KernelSource, KernelWriter
from fusecc.codegen.precompile import KernelLaunch, precompile, stand_in
from fusecc.graph.node_kinds import is_view


@dataclass
class CompiledWrapper:
    call: Callable
    source: str
    kernels: dict[str, KernelSource] = field(default_factory=dict)  # group name (kernel_N) -> source
    fallbacks: dict[str, str] = field(default_factory=dict)   # submodule -> why it runs as ATen
    launches_per_call: int = 0
    extern_calls_per_call: int = 0
    precompiled: int = 0             # distinct kernels compiled before the first call
    precompile_seconds: float = 0.0
    # what load_wrapper needs to rebuild `call` in another process (compile_cache/artifact.py):
    # the globals the source reads beyond base_globals(), and the kernel launches to precompile
    namespace: dict[str, Any] = field(default_factory=dict, repr=False)
    launch_examples: list[KernelLaunch] = field(default_factory=list, repr=False)


def base_globals() -> dict[str, Any]:
    """The globals every generated wrapper reads."""
    return {"torch": torch, "device": torch.device, "empty_strided": torch.empty_strided,
            "check_kernel": check_kernel, "fit_strides": fit_strides}


def load_wrapper(source: str, namespace: dict[str, Any]) -> Callable:
    """The boxed call function of a wrapper's source, with its globals."""
    scope = {**base_globals(), **namespace}
    exec(compile(source, "<fusecc-wrapper>", "exec"), scope)
    call = scope["call"]
    call._boxed_call = True
    return call


def compile_wrapper(gm: fx.GraphModule, cache_dir: Optional[str] = None, check_kernels: bool = False,
                    emulate_precision_casts: bool = True) -> CompiledWrapper:
    """`check_kernels` re-runs every generated kernel's group with ATen after it and raises on a
    mismatch naming the kernel (a debugging mode: slow). `emulate_precision_casts`: see
    FuseccOptions."""
    return _WrapperWriter(gm, cache_dir or str(default_cache_dir()), check_kernels, emulate_precision_casts).build()


def fit_strides(t: torch.Tensor, size: tuple, stride: tuple) -> torch.Tensor:
    """`t` (an ATen result) laid out as the graph's fake value says, which is how the kernels
    reading it index it. Fake strides are a prediction: for some ops and operand layouts (e.g.
    floor_divide of a contiguous and a transposed tensor) the real kernel returns another layout,
    and reading it with the predicted strides would permute the elements."""
    if all(real == expected for n, real, expected in zip(size, t.stride(), stride) if n > 1):
        return t
    out = torch.empty_strided(size, stride, dtype=t.dtype, device=t.device)
    return out.copy_(t)


# Ops whose real output layout is the fake one by construction: matmuls return fresh contiguous
# results and fusecc's own ops allocate their outputs like their fake implementations.
_TRUSTED_LAYOUT = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                   torch.ops.aten.baddbmm.default}


def check_kernel(name: str, group: fx.GraphModule, inputs: list, outputs: list) -> None:
    expected = group(*inputs)
    for i, (want, got) in enumerate(zip(expected, outputs)):
        if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3, equal_nan=True):
            diff = (got.float() - want.float()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"fusecc kernel {name} output {i} differs from ATen (max abs diff {diff})\n"
                                 f"{group.code}")


class _WrapperWriter:
    def __init__(self, gm: fx.GraphModule, cache_dir: str, check_kernels: bool = False,
                 emulate_precision_casts: bool = True):
        self.gm = gm
        self.emulate_precision_casts = emulate_precision_casts
        self.check_kernels = check_kernels
        self.cache = kernel_cache(cache_dir)
        self.lines: list[str] = []
        self.globals: dict[str, Any] = base_globals()
        self.symbol_source: dict[sympy.Symbol, str] = {}
        self.symbol_hint: dict[sympy.Symbol, int] = {}  # example values, for precompiling
        self.launch_examples: list[KernelLaunch] = []
        self.kernels: dict[str, KernelSource] = {}
        self.fallbacks: dict[str, str] = {}
        self.launches = 0
        self.externs = 0
        self.var_of: dict[fx.Node, str] = {}
        self.node_names = {n.name for n in gm.graph.nodes}

    # ----------------------------------------------------------------- rendering helpers

    def _global(self, prefix: str, value: Any) -> str:
        for name, existing in self.globals.items():
            if existing is value and name.startswith(prefix):
                return name
        # never a graph node's name: those are the call function's locals (`mul_5 = mul_5(...)`
        # would read the local before assignment)
        number = len(self.globals)
        while f"{prefix}{number}" in self.node_names or f"{prefix}{number}" in self.globals:
            number += 1
        name = f"{prefix}{number}"
        self.globals[name] = value
        return name

    def _expr(self, expr) -> str:
        expr = sym(expr) if not isinstance(expr, sympy.Expr) else expr
        missing = [s for s in expr.free_symbols if s not in self.symbol_source]
        if missing:
            raise CodegenUnsupported(f"no runtime source for symbol(s) {missing}")
        return print_expr(expr)

    def _render(self, arg) -> str:
        if isinstance(arg, fx.Node):
            return self.var_of[arg]
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(self._render(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
        if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self._expr(arg.node.expr)
        if isinstance(arg, float) and not math.isfinite(arg):
            return f"float('{arg}')"
        if arg is None or isinstance(arg, (bool, int, float, str)):
            return repr(arg)
        if isinstance(arg, (torch.dtype, torch.layout, torch.memory_format)):
            return repr(arg)
        if isinstance(arg, torch.device):
            return f"device({arg.type!r}, {arg.index!r})" if arg.index is not None else f"device({arg.type!r})"
        return self._global("_const", arg)

    def _bind_symbols(self, placeholders: list[fx.Node]) -> None:
        """Where each shape symbol's runtime value comes from: a SymInt input or a tensor dim."""
        for p in placeholders:
            val = p.meta.get("val")
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                if val.node.expr not in self.symbol_source:
                    self.symbol_source[val.node.expr] = p.name
                    self.symbol_hint[val.node.expr] = val.node.hint
                    self.lines.append(f"{val.node.expr.name} = {p.name}")
        for p in placeholders:
            val = p.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    if size.node.expr not in self.symbol_source:
                        self.symbol_source[size.node.expr] = f"{p.name}.size({d})"
                        self.symbol_hint[size.node.expr] = size.node.hint
                        self.lines.append(f"{size.node.expr.name} = {p.name}.size({d})")

    # ----------------------------------------------------------------- node emission

    def _shape_and_stride(self, val: torch.Tensor) -> str:
        """`(sizes), (strides)` of a value as wrapper source (symbolic sizes by their variables)."""
        shape = ", ".join(self._expr(sym(s)) for s in val.shape)
        stride = ", ".join(self._expr(sym(s)) for s in val.stride())
        comma = "," if val.dim() == 1 else ""
        return f"({shape}{comma}), ({stride}{comma})"

    def _alloc(self, name: str, val: torch.Tensor) -> None:
        self.lines.append(f"{name} = empty_strided({self._shape_and_stride(val)}, "
                          f"dtype={val.dtype!r}, device={self._render(val.device)})")

    def _emit_kernel(self, node: fx.Node) -> None:
        sub = self.gm.get_submodule(node.target)
        outputs = [None] * len(node.meta["val"])
        for user in node.users:
            if user.target is operator.getitem:
                outputs[user.args[1]] = user.name
        outputs = [o or f"{node.name}_unused{i}" for i, o in enumerate(outputs)]
        try:
            ks = KernelWriter(sub, self.emulate_precision_casts).write()
            fn = self.cache.load(ks)
            size_args = [self._expr(s) for s in ks.size_args]
            numel = self._expr(ks.numel)
        except CodegenUnsupported as exc:
            self._emit_fallback_module(node, sub, outputs, str(exc))
            return
        except Exception as exc:  # a codegen bug must not become a wrong answer or a crash
            self._emit_fallback_module(node, sub, outputs, f"codegen error {type(exc).__name__}: {exc}")
            return
        self.kernels[node.target] = ks
        for name, val in zip(outputs, node.meta["val"]):
            self._alloc(name, val)
        kernel_name = node.target  # the group's name: the same in the fusion notes and kernels/
        self.globals[kernel_name] = fn
        tensor_inputs = [a for a in node.args if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
        call_args = [self.var_of[a] for a in tensor_inputs] + outputs + size_args + [numel]
        meta = {"XBLOCK": ks.xblock, **({"RBLOCK": ks.rblock} if ks.rblock else {}), "num_warps": ks.num_warps}
        rendered_meta = ", ".join(f"{k}={v}" for k, v in meta.items())
        grid = f"(({numel} + {ks.xblock - 1}) // {ks.xblock},)"
        self.lines.append(f"if {numel} > 0: {kernel_name}[{grid}]({', '.join(call_args)}, {rendered_meta})")
        self.launches += 1
        self._record_launch_example(fn, ks, [a.meta["val"] for a in tensor_inputs] + list(node.meta["val"]), meta)
        if self.check_kernels:
            module = self._global(f"{node.target}_aten", sub)
            inputs = ", ".join(self._render(a) for a in node.args)
            self.lines.append(f"check_kernel({kernel_name!r}, {module}, [{inputs}], [{', '.join(outputs)}])")
        for user in node.users:
            self.var_of[user] = user.name

    def _record_launch_example(self, fn, ks: KernelSource, tensors: list, meta: dict) -> None:
        """The launch with the graph's example values, for precompile(); skipped where a size has
        no example value (unbacked) or anything else is unexpected: precompiling is optional."""
        try:
            ints = []
            for expr in list(ks.size_args) + [ks.numel]:
                expr = sym(expr) if not isinstance(expr, sympy.Expr) else expr
                hints = {s: self.symbol_hint.get(s) for s in expr.free_symbols}
                if any(h is None for h in hints.values()):
                    return
                ints.append(int(expr.subs(hints)))
            self.launch_examples.append(KernelLaunch(fn, [stand_in(t) for t in tensors] + ints, meta))
        except Exception:
            return

    def _emit_fallback_module(self, node: fx.Node, sub: fx.GraphModule, outputs: list, why: str) -> None:
        self.fallbacks[node.target] = why
        module = self._global(f"{node.target}_aten", sub)
        args = ", ".join(self._render(a) for a in node.args)
        bind = f"{', '.join(outputs)}, = " if outputs else ""  # a group of in-place writes returns nothing
        self.lines.append(f"{bind}{module}({args})  # runs as ATen: {why}")
        self.externs += 1
        for user in node.users:
            self.var_of[user] = user.name
        for name, val, user in zip(outputs, node.meta["val"], self._getitem_users(node, len(outputs))):
            self._fit_layout(name, val, user)

    @staticmethod
    def _getitem_users(node: fx.Node, count: int) -> list:
        users = [None] * count
        for user in node.users:
            if user.target is operator.getitem:
                users[user.args[1]] = user
        return users

    def _fit_layout(self, name: str, val, node: Optional[fx.Node]) -> None:
        """Make an ATen result match its fake layout where a generated kernel reads it."""
        if node is None or not isinstance(val, torch.Tensor) or not _read_by_kernel(node):
            return
        self.lines.append(f"{name} = fit_strides({name}, {self._shape_and_stride(val)})")

    def _emit_call(self, node: fx.Node) -> None:
        target = node.target
        if target is operator.getitem and node.args[0].op == "call_module":
            return  # bound by _emit_kernel
        name = node.name
        self.var_of[node] = name
        args = ", ".join([self._render(a) for a in node.args] +
                         [f"{k}={self._render(v)}" for k, v in node.kwargs.items()])
        if target is operator.getitem:
            self.lines.append(f"{name} = {self._render(node.args[0])}[{self._render(node.args[1])}]")
            source = node.args[0]
            if isinstance(source.target, torch._ops.OpOverload) and source.target.namespace != "fusecc":
                self._fit_layout(name, node.meta.get("val"), node)  # one result of a multi-output ATen op
            return
        label = str(target).replace(".", "_").replace("::", "_") if isinstance(target, torch._ops.OpOverload) \
            else getattr(target, "__name__", "fn")
        fn = self._global(f"{_identifier(label)}_", target)
        self.lines.append(f"{name} = {fn}({args})")
        val = node.meta.get("val")
        if isinstance(target, torch._ops.OpOverload) and not is_view(node) and target not in _TRUSTED_LAYOUT \
                and target.namespace != "fusecc":
            self._fit_layout(name, val, node)
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol) \
                and val.node.expr not in self.symbol_source:
            self.symbol_source[val.node.expr] = name
            self.lines.append(f"{val.node.expr.name} = {name}")
        if isinstance(target, torch._ops.OpOverload) and not is_view(node):
            self.externs += 1

    # ----------------------------------------------------------------- whole function

    def build(self) -> CompiledWrapper:
        graph = self.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for p in placeholders:
            self.var_of[p] = p.name
        unpack = ", ".join(p.name for p in placeholders)
        header = [f"{unpack}{',' if len(placeholders) == 1 else ''} = args" if placeholders else "pass",
                  "args.clear()"]
        self._bind_symbols(placeholders)
        last_use = _last_uses(graph)
        outputs = set(graph.output_node().all_input_nodes)
        for node in graph.nodes:
            if node.op == "get_attr":
                self.var_of[node] = node.name
                value = self.gm
                for part in node.target.split("."):
                    value = getattr(value, part)
                self.globals[node.name] = value
            elif node.op == "call_module":
                self._emit_kernel(node)
            elif node.op == "call_function":
                self._emit_call(node)
            elif node.op == "output":
                self.lines.append(f"return {self._render(tuple(node.args[0]) if isinstance(node.args[0], (list, tuple)) else node.args[0])}")
                continue
            dead = [self.var_of.get(n) for n in last_use.get(node, ())
                    if n not in outputs and n.op in ("call_function", "call_module") and self.var_of.get(n)]
            if dead:
                self.lines.append(f"del {', '.join(sorted(set(dead)))}")
        body = "\n".join("    " + line for line in header + self.lines)
        source = f"def call(args):\n{body}\n"
        base = base_globals()
        namespace = {name: value for name, value in self.globals.items() if name not in base}
        call = load_wrapper(source, namespace)
        precompiled, precompile_start = 0, time.perf_counter()
        if _is_cuda_graph(placeholders):
            precompiled = precompile(self.launch_examples)
        return CompiledWrapper(call=call, source=_documented(source, self.kernels), kernels=self.kernels,
                               fallbacks=self.fallbacks, launches_per_call=self.launches,
                               extern_calls_per_call=self.externs, precompiled=precompiled,
                               precompile_seconds=time.perf_counter() - precompile_start,
                               namespace=namespace, launch_examples=self.launch_examples)


def _read_by_kernel(node: fx.Node) -> bool:
    """Whether a generated kernel (call_module) reads `node`'s value, directly or through views."""
    pending, seen = [node], set()
    while pending:
        current = pending.pop()
        for user in current.users:
            if user.op == "call_module":
                return True
            if user.op == "call_function" and is_view(user) and user not in seen:
                seen.add(user)
                pending.append(user)
    return False


def _is_cuda_graph(placeholders: list[fx.Node]) -> bool:
    return any(isinstance(p.meta.get("val"), torch.Tensor) and p.meta["val"].is_cuda for p in placeholders)


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values whose last reader it is (so they can be deleted right after).
    A value stays alive while any view of it (evaluated in the wrapper) is alive."""
    root_of: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_function" and (is_view(node) or node.target is operator.getitem) and node.args \
                and isinstance(node.args[0], fx.Node) and node.args[0].op != "call_module":
            root_of[node] = root_of.get(node.args[0], node.args[0])
        else:
            root_of[node] = node
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            last[inp] = node
            last[root_of[inp]] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for value, reader in last.items():
        if reader.op != "output":
            out.setdefault(reader, []).append(value)
    return out


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _documented(source: str, kernels: dict[str, KernelSource]) -> str:
    listing = "".join(f"#   {name}: kernels/{name}.py (Triton {ks.name})\n" for name, ks in kernels.items())
    return "# fusecc generated wrapper\n" + (f"# kernels:\n{listing}" if kernels else "") + source
