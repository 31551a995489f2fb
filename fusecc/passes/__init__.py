"""The pass pipeline: one explicit ordered list (no registration on import).

The cheap local passes repeat in rounds until a round changes nothing; see pipeline.py.
Invariants every pass keeps are listed in README.md next to this file.
"""

from __future__ import annotations

from fusecc.config import FuseccOptions
from fusecc.passes.algebraic_simplification import AlgebraicSimplification
from fusecc.passes.attention_matching import AttentionMatching
from fusecc.passes.base import GraphPass, PassResult
from fusecc.passes.constant_folding import ConstantFolding
from fusecc.passes.cse import CommonSubexpressionElimination
from fusecc.passes.dce import DeadCodeElimination
from fusecc.passes.horizontal_matmul import HorizontalMatmulFusion
from fusecc.passes.moe_matching import MoEMatching
from fusecc.passes.pipeline import PassRecord, run_passes
from fusecc.passes.quantized_linear_matching import QuantizedLinearMatching
from fusecc.passes.reinplace import Reinplace


def build_pipeline(options: FuseccOptions) -> list[GraphPass]:
    passes: list[GraphPass] = [
        MoEMatching(),  # runs once, first: before constant folding turns the weights' transposes into copies
        QuantizedLinearMatching(),  # once, before constant folding would materialize the dequantized weights
        DeadCodeElimination(),
        ConstantFolding(max_bytes=options.constant_fold_max_bytes),
        AlgebraicSimplification(),
        CommonSubexpressionElimination(),
        DeadCodeElimination(),
        HorizontalMatmulFusion(max_bytes=options.constant_fold_max_bytes),  # once: frozen q/k/v -> one GEMM
        AttentionMatching(),  # runs once, after the fixed-point group
        Reinplace(),          # runs once: static KV-cache scatters become in-place writes
    ]
    known = {p.name for p in passes}
    unknown = set(options.disable_passes) - known
    if unknown:
        raise ValueError(
            f"fusecc: option 'disable_passes' names unknown pass(es) {sorted(unknown)}; passes are: "
            f"{sorted(known)} (fusion belongs to code generation, not to this list: codegen='aten' runs without it)"
        )
    return [p for p in passes if p.name not in options.disable_passes]


__all__ = ["GraphPass", "PassResult", "PassRecord", "build_pipeline", "run_passes"]
