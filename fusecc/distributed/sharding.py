"""A built native model (Llama, Mistral, Qwen2, Qwen3, and the MoE families) -> this rank's shard.

    model = build_sharded_model(cls, hf_config, dtype, device, max_positions, iter_weights(path), tp)

The model is built with its big parameters (everything `torch.empty` makes: linears, embedding)
on the meta device, so nothing of the full size is allocated, then `shard_model` swaps its modules
for the parallel ones, allocated on `device` at their shard size, and the checkpoint is read once,
each full HF tensor handed to its parameter's `weight_loader`:

    self_attn.qkv_proj  -> ColumnParallelLinear, parts q | k | v by heads (KV heads replicated
                           when fewer than ranks); the module's head counts become the local ones
    self_attn.o_proj    -> RowParallelLinear over the local q heads (all-reduce after)
    mlp.gate_up_proj    -> ColumnParallelLinear, parts gate | up by rows
    mlp.down_proj       -> RowParallelLinear (all-reduce after)
    mlp.experts         -> ParallelMoEExperts, each expert's intermediate units split (all-reduce after);
                           a shared expert as mlp above; the router (mlp.gate) replicated
    embed_tokens        -> VocabParallelEmbedding;  lm_head -> ParallelLMHead (tied: the embedding's)

The model's `compute_logits` becomes the parallel head's (an instance attribute: logits are
all-gathered, so the runner sees [S, vocab] as before); its `kv_shape` reads the local KV heads,
so each rank's ModelRunner allocates a KV pool of its own heads only.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fusecc.distributed.linear import ColumnParallelLinear, RowParallelLinear
from fusecc.distributed.moe import ParallelMoEExperts, QuantizedParallelMoEExperts
from fusecc.distributed.shard import shard_range
from fusecc.distributed.state import TPGroup
from fusecc.distributed.vocab import ParallelLMHead, VocabParallelEmbedding
from fusecc.quantization.checkpoint import convert_checkpoint
from fusecc.quantization.config import QuantConfig
from fusecc.runtime.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _check_shape
from fusecc.runtime.models.moe import MoEExperts, MoEForCausalLM, SparseMoeBlock


def build_sharded_model(cls: type[LlamaForCausalLM], config, dtype: torch.dtype, device, max_positions: int | None,
                        weights: Iterable[tuple[str, torch.Tensor]] | None, tp: TPGroup,
                        quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """quant: a quantized checkpoint's format (its linears are built quantized, its tensors converted
    and sharded on the way in) or an on-the-fly method (the loaded float shards are quantized)."""
    from fusecc.runtime.loader import build_model

    with _EmptyOnMeta():  # the rope tables and norms are still computed on `device`
        model = build_model(cls, config, dtype, device, max_positions, None)
    shard_model(model, tp, device, quant if quant is not None and quant.from_checkpoint else None)
    if weights is not None:
        if quant is not None and quant.from_checkpoint:
            weights = convert_checkpoint(weights, quant)
        load_sharded_weights(model, weights)
    if quant is not None and not quant.from_checkpoint:
        quantize_sharded_linears(model, quant)
    return model.eval().requires_grad_(False)


def shard_model(model: LlamaForCausalLM, tp: TPGroup, device, quant: QuantConfig | None = None) -> LlamaForCausalLM:
    """Replace `model`'s linears, embedding and head by their parallel versions for rank tp.rank
    (in place; the new parameters are uninitialised, on `device`; the decoder linears in a quantized
    checkpoint's format `quant`); tensors still on the meta device (norms, rotary tables) are
    materialised on `device`."""
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"tensor parallelism supports the native Llama family, not {type(model).__name__}")
    dtype = model.model.norm.weight.dtype
    kw = dict(tp=tp, dtype=dtype, device=device)
    linear_kw = dict(kw, quant=quant)
    hidden = model.config.hidden_size
    for i, layer in enumerate(model.model.layers):
        _shard_attention(layer.self_attn, hidden, linear_kw, f"layer {i}")
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, hidden, linear_kw)
        elif type(layer.mlp) is LlamaMLP:
            _shard_mlp(layer.mlp, hidden, linear_kw)
        else:
            raise ValueError(f"layer {i}: tensor parallelism does not support {type(layer.mlp).__name__} yet")
    embed = model.model.embed_tokens
    model.model.embed_tokens = VocabParallelEmbedding(embed.num_embeddings, hidden, **kw)
    tied = model.model.embed_tokens if model.lm_head is None else None
    head = ParallelLMHead(model.config.vocab_size, hidden, tied=tied, **kw)
    if model.lm_head is not None:
        model.lm_head = head
    else:
        model.tp_lm_head = head  # a submodule, so .to() / .parameters() see it; its weight is the embedding's
    model.compute_logits = head.compute_logits
    _materialise(model, device)
    return model


def _shard_attention(attn: LlamaAttention, hidden: int, kw: dict, where: str) -> None:
    for proj in (attn.qkv_proj, attn.o_proj):
        if type(proj) is not nn.Linear:
            raise ValueError(f"{where}: tensor parallelism does not support {type(proj).__name__} projections yet")
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    tp = kw["tp"]
    local_q = shard_range(hq, tp.rank, tp.size, "num_attention_heads")[1]
    local_kv = shard_range(hkv, tp.rank, tp.size, "num_key_value_heads")[1]
    if hq < tp.size:
        raise ValueError(f"num_attention_heads={hq} < tensor_parallel_size={tp.size}")
    attn.qkv_proj = ColumnParallelLinear(hidden, [(hq, d), (hkv, d), (hkv, d)], attn.qkv_proj.bias is not None, **kw)
    attn.o_proj = RowParallelLinear(hq, d, hidden, attn.o_proj.bias is not None, **kw)
    attn.num_heads, attn.num_kv_heads = local_q, local_kv
    attn.q_size, attn.kv_size = local_q * d, local_kv * d
    attn.attn.num_heads, attn.attn.num_kv_heads = local_q, local_kv


def _shard_mlp(mlp: LlamaMLP, hidden: int, kw: dict) -> None:
    for proj in (mlp.gate_up_proj, mlp.down_proj):
        if type(proj) is not nn.Linear:
            raise ValueError(f"tensor parallelism does not support {type(proj).__name__} projections yet")
    inter, tp = mlp.intermediate, kw["tp"]
    mlp.gate_up_proj = ColumnParallelLinear(hidden, [(inter, 1), (inter, 1)], mlp.gate_up_proj.bias is not None, **kw)
    mlp.down_proj = RowParallelLinear(inter, 1, hidden, mlp.down_proj.bias is not None, **kw)
    mlp.intermediate = shard_range(inter, tp.rank, tp.size, "intermediate_size")[1]


def _shard_moe(block: SparseMoeBlock, hidden: int, kw: dict) -> None:
    """Experts split by intermediate units (distributed/moe.py), a shared expert like a dense MLP; the
    router and the shared expert's gate are replicated (materialised and loaded whole)."""
    experts, quant = block.experts, kw["quant"]
    if type(experts) is not MoEExperts:
        raise ValueError(f"tensor parallelism does not support {type(experts).__name__} experts yet")
    if quant is None:
        float_kw = {k: v for k, v in kw.items() if k != "quant"}
        block.experts = ParallelMoEExperts(experts.num_experts, hidden, experts.intermediate, **float_kw)
    else:  # a quantized checkpoint's experts
        block.experts = QuantizedParallelMoEExperts.empty(experts.num_experts, hidden, experts.intermediate,
                                                          kw["tp"], quant, kw["device"])
    if block.shared_expert is not None:
        _shard_mlp(block.shared_expert, hidden, kw)


def quantize_sharded_linears(model: LlamaForCausalLM, quant: QuantConfig) -> None:
    """On-the-fly quantization (int8 / int4 / fp8) of the loaded float shards, equal to sharding the
    unsharded model's quantized weights: column-parallel shards hold whole rows; row-parallel shards
    take per-channel scales from the full rows' max |w| (an all-reduce of the shards' maxima) and
    int4 groups that never straddle ranks (refused otherwise); MoE experts likewise (distributed/moe.py)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ParallelMoEExperts):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.quantized(quant))
        elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            try:
                module.quantize_(quant)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None


class _EmptyOnMeta(TorchFunctionMode):
    """torch.empty on the meta device: nn.Linear / nn.Embedding weights of the full model cost no
    memory and no init time (a 70B model would not fit one GPU); other factories are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _materialise(model: LlamaForCausalLM, device) -> None:
    """Parameters still on the meta device after sharding (none for the Llama family: its norms
    are made with torch.ones) are allocated on `device`; they are loaded next."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(p, device=device), requires_grad=False))
        for name, b in module.named_buffers(recurse=False):
            if b.is_meta:
                raise AssertionError(f"buffer {name} of {type(module).__name__} left on the meta device")


def load_sharded_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """LlamaForCausalLM.load_weights for a sharded model: the same HF names and stacking table,
    each full tensor given to its parameter's weight_loader (parallel layers) or copied whole
    (norms, row-parallel biases). Raises KeyError / ValueError as load_weights does."""
    params = dict(model.named_parameters())
    tied = model.lm_head is None
    loaded: set[str] = set()
    if isinstance(model, MoEForCausalLM):  # per-expert tensors go to the experts' expert_loader
        weights = model._load_experts(weights, loaded)
    for name, tensor in weights:
        if "rotary_emb" in name or (name == "lm_head.weight" and tied):
            continue
        target, part = name, None
        for ours, theirs, shard in LlamaForCausalLM._STACKED:
            if theirs in name:
                target, part = name.replace(theirs, ours), shard
                break
        if target not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no counterpart in {type(model).__name__}")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, part or 0)
        else:
            _check_shape(name, tensor, tuple(param.shape))
            param.data.copy_(tensor)
        loaded.add(target if part is None else f"{target}#{part}")
    missing = [n for n in params if not model._is_loaded(n, loaded)]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
    return loaded
