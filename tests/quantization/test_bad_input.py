"""Unsupported quantization is refused at load, in one line naming the setting (ValueError)."""

import json

import pytest
import torch

from fusecc.quantization.config import QuantConfig, check_device, parse_checkpoint_config, resolve_quantization

AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


@pytest.mark.parametrize("qc,message", [
    ({**GPTQ, "desc_act": True}, "gptq checkpoint setting desc_act=True is not supported"),
    ({**GPTQ, "bits": 3}, "gptq checkpoint setting bits=3 is not supported (4 or 8)"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ({**AWQ, "version": "gemv"}, "awq checkpoint setting version='gemv' is not supported"),
    ({**AWQ, "group_size": 96}, "awq checkpoint setting group_size=96"),
    ({**AWQ, "zero_point": False}, "awq checkpoint setting zero_point=False"),
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes' is not supported; supported: awq, gptq, fp8"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8 checkpoint setting activation_scheme='static'"),
    ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size=[64, 64]"),
    ({**AWQ, "modules_to_not_convert": ["q_proj"]}, "modules_to_not_convert"),
])
def test_unsupported_checkpoint_settings(qc, message):
    with pytest.raises(ValueError) as exc:
        parse_checkpoint_config(qc)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_supported_settings_parse():
    assert parse_checkpoint_config(GPTQ) == QuantConfig("gptq", 4, 128, zero_point=True, from_checkpoint=True,
                                                        gptq_v1_zeros=True)
    assert parse_checkpoint_config({**GPTQ, "bits": 8, "checkpoint_format": "gptq_v2"}).gptq_v1_zeros is False
    assert parse_checkpoint_config({"quant_method": "fp8", "activation_scheme": "dynamic"}).group_size == -1


class _Config:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


def test_method_names():
    with pytest.raises(ValueError, match=r"quantization='int3' is not a known method; valid: int8, int4, fp8, awq, "
                                         r"gptq \(or None\)"):
        resolve_quantization("int3", _Config())
    with pytest.raises(ValueError, match="needs a checkpoint quantized with awq"):
        resolve_quantization("awq", _Config())
    with pytest.raises(ValueError, match="quantization='int8' does not match the checkpoint's quant_method 'awq'"):
        resolve_quantization("int8", _Config(AWQ))
    assert resolve_quantization("int4", _Config()) == QuantConfig("int4", 4, 128, zero_point=True)


def test_fp8_names_the_missing_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"needs a GPU with FP8 support \(compute capability 8\.9\+.*NVIDIA A100 "
                                         r"has 8\.0"):
        check_device(resolve_quantization("fp8", _Config()), "cuda")
    check_device(resolve_quantization("int4", _Config()), "cuda")  # weight-only int runs anywhere


def test_engine_refuses_before_loading(tmp_path):
    from fusecc.llm import LLM
    from tests.runtime.hf_checkpoints import save_tiny_checkpoint

    save_tiny_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {**GPTQ, "desc_act": True}}))
    with pytest.raises(ValueError, match="^gptq checkpoint setting desc_act=True is not supported"):
        LLM(str(tmp_path), enforce_eager=True, max_model_len=64)
    with pytest.raises(ValueError, match="EngineConfig.quantization must be one of int8, int4, fp8, awq, gptq"):
        LLM(str(tmp_path), enforce_eager=True, quantization="nf4")


def test_act_order_g_idx_is_refused(tmp_path):
    from fusecc.runtime import loader
    from tests.quantization.quantized_checkpoints import write_int4_checkpoint
    from safetensors.torch import load_file, save_file

    write_int4_checkpoint(tmp_path, "gptq")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()  # desc_act=false claimed, channels reordered
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"'{name}' reorders the input channels"):
        loader.load_model(tmp_path, torch.float32, "cpu", 64)
