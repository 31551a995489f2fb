"""Loading Hugging Face checkpoint folders written by transformers' save_pretrained."""

import json

import pytest
import torch

from fusecc.runtime import loader
from tests.runtime.hf_checkpoints import save_tiny_checkpoint, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sharded_checkpoint_with_index_loads_every_tensor(tmp_path):
    hf = save_tiny_checkpoint("qwen3", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = loader.load_model(tmp_path, torch.float32, "cpu")
    ours = model.model.layers[1].self_attn
    theirs = hf.model.layers[1].self_attn
    torch.testing.assert_close(ours.qkv_proj.weight, torch.cat([theirs.q_proj.weight, theirs.k_proj.weight,
                                                                 theirs.v_proj.weight]))
    torch.testing.assert_close(ours.k_norm.weight, theirs.k_norm.weight)
    mlp = hf.model.layers[0].mlp
    torch.testing.assert_close(model.model.layers[0].mlp.gate_up_proj.weight,
                               torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))


def test_bf16_load_keeps_rope_tables_in_fp32(tmp_path):
    save_tiny_checkpoint("llama", tmp_path)
    model = loader.load_model(tmp_path, torch.bfloat16, "cpu")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.rotary.cos.dtype == torch.float32


def test_tokenizer_and_eos_ids_load(tmp_path):
    save_tiny_checkpoint("qwen2", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = loader.load_tokenizer(tmp_path)
    assert tok.encode("w5 w6 w3", add_special_tokens=False) == [5, 6, 3]
    assert tok.decode([5, 6]) == "w5 w6"
    assert loader.eos_token_ids(tmp_path, loader.load_config(tmp_path), tok) == {2, 7}


def test_pickle_only_checkpoint_is_refused(tmp_path):
    hf = save_tiny_checkpoint("llama", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickle weights.*pytorch_model.bin.*safetensors"):
        loader.load_model(tmp_path, torch.float32, "cpu")


def test_unsupported_architecture_in_a_checkpoint(tmp_path):
    save_tiny_checkpoint("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'; supported: LlamaForCausalLM"):
        loader.load_model(tmp_path, torch.float32, "cpu")


def test_missing_tensor_and_missing_folder_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint("mistral", tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 1 tensors.*layers.1.mlp.gate_up_proj"):
        loader.load_model(tmp_path, torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        loader.load_config(tmp_path / "nope")


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.self_attn.q_proj.weight", "half"),   # would fill half of the stacked q rows
    ("model.layers.0.mlp.down_proj.weight", "one_row"),    # would broadcast into every row
    ("model.norm.weight", "one"),
])
def test_a_mis_shaped_tensor_is_refused_by_name(tmp_path, name, shape):
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    real = tensors[name].shape
    tensors[name] = torch.randn({"half": (real[0] // 2, *real[1:]), "one_row": (1, *real[1:]), "one": (1,)}[shape])
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{name}.*expects \({real[0]},"):
        loader.load_model(tmp_path, torch.float32, "cpu")


def test_missing_config_tokenizer_or_weight_map_are_named(tmp_path):
    save_tiny_checkpoint("llama", tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        loader.safetensors_files(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        loader.load_tokenizer(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        loader.load_config(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"])
def test_every_model_class_builds_on_the_load_device(arch):
    """build_model allocates under `with torch.device(device)`: a tensor a constructor makes on the
    CPU on purpose (transformers' scaled-RoPE init does) must follow to that device. The meta device
    stands in for CUDA here: mixing it with a CPU tensor fails as CUDA does."""
    from fusecc.runtime.loader import build_model, model_class
    from tests.runtime.hf_checkpoints import tiny_config
    from tests.runtime.transformers_families import family_config

    config = family_config(arch) if arch in ("mixtral", "qwen3_moe") else tiny_config(arch)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = build_model(model_class(config), config, torch.float32, "meta", None, None)
    placed = {name: t.device.type for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert set(placed.values()) == {"meta"}, placed
