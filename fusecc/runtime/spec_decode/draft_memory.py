"""What a speculative draft will hold on the GPU, known before the target sizes its KV pool.

    weight_bytes, kv_bytes_per_block = draft_memory(spec, target_model, dtype)

The target's ModelRunner sizes its KV pool from gpu_memory_utilization first; the draft's weights and
its own KV pool (as many blocks as the target's, draft_loader.py) are allocated afterwards. Without
this the target takes the memory the draft then needs: an int4 self-draft's pool is as large as the
target's. The runner subtracts the weights from its budget and adds the per-block bytes to each
block's cost, as vLLM counts a draft's layers in its KV cache sizing.

layer_skip shares the target's weights and KV cache and ngram has neither: (0, 0). Weights are
estimated, not measured: a draft checkpoint by its tensors' element counts (from the safetensors
headers, nothing loaded), in the model's dtype or quantized; the target's quantized copy by its
decoder-layer matrices, quantized (router weights are counted as quantized too: a slight
overestimate, on the safe side).
"""

from __future__ import annotations

import math

import torch

from fusecc.runtime.spec_decode.config import SpeculativeConfig

def quantized_bytes(shape: tuple[int, ...], method: str) -> int:
    """Bytes of a [..., N, K] matrix quantized on the fly by `method`: its quantized parameters
    (fusecc/quantization/linear.py's layout, the one stacked experts share), made on the meta device."""
    from fusecc.quantization.config import resolve_quantization
    from fusecc.quantization.linear import quantized_weight_parameters

    *lead, n, k = shape
    params = quantized_weight_parameters(k, math.prod(lead) * n, resolve_quantization(method, None), device="meta")
    return sum(p.numel() * p.element_size() for p in params.values() if p is not None)


def draft_memory(spec: SpeculativeConfig | str | dict | None, target: torch.nn.Module,
                 dtype: torch.dtype) -> tuple[int, int]:
    """(weight bytes, KV bytes per block of one block_size) the draft of `spec` will allocate."""
    if spec is None:
        return 0, 0
    if not isinstance(spec, SpeculativeConfig):
        spec = SpeculativeConfig.parse(spec)
    if spec.method != "draft_model":
        return 0, 0
    itemsize = dtype.itemsize
    if spec.model is None:  # the target's quantized copy: its layers' matrices, the target's KV shapes
        weights = sum(quantized_bytes(tuple(p.shape), spec.quantization)
                      for name, p in target.named_parameters() if ".layers." in name and p.dim() >= 2)
        kv_heads, head_dim = target.kv_shape
        return weights, len(target.model.layers) * 2 * kv_heads * head_dim * itemsize
    return _checkpoint_weight_bytes(spec.model, itemsize, spec.quantization), _checkpoint_kv_bytes(spec.model, itemsize)


def _checkpoint_weight_bytes(path: str, itemsize: int, quantization: str | None) -> int:
    from safetensors import safe_open

    from fusecc.runtime.loader import safetensors_files

    total = 0
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if quantization is not None and ".layers." in name and name.endswith("proj.weight"):
                    total += quantized_bytes(shape, quantization)
                else:
                    total += math.prod(shape) * itemsize
    return total


def _checkpoint_kv_bytes(path: str, itemsize: int) -> int:
    from fusecc.runtime.loader import load_config
    from fusecc.runtime.models.llama import attention_shape

    config = load_config(path)
    _, kv_heads, head_dim = attention_shape(config)
    return config.num_hidden_layers * 2 * kv_heads * head_dim * itemsize
