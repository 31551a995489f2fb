"""fusecc: a PyTorch 2 compiler backend and inference runtime for decoder LLMs.

    torch.compile(model, backend="fusecc")   # the backend is found through an entry point
"""

__version__ = "0.1.0"
