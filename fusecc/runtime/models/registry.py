"""Hugging Face architecture name (config.architectures[0]) -> our model class."""

from __future__ import annotations

from fusecc.runtime.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from fusecc.runtime.models.mixtral import MixtralForCausalLM
from fusecc.runtime.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(config) -> type[LlamaForCausalLM]:
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise ValueError(f"config has no `architectures` entry; supported: {', '.join(MODELS)}")
    cls = MODELS.get(archs[0])
    if cls is None:
        raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(MODELS)}")
    if getattr(config, "use_sliding_window", False):
        raise ValueError(f"{archs[0]}: sliding-window attention (use_sliding_window=True) is not supported")
    return cls


def resolve_model_impl(config, model_impl: str) -> str:
    """EngineConfig.model_impl -> "fusecc" (our model class) or "transformers" (transformers_backend.py).
    "auto" picks our class when one covers the config, as vLLM does, else transformers'."""
    if model_impl != "auto":
        return model_impl
    try:
        model_class(config)
    except ValueError:
        return "transformers"
    return "fusecc"


def max_context_len(config) -> int:
    """Longest sequence the model attends correctly: positions, and Mistral's sliding window
    (full attention equals windowed attention while the sequence fits in the window)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:  # no position limit (recurrent models, relative-position encoders); the load refuses those
        return 1 << 62
    limit = int(limit)
    window = getattr(config, "sliding_window", None)
    if window and not getattr(config, "layer_types", None):
        limit = min(limit, int(window))
    return limit
