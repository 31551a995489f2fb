"""What `fusecc cache list` prints and `fusecc cache clear` removes."""

from __future__ import annotations

import time

from fusecc.compile_cache.location import cache_root, functions_dir, graphs_dir, kernels_dir
from fusecc.compile_cache.store import clear_entries, list_entries


def describe_cache() -> str:
    lines = [f"fusecc compile cache: {cache_root()}  (FUSECC_CACHE_DIR)"]
    total = 0
    for kind, directory in (("function", functions_dir()), ("graph", graphs_dir())):
        for entry in list_entries(directory):
            total += entry.size
            age = _age(time.time() - entry.created)
            lines.append(f"  {kind:<8} {entry.key[:16]}  {entry.size / 1024:9.1f} KiB  {age:>9} ago  "
                         f"{entry.description}")
    kernels = sorted(kernels_dir().glob("*.py")) if kernels_dir().is_dir() else []
    kernel_bytes = sum(p.stat().st_size for p in kernels)
    lines.append(f"  {len(kernels)} generated kernel sources ({kernel_bytes / 1024:.1f} KiB) in {kernels_dir()}")
    lines.append(f"  total {(total + kernel_bytes) / 2**20:.2f} MiB; compiled kernel binaries are in Triton's own "
                 f"cache (TRITON_CACHE_DIR)")
    return "\n".join(lines)


def clear_cache() -> str:
    functions = clear_entries(functions_dir())
    graphs = clear_entries(graphs_dir())
    kernels = 0
    if kernels_dir().is_dir():
        for path in kernels_dir().glob("*.py"):
            path.unlink(missing_ok=True)
            kernels += 1
    return f"removed {functions} function, {graphs} graph and {kernels} kernel entries from {cache_root()}"


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
