"""sympy index expressions -> Triton / Python source.

Indices are non-negative, so `//` (Triton truncates toward zero) agrees with floor division.
"""

from __future__ import annotations

import sympy
from torch.utils._sympy.functions import CleanDiv, FloorDiv, Mod, ModularIndexing, PythonMod
from torch.utils._sympy.functions import Max as TorchMax
from torch.utils._sympy.functions import Min as TorchMin


def print_expr(expr: sympy.Expr) -> str:
    expr = sympy.sympify(expr)
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    if isinstance(expr, sympy.Symbol):
        return expr.name
    if isinstance(expr, sympy.Add):
        terms = sorted(expr.args, key=sympy.default_sort_key)
        out = print_expr(terms[0])
        for term in terms[1:]:
            text = print_expr(term)
            out = f"{out} - {text[1:]}" if text.startswith("-") else f"{out} + {text}"
        return f"({out})"
    if isinstance(expr, sympy.Mul):
        coeff, rest = expr.as_coeff_Mul()
        factors = sympy.Mul.make_args(rest)
        body = " * ".join(_atom(f) for f in factors)
        if coeff == 1:
            return body
        if coeff == -1:
            return f"-{body}"
        return f"{print_expr(coeff)} * {body}"
    if isinstance(expr, (FloorDiv, CleanDiv)):
        return f"({_atom(expr.args[0])} // {_atom(expr.args[1])})"
    if isinstance(expr, ModularIndexing):
        base, divisor, modulus = expr.args
        inner = _atom(base) if divisor == 1 else f"({_atom(base)} // {_atom(divisor)})"
        return f"({inner} % {_atom(modulus)})"
    if isinstance(expr, (Mod, PythonMod, sympy.Mod)):
        return f"({_atom(expr.args[0])} % {_atom(expr.args[1])})"
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
        return " * ".join([_atom(expr.base)] * int(expr.exp))
    # Dynamo's symbolic sizes use torch's own Max/Min (not sympy's), e.g. the stride Max(1, s0 - 2)
    # of a size-1 dimension
    if isinstance(expr, (sympy.Max, TorchMax)):
        return _fold("max", expr.args)
    if isinstance(expr, (sympy.Min, TorchMin)):
        return _fold("min", expr.args)
    if isinstance(expr, sympy.Rational):
        raise ValueError(f"non-integer index expression {expr}")
    raise ValueError(f"cannot print index expression {expr!r} ({type(expr).__name__})")


def _atom(expr: sympy.Expr) -> str:
    text = print_expr(expr)
    if text.startswith("(") or text.replace("_", "").isalnum():
        return text
    return f"({text})"


def _fold(name: str, args) -> str:
    out = print_expr(args[0])
    for arg in args[1:]:
        out = f"{name}({out}, {print_expr(arg)})"
    return out
