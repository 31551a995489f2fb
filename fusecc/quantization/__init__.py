"""Quantized weights: formats, checkpoint conversion, on-the-fly quantization, quantized linears.

    config.py      QuantConfig: parsed from EngineConfig.quantization or a checkpoint's quantization_config
    packing.py     AWQ / GPTQ / fp8 checkpoint tensors -> fusecc layouts; round-to-nearest quantization
    checkpoint.py  a checkpoint's tensor stream converted on the way to the model's load_weights
    linear.py      WeightOnlyLinear / Fp8Linear: one custom-op call each (fusecc/ops.py)
    model.py       which linears are quantized, and the load hooks (prepare_for_load, finish_load)
    gguf_blocks.py GGUF Q8_0 / Q4_0 blocks -> fusecc int8 / int4 (exact; the GGUF loader uses it)

Used by the runtime's loader (fusecc/runtime/loader.py) and, later, by the compiler. Kernels:
fusecc/kernels/quant_matmul.py (int4/int8 weight-only) and fusecc/kernels/fp8_matmul.py (W8A8 fp8).
This package's top level imports only config.py (no torch kernels), so EngineConfig can validate names.
"""

from fusecc.quantization.config import (ON_THE_FLY, QUANTIZATION_METHODS, QuantConfig, check_method_name,
                                        parse_checkpoint_config, resolve_quantization)

__all__ = ["ON_THE_FLY", "QUANTIZATION_METHODS", "QuantConfig", "check_method_name", "parse_checkpoint_config",
           "resolve_quantization"]
