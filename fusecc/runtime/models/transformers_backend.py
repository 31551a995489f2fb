"""Any transformers decoder through fusecc's engine: transformers' own modeling code, fusecc attention.

For an architecture without a native fusecc model (models/registry.py), the engine loads the
checkpoint with transformers (`AutoModelForCausalLM.from_pretrained`: every family's weight names,
tied heads and quirks handled by their owners) and wraps its decoder so that it looks like a
native model to the runner:

    hidden = model(input_ids [T], positions [T], kv_caches, md)   # -> [T, hidden]: decoder(ids[None], positions[None])
    logits = model.compute_logits(hidden[sample_rows])            # [S, vocab] fp32, the family's head
    model.kv_shape, model.model.layers, model.config               # what ModelRunner reads

The decoder runs with attn_implementation="fusecc_paged" (transformers_attention.py): the step's
flat token batch is one row, each token at its own position, and every attention layer writes its
K/V into the paged cache and attends with fusecc's paged kernels. Rotary (partial or not), q/k
norms, MoE routing, embeddings scaling etc. stay in transformers' code. vLLM's "Transformers
backend" is the model for this design.

At load, a one-token probe forward (each attention call records its K/V shape instead of
attending) finds the cache shape and checks that the model can run this way; a model that
cannot (no attention through transformers' AttentionInterface, recurrent state, encoder-decoder,
layers of different K/V shapes) is refused with one line naming the architecture and why.
The same probe checks compute_logits against the causal-LM head (logit scaling / soft-capping).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fusecc.runtime.models.attention import AttentionMetadata
from fusecc.runtime.models.transformers_attention import (ATTN_IMPLEMENTATION, StepContext,
                                                          fusecc_paged_attention)


def register_attention() -> None:
    """Make "fusecc_paged" a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fusecc_paged_attention)


def check_architecture(config) -> str:
    """The architecture name; ValueError (one line) when it cannot be a transformers-backed decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{arch} is an encoder-decoder model; model_impl='transformers' serves decoder-only "
                         f"causal LMs")
    if getattr(config, "model_type", None) not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{arch} (model_type {getattr(config, 'model_type', None)!r}) is not a causal LM "
                         f"transformers knows (AutoModelForCausalLM has no class for it)")
    return arch


class TransformersForCausalLM(nn.Module):
    """A transformers causal LM taken over by the engine (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, arch: str) -> None:
        super().__init__()
        self.config = hf_model.config
        self.arch = arch
        self.model = hf_model.base_model  # the decoder: embeddings, layers, final norm
        self.lm_head = hf_model.get_output_embeddings()  # tied heads share the embedding's Parameter
        self._step = StepContext()
        attn_modules = [m for m in self.model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
        for m in attn_modules:
            m.fusecc_step = self._step  # a plain attribute, not a submodule: one context for every layer
        self.num_kv_layers, self._kv_shape = self._probe(hf_model, attn_modules)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim) of each layer's cache."""
        return self._kv_shape

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], md: AttentionMetadata) -> torch.Tensor:
        self._step.kv_caches, self._step.md = kv_caches, md
        try:
            out = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            self._step.kv_caches, self._step.md = None, None  # the step's tensors are not kept alive
        return out.last_hidden_state[0]  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] fp32, with the post-processing transformers' causal-LM heads apply."""
        logits = self.lm_head(hidden)
        cfg = self.config
        if getattr(cfg, "logits_scaling", None):  # Granite divides
            logits = logits / cfg.logits_scaling
        if getattr(cfg, "logit_scale", None):  # Cohere multiplies
            logits = logits * cfg.logit_scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # --- load-time checks -------------------------------------------------------------------
    @torch.inference_mode()
    def _probe(self, hf_model: nn.Module, attn_modules: list[nn.Module]) -> tuple[int, tuple[int, int]]:
        """One token through the decoder and through the whole causal LM, attention recording
        shapes and returning zeros: -> (cache layers, (kv_heads, head_dim))."""
        arch = self.arch
        if getattr(self.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION or not attn_modules:
            raise ValueError(f"{arch} cannot run with model_impl='transformers': its attention does not go through "
                             f"transformers' AttentionInterface (custom or no attention, e.g. recurrent state)")
        device = next(self.parameters()).device
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        shapes: dict[int, tuple] = {}
        self._step.probe = shapes
        try:
            hidden = self.model(input_ids=ids, position_ids=ids, use_cache=False).last_hidden_state[0]
            logits = hf_model(input_ids=ids, position_ids=ids, use_cache=False).logits[0]
        finally:
            self._step.probe = None
        layers = getattr(self.model, "layers", None)
        if not shapes or layers is None or sorted(shapes) != list(range(len(layers))):
            raise ValueError(f"{arch} cannot run with model_impl='transformers': {len(shapes)} of its "
                             f"{len(layers) if layers is not None else '?'} decoder layers attend through "
                             f"transformers' AttentionInterface (recurrent or hybrid layers have no paged KV cache)")
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{arch} cannot run with model_impl='transformers': its layers have different K/V "
                             f"shapes {sorted(set(shapes.values()))} (one paged cache shape for all layers)")
        kv_heads, k_dim, v_dim = shapes[0]
        if k_dim != v_dim:
            raise ValueError(f"{arch} cannot run with model_impl='transformers': key head_dim {k_dim} != value "
                             f"head_dim {v_dim}")
        if not torch.allclose(self.compute_logits(hidden), logits.float(), rtol=1e-3, atol=1e-3):
            raise ValueError(f"{arch} cannot run with model_impl='transformers': its causal-LM head transforms the "
                             f"logits in a way fusecc does not reproduce")
        return len(shapes), (kv_heads, k_dim)


def load_transformers_model(path: str | Path, config, dtype: torch.dtype,
                            device: torch.device | str) -> TransformersForCausalLM:
    """The checkpoint's transformers causal LM in `dtype` on `device`, taken over for the engine."""
    from transformers import AutoModelForCausalLM

    arch = check_architecture(config)
    register_attention()
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, local_files_only=True)
    try:
        hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, ImportError) as e:
        raise ValueError(f"{arch} cannot run with model_impl='transformers': {str(e).splitlines()[0]}") from None
    hf_model = hf_model.to(device).eval().requires_grad_(False)
    return TransformersForCausalLM(hf_model, arch).eval()
