"""Builds the model proposer of a speculative_config: the target's own first layers (layer_skip), a
draft checkpoint folder (draft_model), or the target quantized (draft_model with "quantization" and no
"model"), the last two with their own KV pools, checked against the target.

A draft must share the target's vocabulary: the same config.vocab_size and, when both tokenizers
expose one, the same token -> id map; otherwise its token ids would mean other tokens (ValueError
at start). Its KV pool has the target's block count and block size, so the target's block tables
address it (fusecc/runtime/spec_decode/draft_proposer.py); on CUDA it is allocated after the target
sized its own pool from gpu_memory_utilization, which left room for it and for the draft's weights
(draft_memory.py).
"""

from __future__ import annotations

import copy

from fusecc.runtime.model_runner import kv_cache_tensors
from fusecc.runtime.spec_decode.config import SpeculativeConfig
from fusecc.runtime.spec_decode.draft_proposer import DraftModelProposer, LayerSkipModel


def build_model_proposer(cfg: SpeculativeConfig, engine_config, runner, block_manager, tokenizer) -> DraftModelProposer:
    if cfg.method == "layer_skip":
        model = LayerSkipModel(runner.model, cfg.num_layers)
        proposer = DraftModelProposer(model, _forward(model, engine_config, runner),
                                      runner.kv_caches[:cfg.num_layers], block_manager, shares_target_kv=True,
                                      seed=engine_config.seed)
        proposer.draft_cost = cfg.num_layers / runner.num_layers
    else:
        if cfg.model is None:
            model = quantized_copy(runner.model, cfg.quantization)
        else:
            model = load_draft_model(cfg.model, engine_config, runner, tokenizer, cfg.quantization)
        kv_heads, head_dim = model.kv_shape
        shape = (engine_config.num_kv_blocks, engine_config.block_size, kv_heads, head_dim)
        caches = kv_cache_tensors(shape, runner.dtype, runner.device, len(model.model.layers))
        proposer = DraftModelProposer(model, _forward(model, engine_config, runner), caches, block_manager,
                                      shares_target_kv=False, seed=engine_config.seed)
        # decode is memory-bound: a draft costs what it reads (a shared tensor counts for both models)
        proposer.draft_cost = _num_bytes(model) / _num_bytes(runner.model)
    if not engine_config.enforce_eager:  # its graphs compiled now, not at the first speculative step
        runner.warm_up_steps(proposer.forward, proposer.kv_caches)
    if runner.cuda_graphs:
        from fusecc.runtime.spec_decode.verify_graphs import StepGraphs

        # the draft's decode-shaped steps (all of layer_skip's) replay CUDA graphs
        proposer.graphs = StepGraphs(proposer.forward, proposer.kv_caches, runner, 1, cfg.disable_by_batch_size)
    return proposer


def quantized_copy(model, method: str):
    """`model` with its decoder linears (and MoE experts) quantized round-to-nearest by `method`, every
    other tensor (embeddings, norms, head, rotary tables) shared with `model`, which is not changed."""
    from fusecc.quantization.config import resolve_quantization
    from fusecc.quantization.model import finish_load, quantized_linear_names

    if not hasattr(model, "kv_shape") or not quantized_linear_names(model):
        raise ValueError(f"speculative_config.quantization={method!r} without 'model' quantizes the target, which "
                         f"needs a float target in a fusecc model class (not {type(model).__name__}, not already "
                         f"quantized)")
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    draft = copy.deepcopy(model, shared)  # new modules around the same tensors
    finish_load(draft, resolve_quantization(method, None))  # swaps the draft's linears for quantized ones
    return draft


def load_draft_model(path: str, engine_config, runner, tokenizer, quantization: str | None = None):
    from fusecc.runtime import loader

    try:
        hf_config = loader.load_config(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"speculative_config.model {path!r}: cannot read the draft's config ({e})") from None
    if hf_config.vocab_size != runner.vocab_size:
        raise ValueError(f"speculative_config.model {path!r}: the draft's vocabulary ({hf_config.vocab_size} tokens) "
                         f"differs from the target's ({runner.vocab_size})")
    try:
        draft_tokenizer = loader.load_tokenizer(path)
    except (OSError, ValueError):
        draft_tokenizer = None  # a folder without a tokenizer: the vocabulary size check stands alone
    if _vocab(draft_tokenizer) is not None and _vocab(tokenizer) is not None and \
            _vocab(draft_tokenizer) != _vocab(tokenizer):
        raise ValueError(f"speculative_config.model {path!r}: the draft's tokenizer maps tokens to other ids than "
                         f"the target's")
    model = loader.load_model(path, runner.dtype, runner.device, engine_config.max_model_len, config=hf_config,
                              model_impl=engine_config.model_impl, quantization=quantization)
    if not hasattr(model, "kv_shape"):
        raise ValueError(f"speculative_config.model {path!r}: the draft needs a fusecc model class")
    return model


def _num_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _vocab(tokenizer) -> dict | None:
    get = getattr(tokenizer, "get_vocab", None)
    return get() if get is not None else None


def _forward(model, engine_config, runner):
    if engine_config.enforce_eager:
        return model
    from fusecc.runtime.model_runner import compile_forward

    return compile_forward(model, runner.size_oblivious)
