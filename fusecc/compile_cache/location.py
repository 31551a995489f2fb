"""Where fusecc keeps what it compiled: `$FUSECC_CACHE_DIR`, default `~/.cache/fusecc`
(`$XDG_CACHE_HOME/fusecc` where that is set).

    <root>/kernels/<kernel name>.py        generated Triton sources (codegen/kernel_cache.py)
    <root>/graphs/<key>.fcc                compiled graphs: skip AOTAutograd, passes and codegen
    <root>/functions/<key>.fcc             whole functions (compile_cache.aot_compile, the runtime's
                                           forward): skip Dynamo too

Triton keeps the kernels' binaries in its own cache (`$TRITON_CACHE_DIR`, ~/.triton/cache).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    configured = os.environ.get("FUSECC_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusecc"


def graphs_dir() -> Path:
    return cache_root() / "graphs"


def functions_dir() -> Path:
    return cache_root() / "functions"


def kernels_dir() -> Path:
    return cache_root() / "kernels"
