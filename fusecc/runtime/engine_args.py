"""Engine arguments on the command line and as keyword arguments, built from EngineConfig's fields.

    parser = argparse.ArgumentParser()
    add_engine_args(parser.add_argument_group("engine"))     # --max-model-len, --enforce-eager, ...
    kwargs = engine_kwargs_from_cli(parser.parse_args())     # only the flags the user gave
    engine = LLMEngine.from_engine_args(model, **kwargs)     # check_engine_kwargs(kwargs) inside

Every flag's argparse default is None, so that a flag the user did not give is not passed on and
EngineConfig's own default holds (one place for defaults). Bool fields are
`--name/--no-name`; token-count fields take vLLM's human-readable sizes: a lowercase suffix is
decimal (4k = 4000, 1m = 10**6), an uppercase one binary (4K = 4096, 1M = 2**20).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing

from fusecc.runtime.config import EngineConfig, _field_types, check_field_type

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_token_count(text: str) -> int:
    """'2048', '2k' (2000), '2K' (2048), '1.5k' (1500), '1M' (1048576): as vLLM's human_readable_int."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT]?)", value)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid token count {text!r} (an integer, optionally with k/m/g or K/M/G)")
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    if "." in number:  # 1.5K is not a whole number of binary units: say which suffix was meant
        raise argparse.ArgumentTypeError(f"invalid token count {text!r}: decimals only with a lowercase "
                                         f"(decimal) suffix, e.g. {number}{suffix.lower()}")
    return int(number) * _BINARY.get(suffix, 1)


class _ExplicitNone:
    """`--seed none`: the user asked for None, which must not read as "flag not given" (None)."""

    def __repr__(self) -> str:
        return "None"


_EXPLICIT_NONE = _ExplicitNone()


def _optional(kind):
    """An argparse type for `X | None` fields: 'none' (any case) stands for None."""
    def parse(text: str):
        return _EXPLICIT_NONE if text.strip().lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _str_or_json(text: str):
    return json.loads(text) if text.lstrip().startswith("{") else text


def _cli_type(f: dataclasses.Field, annotation):
    args = set(typing.get_args(annotation)) or {annotation}
    if f.metadata.get("token_count"):
        return parse_token_count
    if dict in args:
        return _str_or_json
    kind = next(k for k in (int, float, str) if k in args)
    return _optional(kind) if type(None) in args else kind


def add_engine_args(parser_or_group) -> None:
    """Add `--field-name` for every EngineConfig field to an argparse parser or argument group."""
    hints = _field_types()
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if "(default: " not in help_text:  # a help that explains its default says it once
            help_text += f" (default: {f.default})"
        if hints[f.name] is bool:
            parser_or_group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                         help=help_text)
        else:
            parser_or_group.add_argument(flag, dest=f.name, type=_cli_type(f, hints[f.name]), default=None,
                                         metavar=f.name.upper(), help=help_text)


def engine_kwargs_from_cli(namespace: argparse.Namespace) -> dict:
    """The EngineConfig keyword arguments the user gave on the command line (flags left out are absent)."""
    given = {f.name: getattr(namespace, f.name, None) for f in dataclasses.fields(EngineConfig)}
    return {name: None if value is _EXPLICIT_NONE else value for name, value in given.items() if value is not None}


def check_engine_kwargs(kwargs: dict) -> None:
    """TypeError for a name that is no engine argument (listing the valid ones) or a value of the
    wrong type (naming the field). Value ranges are EngineConfig's to check."""
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    hints = _field_types()
    for name, value in kwargs.items():
        if name not in hints:
            raise TypeError(f"unknown engine argument {name!r}; valid engine arguments: {', '.join(names)}")
        check_field_type(name, value, hints[name])
