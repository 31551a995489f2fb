"""Our compact Llama-family decoder over a flat token batch and the paged KV cache.

Covers Llama 2/3 (GQA, llama3 rope scaling), Mistral, Qwen2 (q/k/v bias) and Qwen3 (RMSNorm on
q and k per head). q/k/v and gate/up projections are fused into one matmul each; `load_weights`
maps Hugging Face names onto them:

    model.layers.N.self_attn.{q,k,v}_proj.*  -> model.layers.N.self_attn.qkv_proj.*   (shard q|k|v)
    model.layers.N.mlp.{gate,up}_proj.weight -> model.layers.N.mlp.gate_up_proj.weight (shard gate|up)

    hidden = model(input_ids [T], positions [T], kv_caches, attn_metadata)   # [T, hidden], final-normed
    logits = model.compute_logits(hidden[sample_indices])                    # [S, vocab] float32
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from fusecc.kernels.qk_rope import rms_norm, rotate
from fusecc.runtime.models.attention import AttentionMetadata, PagedAttention

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LAYER_KINDS_LIMIT = 512  # distinct decoder-layer kinds one forward may trace (see LlamaDecoderLayer)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # as transformers: normalised in fp32, cast back, scaled


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a transformers config; KV heads default to the query heads
    (no GQA), head_dim to hidden_size / heads."""
    heads = config.num_attention_heads
    return (heads, getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies, as transformers computes them for the supported rope types."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial_rotary_factor != 1 is not supported")
    # on the CPU whatever device the model is built under, as transformers computes them at init
    # (a GPU's pow may differ by an ulp, which the angles multiply by the position)
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        return 1.0 / (base ** exponents)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with torch.device("cpu"):  # the initialisers make tensors without a device argument too
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    assert scaling == 1.0, (rope_type, scaling)
    return inv_freq.float()


class Rotary(nn.Module):
    """Non-interleaved RoPE (rotate_half), cos/sin tables indexed by position."""

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        # transformers' scaled RoPE initialisers build inv_freq on the CPU; the positions follow any
        # `with torch.device(...)` the model is built under
        freqs = torch.outer(positions, rope_inv_freq(config, head_dim).to(positions.device))
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.cos, self.sin, positions)  # x [T, heads, D]; cos/sin cast to x's dtype first


class LlamaAttention(nn.Module):
    def __init__(self, config, rotary: Rotary, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = attention_shape(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x, positions, kv_cache, md: AttentionMetadata):
        q, k, v = self.project_qkv(x, positions)
        return self.project_output(self.attn(q, k, v, kv_cache, md))

    def project_qkv(self, x, positions):
        """x [T, hidden] -> q [T, Hq, D], k and v [T, Hkv, D], q and k rotated."""
        qkv = self.qkv_proj(x)
        if qkv.is_cuda:  # norms and rotations in one kernel (kernels/qk_rope.py) instead of four generated ones
            q, k = torch.ops.fusecc.qk_norm_rope(
                qkv, positions, self.rotary.cos, self.rotary.sin, None if self.q_norm is None else self.q_norm.weight,
                None if self.k_norm is None else self.k_norm.weight,
                self.q_norm.eps if self.q_norm is not None else 0.0, self.num_heads, self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
            return q, k, v
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary(q, positions), self.rotary(k, positions), v

    def project_output(self, o):
        """The attention's output o [T, Hq, D] -> [T, hidden]."""
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu / SwiGLU)")
        self.intermediate = intermediate_size or config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.intermediate, bias=bias)
        self.down_proj = nn.Linear(self.intermediate, config.hidden_size, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split([self.intermediate, self.intermediate], dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


def layer_region(fn):
    """torch.compiler.nested_compile_region allowing LAYER_KINDS_LIMIT kinds; torch before 2.13 (the GPU
    machine's 2.11) has no max_reuse_entries and no limit to raise."""
    try:
        return torch.compiler.nested_compile_region(max_reuse_entries=LAYER_KINDS_LIMIT)(fn)
    except TypeError:
        return torch.compiler.nested_compile_region(fn)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, rotary, qkv_bias: bool, qk_norm: bool, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, qkv_bias, qk_norm)
        self.mlp = LlamaMLP(config) if mlp is None else mlp  # any [T, hidden] -> [T, hidden] (MoE blocks)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    # Every layer runs the same code on its own weights, so the two halves around the attention are
    # nested compile regions: Dynamo traces each once and stamps it out for the other layers, and
    # AOTAutograd traces it once (torch.compiler.nested_compile_region; fusecc inlines the copies
    # again before its passes). Compile time then costs about one layer, not N. The attention
    # (KV-cache write + kernel) stays outside: a region may not mutate its inputs' storage through
    # a custom op (functionalization refuses fusecc::write_kv_cache inside invoke_subgraph).
    # Layers that differ (MoE and dense layers, quantized and float ones) are traced once per kind;
    # torch raises past max_reuse_entries kinds, so the limit is far above any real model's.
    def forward(self, x, positions, kv_cache, md):
        q, k, v = self.before_attention(x, positions)
        return self.after_attention(x, self.self_attn.attn(q, k, v, kv_cache, md))

    @layer_region
    def before_attention(self, x, positions):
        return self.self_attn.project_qkv(self.input_layernorm(x), positions)

    @layer_region
    def after_attention(self, x, o):
        x = x + self.self_attn.project_output(o)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, max_positions: int, qkv_bias: bool, qk_norm: bool, make_mlp=None) -> None:
        super().__init__()
        rotary = Rotary(config, attention_shape(config)[2], max_positions)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, qkv_bias, qk_norm, make_mlp and make_mlp(i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama 2/3 and Mistral; subclasses switch q/k/v bias (Qwen2) and q/k norm (Qwen3)."""

    qkv_bias: bool | None = None  # None: from config.attention_bias
    qk_norm = False

    def __init__(self, config, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        qkv_bias = bool(getattr(config, "attention_bias", False)) if self.qkv_bias is None else self.qkv_bias
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings, qkv_bias, self.qk_norm,
                                self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def make_mlp(self, layer_idx: int) -> nn.Module | None:
        """Layer `layer_idx`'s MLP; None: the dense LlamaMLP (MoE subclasses return their blocks)."""
        return None

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim) of each layer's cache."""
        attn = self.model.layers[0].self_attn
        return attn.num_kv_heads, attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, positions, kv_cache, md)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, weight).float()

    # --- weights ------------------------------------------------------------------------------
    _STACKED = (  # (our param suffix, HF suffix, shard index)
        (".qkv_proj.", ".q_proj.", 0), (".qkv_proj.", ".k_proj.", 1), (".qkv_proj.", ".v_proj.", 2),
        (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors into our parameters; returns the names loaded.
        Raises KeyError on an unknown name and ValueError when a parameter is left unset."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # derived buffers; the tied head is the embedding
            for ours, theirs, shard in self._STACKED:
                if theirs in name:
                    target = name.replace(theirs, ours)
                    param = params[target]
                    offset, size = self._shard_range(target, shard)
                    _check_shape(name, tensor, (size, *param.shape[1:]))
                    param.data.narrow(0, offset, size).copy_(tensor)
                    loaded.add(f"{target}#{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no counterpart in {type(self).__name__}")
                _check_shape(name, tensor, tuple(params[name].shape))
                params[name].data.copy_(tensor)
                loaded.add(name)
        missing = [n for n, p in params.items() if not self._is_loaded(n, loaded)]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
        return loaded

    def _shard_range(self, param_name: str, shard: int) -> tuple[int, int]:
        """(first row, rows) of checkpoint shard `shard` (q/k/v or gate/up) in a stacked parameter."""
        layer = self.get_submodule(param_name.rsplit(".", 2)[0])  # the attention or MLP module
        if isinstance(layer, LlamaAttention):
            return ((0, layer.q_size), (layer.q_size, layer.kv_size),
                    (layer.q_size + layer.kv_size, layer.kv_size))[shard]
        return shard * layer.intermediate, layer.intermediate

    def _is_loaded(self, name: str, loaded: set[str]) -> bool:
        if ".qkv_proj." in name:
            return all(f"{name}#{i}" in loaded for i in range(3))
        if ".gate_up_proj." in name:
            return all(f"{name}#{i}" in loaded for i in range(2))
        return name in loaded


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple) -> None:
    # copy_ would broadcast a (1, n) tensor, or fill half of q from a half-size one, without a word
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; the model's config "
                         f"expects {tuple(expected)}")
