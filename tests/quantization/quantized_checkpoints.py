"""Tiny AWQ / GPTQ / fp8 checkpoints written by the tests: a tiny fp32 Llama (tests/runtime/hf_checkpoints.py)
whose decoder linears are quantized here (round to nearest, the formats' own conventions) and packed by
the reference packers; the transformers model is returned with the dequantized weights loaded (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.quantization.packers import awq_pack, gptq_pack_cols, gptq_pack_rows
from tests.runtime.hf_checkpoints import save_tiny_checkpoint

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "w1", "w2", "w3")  # Mixtral's experts


def rtn_int4(w: torch.Tensor, group: int):
    """w [N, K] -> q [N, K] 0..15, zero [N, K/G] 0..15, scale fp16 [N, K/G]; W' = (q - zero) * scale."""
    N, K = w.shape
    wg = w.double().view(N, K // group, group)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half()
    s = scale.double()[..., None]
    zero = (-lo[..., None] / s).round().clamp(0, 15)
    q = (wg / s + zero).round().clamp(0, 15)
    return q.view(N, K).long(), zero[..., 0].long(), scale


def write_int4_checkpoint(path: Path, method: str, group: int = 32, arch: str = "llama", **config_extra):
    """method "awq" (GEMM) or "gptq" (v1: zeros stored minus one). Returns the dequantized oracle."""
    oracle = save_tiny_checkpoint(arch, path)
    dequantized = quantize_int4_in_place(path, method, group, **config_extra)
    oracle.load_state_dict(dequantized, strict=False)
    return oracle


def quantize_int4_in_place(path: Path, method: str, group: int, **config_extra) -> dict:
    """The decoder linears (experts' too) of the checkpoint in `path` quantized and packed as `method` does;
    returns {float tensor name: dequantized weight}."""
    tensors = load_file(str(path / "model.safetensors"))
    dequantized = {}
    for name in _linear_weights(tensors):
        prefix = name.rpartition(".")[0]
        q, z, s = rtn_int4(tensors.pop(name), group)
        col_group = torch.arange(q.shape[1]) // group
        dequantized[name] = ((q - z[:, col_group]).float() * s.float()[:, col_group])
        if method == "awq":
            tensors[f"{prefix}.qweight"] = awq_pack(q.t())
            tensors[f"{prefix}.qzeros"] = awq_pack(z.t())
        else:
            tensors[f"{prefix}.qweight"] = gptq_pack_rows(q.t(), 4)
            tensors[f"{prefix}.qzeros"] = gptq_pack_cols((z - 1).t(), 4)
            tensors[f"{prefix}.g_idx"] = (torch.arange(q.shape[1]) // group).int()
        tensors[f"{prefix}.scales"] = s.t().contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
          if method == "awq" else
          {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": False})
    _set_quantization_config(path, {**qc, **config_extra})
    return dequantized


def write_fp8_checkpoint(path: Path, block: bool = True):
    """fp8 (e4m3) weights with 128x128-block scales (`weight_scale_inv` [1, 1]: the tiny weights are one
    block) or per-tensor scales (`weight_scale` []); returns {linear name: dequantized weight}."""
    save_tiny_checkpoint("llama", path)
    return quantize_fp8_in_place(path, block)


def quantize_fp8_in_place(path: Path, block: bool) -> dict:
    tensors = load_file(str(path / "model.safetensors"))
    dequantized = {}
    for name in _linear_weights(tensors):
        w = tensors[name]
        scale = (w.abs().amax() / 448).reshape((1, 1) if block else ())
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv" if block else ".weight_scale")] = scale
        dequantized[name] = tensors[name].float() * scale
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _set_quantization_config(path, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    **({"weight_block_size": [128, 128]} if block else {})})
    return dequantized


def write_quantized_moe_checkpoint(path: Path, arch: str, method: str, group: int = 32):
    """A tiny MoE model (tests/runtime/test_moe_models.py) saved with per-expert tensors, as the hub has
    them, its decoder linears and experts quantized by `method` ("awq", "gptq" or "fp8": 128-blocks).
    Returns (transformers oracle holding the dequantized weights, {name: dequantized weight})."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tests.runtime.hf_checkpoints import tiny_tokenizer
    from tests.runtime.test_moe_models import hf_moe_model

    hf_moe_model(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    oracle_dir = path.parent / f"{path.name}_dequantized"
    shutil.copytree(path, oracle_dir)
    dequantized = (quantize_fp8_in_place(path, block=True) if method == "fp8"
                   else quantize_int4_in_place(path, method, group))
    floats = load_file(str(oracle_dir / "model.safetensors"))
    save_file({**floats, **dequantized}, str(oracle_dir / "model.safetensors"), metadata={"format": "pt"})
    oracle = AutoModelForCausalLM.from_pretrained(oracle_dir, dtype=torch.float32).eval()
    return oracle, dequantized


def _linear_weights(tensors: dict) -> list[str]:
    return [n for n in tensors if n.endswith(".weight") and n.rpartition(".")[0].rpartition(".")[2] in LINEARS]


def _set_quantization_config(path: Path, qc: dict) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
