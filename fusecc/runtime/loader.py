"""A local Hugging Face checkpoint directory -> our model, its config and its tokenizer.
(A GGUF file is fusecc/runtime/gguf.py's; the engine picks one of the two.)

    config.json                      transformers.AutoConfig (architecture, shapes, rope)
    model.safetensors                one file, or
    model-0000N-of-0000M.safetensors + model.safetensors.index.json (sharded)
    tokenizer files                  transformers.AutoTokenizer
    generation_config.json           optional: extra EOS ids (Llama 3 lists several)

Only safetensors are read: pickle checkpoints (*.bin, *.pt) can run code on load, so a directory
holding only those is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from fusecc.quantization import QuantConfig, resolve_quantization
from fusecc.quantization.config import check_device
from fusecc.quantization.model import finish_load, prepare_for_load
from fusecc.runtime.models.attention import take_kv_scales
from fusecc.runtime.models.llama import LlamaForCausalLM
from fusecc.runtime.models.registry import model_class, resolve_model_impl


def load_config(path: str | Path):
    from transformers import AutoConfig

    path = _checkpoint_dir(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def safetensors_files(path: str | Path) -> list[Path]:
    path = _checkpoint_dir(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
        shards = sorted(set(weight_map.values()))
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ValueError(f"{path} holds only pickle weights ({', '.join(pickles)}); fusecc loads safetensors only. "
                         f"Convert with transformers: AutoModelForCausalLM.from_pretrained(dir)"
                         f".save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"no *.safetensors weights in {path}")


def iter_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device | str,
               max_positions: int | None = None, config=None, model_impl: str = "fusecc",
               quantization: str | None = None) -> LlamaForCausalLM:
    """Build the registered model class for the checkpoint on `device` in `dtype` and load its weights;
    model_impl (EngineConfig.model_impl; the engine passes it) "transformers", or "auto" without a
    native class, wraps transformers' own model instead (models/transformers_backend.py).
    quantization (EngineConfig.quantization): an on-the-fly method, or None; a checkpoint with a
    `quantization_config` is loaded quantized either way (fusecc/quantization/)."""
    config = config if config is not None else load_config(path)
    quant = resolve_quantization(quantization, config)  # bad settings fail here, before any allocation
    if quant is not None:
        check_device(quant, device)
    if resolve_model_impl(config, model_impl) == "transformers":
        if quant is not None:
            raise ValueError(f"quantization {quant.method!r} needs a fusecc model class (model_impl fusecc); "
                             f"{(getattr(config, 'architectures', None) or ['?'])[0]} runs through transformers")
        from fusecc.runtime.models.transformers_backend import load_transformers_model

        safetensors_files(path)  # the same refusal of pickle-only folders as below
        return load_transformers_model(path, config, dtype, device)
    cls = model_class(config)
    files = safetensors_files(path)  # fail on a bad directory before allocating anything
    assert files
    return build_model(cls, config, dtype, device, max_positions, iter_weights(path), quant)


def build_model(cls: type[LlamaForCausalLM], config, dtype: torch.dtype, device, max_positions: int | None,
                weights, quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """Allocate (uninitialised) on the device, then copy `weights` (HF names) in; None = keep random init.
    quant: a quantized checkpoint's linears are built quantized and its tensors converted on the way in;
    an on-the-fly method quantizes the float linears once loaded."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`; the rope tables are explicitly fp32
    try:
        with torch.device(device):
            model = cls(config, max_positions=max_positions)
    finally:
        torch.set_default_dtype(previous)
    if weights is not None:
        model.load_weights(prepare_for_load(model, quant, take_kv_scales(model, weights)))
    finish_load(model, quant)
    return model.eval().requires_grad_(False)


def quantize_loaded(model, quantization: str | None, config):
    """On-the-fly quantization of a model loaded by another path (GGUF, the default model), whose
    config has no quantization_config: awq/gptq/fp8-checkpoint names are refused by resolve_quantization."""
    finish_load(model, resolve_quantization(quantization, config))
    return model


# tokenizer classes that mean "exactly the tokenizer.json on disk"; for these transformers 5's
# AutoTokenizer substitutes the model type's own tokenizer class (e.g. Qwen2Tokenizer), which
# rebuilds a different pipeline around the vocabulary
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint folder, or of a GGUF file (or a folder holding one)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from fusecc.runtime.gguf import GGUFCheckpoint, gguf_file

    if (gguf := gguf_file(path)) is not None:
        return GGUFCheckpoint(gguf).load_tokenizer()
    path = _checkpoint_dir(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                   "vocab.json")):
        raise FileNotFoundError(f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, "
                                f"tokenizer_config.json or vocab.json)")
    tok_config = path / "tokenizer_config.json"
    cls = json.loads(tok_config.read_text()).get("tokenizer_class") if tok_config.exists() else None
    if cls in _GENERIC_TOKENIZER_CLASSES and (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_token_ids(path: str | Path | None, config, tokenizer) -> set[int]:
    """EOS ids from the tokenizer, the model config and generation_config.json."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)]
    gen = _checkpoint_dir(path) / "generation_config.json" if path is not None else None
    if gen is not None and gen.exists():
        sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for s in sources:
        if isinstance(s, int):
            ids.add(s)
        elif isinstance(s, (list, tuple)):
            ids.update(int(t) for t in s)
    return ids


_DTYPES = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32,
           "float32": torch.float32}


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    """EngineConfig.dtype -> torch dtype. "auto": the checkpoint's torch_dtype (config.json), else
    bf16 on CUDA and fp32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    # transformers 5 names it `dtype`; reading the old `torch_dtype` alias prints a deprecation warning
    declared = getattr(hf_config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype) and declared in _DTYPES.values():
        return declared
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as the EngineConfig.dtype name; ValueError for a dtype the engine cannot run."""
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"engine argument dtype must be one of float16, bfloat16, float32, got {dtype}")


def resolve_device(name: str) -> torch.device:
    """EngineConfig.device -> torch device; "auto" = cuda when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# generation_config.json keys that are SamplingParams fields (vLLM's list), and their names there
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(setting: str, model: str | Path | None) -> dict:
    """SamplingParams defaults from generation_config.json (EngineConfig.generation_config):
    "auto" reads the model folder's, "vllm" (or "none") none, anything else is a folder holding one."""
    folder = None if setting in ("vllm", "none") else model if setting == "auto" else setting
    if folder is None:
        return {}
    path = _checkpoint_dir(folder) / "generation_config.json"
    if not path.exists():
        if setting != "auto":
            raise FileNotFoundError(f"generation_config {str(folder)!r} holds no generation_config.json")
        return {}
    data = json.loads(path.read_text())
    return {ours: data[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if data.get(theirs) is not None}


def _checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model {str(path)!r} is not a local directory (fusecc loads local Hugging Face "
                                f"checkpoint folders; it does not download)")
    return p
