"""Backend options: one dataclass, filled from defaults, then `FUSECC_*` environment
variables, then `torch.compile(..., mode=..., options={...})` (later sources win; the flags a
mode implies, e.g. reduce-overhead -> cudagraphs, beat the environment but not options=).

    torch.compile(model, backend="fusecc", options={"freeze": True, "dump_dir": "/tmp/dump"})
    FUSECC_FREEZE=1 FUSECC_DUMP_DIR=/tmp/dump python run.py

Every field below is also an environment variable: `FUSECC_<FIELD NAME IN CAPITALS>`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_MODE_FLAGS: dict[str, dict[str, bool]] = {
    "default": {},
    "reduce-overhead": {"cudagraphs": True},
    "max-autotune": {"cudagraphs": True, "autotune": True},
    "max-autotune-no-cudagraphs": {"autotune": True},
}
# FUSECC_* variables that are not backend options: the compile cache (its folder, and a switch to
# turn it off: fusecc/compile_cache/), the runtime's default model, the server's API key, and test
# hooks. Any other FUSECC_* name is a typo of an option and warns.
OTHER_ENVIRONMENT_VARIABLES = ("FUSECC_CACHE_DIR", "FUSECC_DISABLE_COMPILE_CACHE", "FUSECC_API_KEY",
                               "FUSECC_DEFAULT_MODEL", "FUSECC_FAKE_TOKEN_DELAY", "FUSECC_UPDATE_GOLDEN")


@dataclass
class FuseccOptions:
    # Treat parameters and buffers that the graph does not mutate as constants. Enables
    # constant folding of weight transposes/casts; results go stale if weights are later
    # changed in place, which is why it is off unless asked for (the runtime turns it on).
    freeze: bool = False
    # Write a per-graph folder of pass dumps and a report here ("" = off).
    dump_dir: str = ""
    # Constant folding never materialises a new constant larger than this many bytes.
    constant_fold_max_bytes: int = 64 * 1024 * 1024
    # Cheap passes are repeated until nothing changes, at most this many rounds.
    max_pass_rounds: int = 4
    # Names of passes to skip (comma-separated in the environment variable).
    disable_passes: tuple[str, ...] = ()
    # Run the graph verifier after every pass (lint, meta['val'] consistency, aliasing).
    verify: bool = True
    # Capture the compiled call in a CUDA graph (set by mode="reduce-overhead").
    cudagraphs: bool = False
    # The graph's attention kernels time their tile configs on first use instead of launching a
    # hand-picked one (set by mode="max-autotune*"; see fusecc/kernels/attention_tile.py).
    autotune: bool = False
    # How the optimized graph runs: "triton" (fusion + generated kernels; on CPU tensors this
    # needs TRITON_INTERPRET=1), "aten" (the optimized ATen graph as an FX module), or "auto"
    # (triton for CUDA graphs, aten otherwise).
    codegen: str = "auto"
    # Generated kernels compute fp16/bf16 math in fp32; with this on, every fp16/bf16 intermediate is
    # rounded to its dtype where eager would round it (as Inductor's emulate_precision_casts), so
    # results track eager instead of a differently-rounded, slightly more precise answer. Costs a
    # few ALU ops in memory-bound kernels.
    emulate_precision_casts: bool = True
    # Debugging: after every generated kernel, recompute its group with ATen and raise on a mismatch.
    check_kernels: bool = False
    # Raise compilation errors instead of warning and running the graph unoptimized.
    strict: bool = False
    mode: str = "default"
    # Extra info kept for the report; not an option users set.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fusecc: unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.codegen not in ("auto", "triton", "aten"):
            raise ValueError(f"fusecc: option 'codegen' must be 'auto', 'triton' or 'aten', got {self.codegen!r}")
        if self.constant_fold_max_bytes < 0:
            raise ValueError("fusecc: option 'constant_fold_max_bytes' must be >= 0")
        if self.max_pass_rounds < 1:
            raise ValueError("fusecc: option 'max_pass_rounds' must be >= 1")

    @classmethod
    def from_sources(
        cls,
        mode: Optional[str] = None,
        options: Optional[Mapping[str, Any]] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> "FuseccOptions":
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in _user_fields()}
        _warn_unknown_variables(environ, known)
        values: dict[str, Any] = {}
        for f in known.values():
            env_name = "FUSECC_" + f.name.upper()
            if env_name in environ:
                values[f.name] = _parse(f, environ[env_name], source=env_name)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"fusecc: options must be a dict, got {type(options).__name__}")
        explicit: dict[str, Any] = {}
        for name, value in (options or {}).items():
            if name not in known:
                raise ValueError(f"fusecc: unknown option {name!r}{_did_you_mean(str(name), known)}; "
                                 f"known options: {', '.join(sorted(known))}")
            explicit[name] = _coerce(known[name], value, source=f"options[{name!r}]")
        # torch.compile(mode=...) or options={"mode": ...} or FUSECC_MODE, in that order. A mode
        # implies flags (reduce-overhead -> cudagraphs), overriding the environment; a flag given
        # explicitly in options= overrides the mode.
        mode = mode or explicit.get("mode") or values.get("mode") or "default"
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"fusecc: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        values["mode"] = mode
        values.update(_MODE_FLAGS[mode])
        values.update({k: v for k, v in explicit.items() if k != "mode"})
        return cls(**values)


def _did_you_mean(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _warn_unknown_variables(environ: Mapping[str, str], known: dict) -> None:
    option_variables = {"FUSECC_" + name.upper() for name in known}
    for variable in environ:
        if variable.startswith("FUSECC_") and variable not in option_variables \
                and variable not in OTHER_ENVIRONMENT_VARIABLES:
            # the warnings module shows each distinct message once per call site
            warnings.warn(f"fusecc: environment variable {variable} is not a fusecc option and is ignored"
                          f"{_did_you_mean(variable, option_variables | set(OTHER_ENVIRONMENT_VARIABLES))}",
                          stacklevel=3)


def _user_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(FuseccOptions) if f.name != "extra"]


def _parse(f: dataclasses.Field, text: str, source: str) -> Any:
    """Environment variables are strings; turn them into the field's type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"fusecc: {source}={text!r} is not a boolean (use 1/0, true/false)")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"fusecc: {source}={text!r} is not an integer") from None
    if kind.startswith("tuple"):
        return tuple(p.strip() for p in text.split(",") if p.strip())
    return text


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """options= values are Python values and must have the option's type: only environment
    variables are parsed from text. So {"freeze": 1}, {"freeze": "1"} and {"freeze": "banana"} are
    all refused alike, with the same error, rather than some read as booleans."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool" and not isinstance(value, bool):
        raise TypeError(f"fusecc: {source} must be True or False, got {value!r} ({type(value).__name__})")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"fusecc: {source} must be an int, got {value!r} ({type(value).__name__})")
    if kind.startswith("tuple") and isinstance(value, str):
        return _parse(f, value, source)  # "cse,dce", as in the environment variable
    if kind == "str":
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise TypeError(f"fusecc: {source} must be a str, got {type(value).__name__}")
    if kind.startswith("tuple"):
        if not isinstance(value, (tuple, list, set, frozenset)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"fusecc: {source} must be a tuple of str (or a comma-separated str), "
                            f"got {value!r}")
        return tuple(value)
    return value
