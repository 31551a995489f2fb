"""`aot_compile`: a function compiled with fusecc once, loaded by later processes without tracing.

    from fusecc.compile_cache import aot_compile
    step = aot_compile(decode_step, (model, input_ids))   # cold: Dynamo + AOTAutograd + fusecc, stored
    logits = step(model, input_ids)                       # warm process: loaded, nothing traced

Built on torch's AOT compile (torch/_dynamo/aot_compile.py): `torch.compile(fn, fullgraph=True)
.aot_compile(example)` captures the whole function with Dynamo once, the fusecc backend returns a
FuseccCompiledGraph (a SerializableCallable), and `save_compiled_function` /
`torch.compiler.load_compiled_function` write and read Dynamo's bytecode, the guards and our
graph. The entry lives in `$FUSECC_CACHE_DIR/functions/<key>.fcc`.

The key holds the function's code (its source file), the classes and configs of the modules
passed to it, the inputs' shapes/dtypes/devices, the options, fusecc's own source and the
versions. Guards kept: tensor metadata, dynamic-shape relations, global state (grad mode,
autocast) and the values of Python arguments and attributes; a call they reject runs through
plain torch.compile. Guards on object identities (the model, its functions) and on globals cannot
be serialized and are dropped, so a function whose behaviour depends on something outside the key
must not use this (as with vLLM's compiled models: the model's code and config decide its graph).

Where torch has no AOT compile, or the function cannot be captured whole or stored, this logs why
and returns plain `torch.compile(fn, backend="fusecc")` (whose graphs the backend still caches).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten

from fusecc.compile_cache.key import describe_value, digest, shape_settings, system_factors
from fusecc.compile_cache.location import functions_dir
from fusecc.compile_cache.stats import counters
from fusecc.compile_cache.store import discard, read_entry, write_entry

log = logging.getLogger("fusecc.compile_cache")

# the entry of a function that cannot be compiled ahead of time (its next process goes straight to
# torch.compile instead of tracing it once more in vain)
NOT_COMPILABLE = b""


# guard kinds torch cannot serialize (CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES):
# identities of Python objects (the model, its functions) that a new process cannot have
_UNSERIALIZABLE = ("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH", "MODULE_MATCH",
                   "CLOSURE_MATCH", "WEAKREF_ALIVE")


def serializable_guards(guard_entries) -> list[bool]:
    """Keep every guard a new process can check: tensor metadata, dynamic-shape relations, global
    state (grad mode, autocast), and the values of Python arguments and attributes (a flag that
    selects another graph); drop object identities and globals (the key holds the code instead)."""
    keep = []
    for g in guard_entries:
        kinds = (g.guard_type, *(getattr(g, "derived_guard_types", None) or ()))
        unserializable = any(kind in _UNSERIALIZABLE for kind in kinds) or \
            getattr(getattr(g, "orig_guard", None), "_unserializable", False)
        keep.append(g.guard_type in ("GLOBAL_STATE", "SHAPE_ENV") or (not g.is_global and not unserializable))
    return keep


class GuardedFunction:
    """A loaded (or just compiled) function that checks its guards itself: a call they reject (an
    input of another shape class, another value of a Python flag) runs through plain
    torch.compile(backend="fusecc") instead of raising, as torch's loaded function would."""

    def __init__(self, compiled, fallback: Callable[[], Callable]):
        self.compiled = compiled
        self._make_fallback = fallback
        self._fallback = None
        compiled.disable_guard_check()

    def __call__(self, *args, **kwargs):
        if self.compiled.guard_check(*args, **kwargs):
            return self.compiled(*args, **kwargs)
        if self._fallback is None:
            log.warning("fusecc: a call does not match the guards of the ahead-of-time compiled function; "
                        "compiling it with torch.compile")
            self._fallback = self._make_fallback()
        return self._fallback(*args, **kwargs)


def aot_compile(fn: Callable, args: tuple, kwargs: Optional[dict] = None, *, options: Optional[dict] = None,
                mode: Optional[str] = None, dynamic: Optional[bool] = None) -> Callable:
    kwargs = dict(kwargs or {})
    options = dict(options or {})
    missing = missing_torch_support()
    if missing:
        log.warning("fusecc: %s; using torch.compile (Dynamo traces in every process)", missing)
        return torch.compile(fn, backend="fusecc", mode=mode, dynamic=dynamic, options=options)
    def plain():
        return torch.compile(fn, backend="fusecc", mode=mode, dynamic=dynamic, options=options)

    compiled = load_or_compile(fn, args, kwargs, options=options, mode=mode, dynamic=dynamic)
    return GuardedFunction(compiled, plain) if compiled is not None else plain()


def load_or_compile(fn: Callable, args: tuple, kwargs: dict, *, options: dict, mode: Optional[str] = None,
                    dynamic: Optional[bool] = None,
                    while_compiling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    """torch's AOTCompiledFunction for `fn` at this example: loaded from the cache (only where its
    guards accept the example), or compiled (and stored); None (with a warning saying why) where it
    cannot be compiled ahead of time. It raises on a call its guards reject unless
    `disable_guard_check()` (check `guard_check` first). `while_compiling()` is entered around the
    key and the compilation, not around the guard check (PrecompiledForward's Dynamo markings).

    dynamic=True: looked up by the arguments' shape class first (describe_value), then by their
    exact shapes, where a stored function for the class was specialised to other sizes."""
    from fusecc.compile_cache.graph_cache import cache_enabled

    if not cache_enabled():  # nothing to store it in: compiling ahead of time would gain nothing
        return None
    with while_compiling():
        keys = [function_key(fn, args, kwargs, options, mode, dynamic, shape_class=True)] if dynamic else []
        keys.append(function_key(fn, args, kwargs, options, mode, dynamic))
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    from fusecc.config import FuseccOptions

    dumping = bool(FuseccOptions.from_sources(mode=mode, options=options).dump_dir)
    rejected = set()
    for key in ([] if dumping else keys):  # a dump shows the compilation
        payload = read_entry(functions_dir(), key)
        if payload == NOT_COMPILABLE:  # an earlier process found out: do not trace it in vain again
            counters["function_hits_not_compilable"] += 1
            return None
        loaded = _load(key, fn, payload) if payload is not None else None
        if loaded is not None and loaded.guard_check(*args, **kwargs):
            counters["function_hits"] += 1
            return loaded
        if loaded is not None:
            counters["function_guard_rejects"] += 1
            rejected.add(key)
    counters["function_misses"] += 1
    store_key = next((key for key in keys if key not in rejected), keys[-1])
    try:
        with while_compiling():
            compiled = _compile(fn, args, kwargs, options, mode, dynamic)
    except Exception as exc:  # a graph break, an unstorable graph or guard: compile it the usual way
        why = f"{type(exc).__name__}: {_first_line(exc)}"
        log.warning("fusecc: %s cannot be compiled ahead of time (%s); using torch.compile", name, why)
        try:
            write_entry(functions_dir(), store_key, NOT_COMPILABLE,
                        f"not compilable ahead of time: {name}: {why}"[:300])
        except OSError:
            pass
        return None
    _store(store_key, compiled, f"function {name}")
    return compiled


def function_key(fn: Callable, args: tuple, kwargs: dict, options: dict, mode, dynamic,
                 shape_class: bool = False) -> str:
    from fusecc.compile_cache.graph_cache import options_factors
    from fusecc.config import FuseccOptions

    resolved = FuseccOptions.from_sources(mode=mode, options=options)
    leaves, _ = tree_flatten((args, kwargs))
    described, modules = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.nn.Module):
            described.append(("module", type(leaf).__module__, type(leaf).__qualname__))
            modules.append(leaf)
        else:
            described.append(describe_value(leaf, dynamic=shape_class))
    device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), None)
    if device is None:
        device = next((p.device for m in modules for p in m.parameters()), None)
    return digest([system_factors(device), shape_settings(), sorted(options_factors(resolved).items()), mode,
                   dynamic, _code_identity(fn), [_module_identity(m) for m in modules], described])


def _code_identity(fn: Callable) -> tuple:
    target = inspect.unwrap(fn)
    return (getattr(target, "__module__", None), getattr(target, "__qualname__", None), _file_hash(target))


def _module_identity(module: torch.nn.Module) -> tuple:
    """A module's class, the source files of its classes and their submodules' classes, its config
    and the shapes/dtypes of its parameters and buffers."""
    files = sorted({_file_hash(cls) for cls in {type(m) for m in module.modules()}})
    tensors = [(name, describe_value(t)) for name, t in list(module.named_parameters()) + list(module.named_buffers())]
    config = getattr(module, "config", None)
    return (type(module).__qualname__, files, repr(config.to_dict() if hasattr(config, "to_dict") else config),
            tensors, module.training)


def _file_hash(obj) -> str:
    try:
        path = inspect.getsourcefile(obj)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError):
        return f"no source: {getattr(obj, '__qualname__', repr(obj))}"


def missing_torch_support() -> Optional[str]:
    if not hasattr(torch._dynamo.config, "enable_aot_compile"):
        return f"torch {torch.__version__} has no AOT compile (torch._dynamo.config.enable_aot_compile)"
    if not hasattr(torch.compiler, "load_compiled_function"):
        return f"torch {torch.__version__} has no torch.compiler.load_compiled_function"
    from torch._dynamo import aot_compile as dynamo_aot_compile

    compiled_type = getattr(dynamo_aot_compile, "AOTCompiledFunction", None)
    if not all(hasattr(compiled_type, name) for name in ("guard_check", "disable_guard_check",
                                                           "save_compiled_function")):
        return f"torch {torch.__version__}'s AOTCompiledFunction lacks guard_check/save_compiled_function"
    from fusecc.compile_cache.compiled_graph import HAS_SERIALIZABLE_CALLABLE

    if not HAS_SERIALIZABLE_CALLABLE:
        return f"torch {torch.__version__} has no SerializableCallable for backends"
    return None


def _compile(fn, args, kwargs, options, mode, dynamic):
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = torch.compile(fn, backend="fusecc", fullgraph=True, mode=mode, dynamic=dynamic,
                                 options={**options, "guard_filter_fn": serializable_guards})
        return compiled.aot_compile((tuple(args), kwargs))


def _load(key: str, fn: Callable, payload: bytes):
    try:
        loaded = torch.compiler.load_compiled_function(io.BytesIO(payload), f_globals=_globals_of(fn))
    except Exception as exc:  # another torch or fusecc wrote it, or it no longer loads
        discard(functions_dir() / f"{key}.fcc", f"cannot be loaded: {type(exc).__name__}: {_first_line(exc)}")
        counters["function_discarded"] += 1
        return None
    return loaded


def _store(key: str, compiled, description: str) -> None:
    directory = functions_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".save.", suffix=".tmp")
        os.close(fd)
        try:
            compiled.save_compiled_function(tmp)
            with open(tmp, "rb") as f:
                payload = f.read()
        finally:
            os.unlink(tmp)
        write_entry(directory, key, payload, description)
        counters["function_stores"] += 1
    except Exception as exc:  # unserializable guards or graph: this process still runs it
        log.warning("fusecc: compiled function not stored (%s: %s)", type(exc).__name__, _first_line(exc))


def _globals_of(fn: Callable) -> dict[str, Any]:
    target = inspect.unwrap(fn)
    module = sys.modules.get(getattr(target, "__module__", None) or "")
    return getattr(target, "__globals__", None) or (vars(module) if module is not None else {})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
