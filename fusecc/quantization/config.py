"""What a model's quantization is: parsed from `EngineConfig.quantization` (on the fly) or from a
checkpoint's `quantization_config` (config.json), validated once, at load.

    QuantConfig(method="int4", bits=4, group_size=128, zero_point=True)     # on the fly, RTN
    QuantConfig(method="awq",  bits=4, group_size=128, zero_point=True)     # AutoAWQ GEMM checkpoint
    QuantConfig(method="gptq", bits=8, group_size=128, gptq_v1_zeros=True)  # GPTQ checkpoint
    QuantConfig(method="fp8",  bits=8, group_size=128, from_checkpoint=True)  # 128x128-block fp8
    QuantConfig(method="gguf", bits=4, group_size=32, zero_point=True)      # a GGUF file's Q4_0 (gguf_blocks.py)

`kind` says which kernel runs it: "weight_only" (quant_matmul.py, int4/int8) or "fp8" (fp8_matmul.py).
Every unsupported setting is refused here with one line naming it (ValueError), never mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass

# EngineConfig.quantization values (vLLM's names). int8/int4/fp8 quantize a float checkpoint at load;
# awq/gptq/fp8 name a quantized checkpoint's own method (detected from config.json when None).
ON_THE_FLY = ("int8", "int4", "fp8")
QUANTIZATION_METHODS = ("int8", "int4", "fp8", "awq", "gptq")
CHECKPOINT_METHODS = ("awq", "gptq", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
INT4_ON_THE_FLY_GROUP = 128


@dataclass(frozen=True)
class QuantConfig:
    method: str                  # one of QUANTIZATION_METHODS, or "gguf" (set by the GGUF loader only)
    bits: int                    # 4 or 8
    group_size: int              # input columns per scale; -1 = one per output channel
    zero_point: bool = False     # asymmetric (zeros stored) or symmetric
    from_checkpoint: bool = False
    gptq_v1_zeros: bool = False  # GPTQ "gptq" checkpoint_format: zeros stored minus one
    # fp8 checkpoints' scale tensor: weight_scale (per tensor / channel) or weight_scale_inv (128-blocks)
    fp8_scale_name: str = "weight_scale"

    @property
    def kind(self) -> str:
        return "fp8" if self.method == "fp8" else "weight_only"


def check_method_name(name: str | None) -> None:
    if name is not None and name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization={name!r} is not a known method; valid: "
                         f"{', '.join(QUANTIZATION_METHODS)} (or None)")


def resolve_quantization(requested: str | None, hf_config) -> QuantConfig | None:
    """The model's quantization: the checkpoint's `quantization_config` when it has one (`requested`
    must then be None or its method), else the on-the-fly method `requested` names, else None."""
    check_method_name(requested)
    declared = getattr(hf_config, "quantization_config", None)
    if declared is not None:
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        checkpoint = parse_checkpoint_config(declared)
        if requested is not None and requested != checkpoint.method:
            raise ValueError(f"quantization={requested!r} does not match the checkpoint's quant_method "
                             f"{checkpoint.method!r}; pass quantization=None (detected) or {checkpoint.method!r}")
        return checkpoint
    if requested is None:
        return None
    if requested not in ON_THE_FLY:
        raise ValueError(f"quantization={requested!r} needs a checkpoint quantized with {requested} (its "
                         f"config.json has no quantization_config); to quantize at load use one of "
                         f"{', '.join(ON_THE_FLY)}")
    if requested == "int8":
        return QuantConfig("int8", bits=8, group_size=-1)
    if requested == "int4":
        return QuantConfig("int4", bits=4, group_size=INT4_ON_THE_FLY_GROUP, zero_point=True)
    return QuantConfig("fp8", bits=8, group_size=-1)


def parse_checkpoint_config(qc: dict) -> QuantConfig:
    """A config.json `quantization_config` -> QuantConfig; ValueError naming an unsupported setting."""
    method = qc.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"checkpoint quantization_config.quant_method={method!r} is not supported; "
                         f"supported: {', '.join(CHECKPOINT_METHODS)}")
    if qc.get("modules_to_not_convert"):
        raise ValueError(f"checkpoint quantization_config.modules_to_not_convert="
                         f"{qc['modules_to_not_convert']!r} is not supported (every decoder linear must be quantized)")
    if method == "fp8":
        return _parse_fp8(qc)
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if method == "awq":
        _setting(bits == 4, "awq", "bits", bits, "only 4")
        version = str(qc.get("version", "gemm")).lower()
        _setting(version == "gemm", "awq", "version", version, "only gemm (gemv and marlin packings differ)")
        zero_point = qc.get("zero_point", True)
        _setting(zero_point is True, "awq", "zero_point", zero_point, "only true")
        _check_group(method, group)
        return QuantConfig("awq", 4, group, zero_point=True, from_checkpoint=True)
    _setting(bits in (4, 8), "gptq", "bits", bits, "4 or 8")
    desc_act = qc.get("desc_act", False)
    _setting(not desc_act, "gptq", "desc_act", desc_act, "only false (act-order reorders the input channels)")
    fmt = qc.get("checkpoint_format", "gptq")
    _setting(fmt in ("gptq", "gptq_v2"), "gptq", "checkpoint_format", fmt, "gptq or gptq_v2")
    sym = qc.get("sym", True)
    _setting(isinstance(sym, bool), "gptq", "sym", sym, "true or false")
    _check_group(method, group)
    # symmetric GPTQ still stores its zero point (2**(bits-1)) in qzeros: always read it
    return QuantConfig("gptq", bits, group, zero_point=True, from_checkpoint=True, gptq_v1_zeros=fmt == "gptq")


def _parse_fp8(qc: dict) -> QuantConfig:
    scheme = qc.get("activation_scheme", "dynamic")
    _setting(scheme == "dynamic", "fp8", "activation_scheme", scheme, "only dynamic (per-token scales)")
    fmt = qc.get("fmt", "e4m3")
    _setting(fmt == "e4m3", "fp8", "fmt", fmt, "only e4m3")
    block = qc.get("weight_block_size")
    if block is None:  # per-tensor or per-channel `weight_scale`
        return QuantConfig("fp8", 8, -1, from_checkpoint=True)
    _setting(list(block) == [128, 128], "fp8", "weight_block_size", block, "only [128, 128] (or none)")
    return QuantConfig("fp8", 8, 128, from_checkpoint=True, fp8_scale_name="weight_scale_inv")


def _check_group(method: str, group) -> None:
    if method == "gptq":  # GPTQ's -1: one group per output channel
        _setting(group in (32, 64, 128, -1), method, "group_size", group, "32, 64, 128 or -1")
    else:
        _setting(group in (32, 64, 128), method, "group_size", group, "32, 64 or 128")


def _setting(ok: bool, method: str, key: str, value, supported: str) -> None:
    if not ok:
        raise ValueError(f"{method} checkpoint setting {key}={value!r} is not supported ({supported})")


def check_device(quant: QuantConfig, device) -> None:
    """fp8 runs on GPUs with FP8 tensor cores (sm_89+) and, slowly, through the CPU reference."""
    import torch

    device = torch.device(device)
    if quant.kind == "fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise ValueError(f"quantization {quant.method!r} (fp8) needs a GPU with FP8 support (compute capability "
                             f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+, Ada/Hopper); "
                             f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
