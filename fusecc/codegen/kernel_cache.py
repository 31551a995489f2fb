"""Generated kernels cached by structural hash, in memory and on disk.

A kernel's name and file are derived from the sha256 of its source, so the 32 identical
layers of a model produce one kernel, compiled once. Sources persist under
`$FUSECC_CACHE_DIR/kernels` (default `~/.cache/fusecc/kernels`); Triton's own cache keys compiled
binaries by source, so a second process gets both without recompiling.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from pathlib import Path

from fusecc.codegen.kernel_writer import KernelSource


class KernelCache:
    def __init__(self, directory: Path):
        self.directory = directory
        self._loaded: dict[str, object] = {}
        self.hits = 0
        self.misses = 0

    def load(self, kernel: KernelSource):
        cached = self._loaded.get(kernel.structure_hash)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        path = self.directory / f"{kernel.name}.py"
        if not path.exists() or path.read_text() != kernel.source:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Atomic write: concurrent processes may generate the same kernel.
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(kernel.source)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"fusecc_kernels.{kernel.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fn = getattr(module, kernel.name)
        self._loaded[kernel.structure_hash] = fn
        return fn


def default_cache_dir() -> Path:
    from fusecc.compile_cache.location import kernels_dir

    return kernels_dir()


@functools.lru_cache(maxsize=None)
def kernel_cache(directory: str) -> KernelCache:
    """One cache per directory per process (kernels are shared by every compiled graph)."""
    return KernelCache(Path(directory))
