"""fusecc: a PyTorch 2 compiler backend and inference runtime for decoder LLMs.

    torch.compile(model, backend="fusecc")   # the backend is found through an entry point
    from fusecc import LLM, SamplingParams   # the offline engine (imported on first use)
"""

__version__ = "0.1.0"

# public name -> module; imported lazily so `import fusecc` stays cheap (no triton/transformers)
_LAZY = {
    "LLM": "fusecc.llm",
    "SamplingParams": "fusecc.runtime.sampling_params",
    "LLMEngine": "fusecc.runtime.engine",
    "AsyncLLMEngine": "fusecc.runtime.async_engine",
    "EngineConfig": "fusecc.runtime.config",
    "RequestOutput": "fusecc.runtime.outputs",
    "CompletionOutput": "fusecc.runtime.outputs",
    "Logprob": "fusecc.runtime.outputs",
    "RequestMetrics": "fusecc.runtime.outputs",
    "render_chat": "fusecc.runtime.chat",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusecc' has no attribute {name!r}")
