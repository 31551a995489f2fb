"""Compile a wrapper's generated kernels in parallel before its first call.

Triton compiles a kernel when it is first launched, one after another on the calling thread: for
a decoder model that is a dozen or more kernels at a few hundred ms each (MLIR passes, ptxas, and a
C launcher built with the host compiler per argument signature). The wrapper knows every launch
from the graph's fake values — dtypes, which pointers are 16-byte aligned, the integer sizes — so
it warms each kernel up with stand-in arguments under Triton's AsyncCompileMode, whose compiles
run on a thread pool (the subprocesses and much of the native code run outside the GIL), and
builds the launchers there too. Triton then finds every kernel in its cache at the first launch.

A guess that differs from the real call (a dynamic size that turns out to be 1, a view that is
not aligned after all) costs only a compile at that launch, as without precompiling; never a
wrong kernel: the launch computes its own specialization key.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fusecc.triton_support import interpreting


class StandInTensor:
    """What Triton's argument binder reads from a tensor: its dtype and its address (for the
    16-byte alignment specialization)."""

    def __init__(self, dtype: torch.dtype, byte_offset: int):
        self.dtype = dtype
        self._address = 1 << 20 | (byte_offset % 16)

    def data_ptr(self) -> int:
        return self._address

    @staticmethod
    def ptr_range() -> int:
        return 0


def stand_in(val: torch.Tensor) -> StandInTensor:
    """A tensor's stand-in: buffers from the caching allocator are aligned, so only a view's
    storage offset can misalign it."""
    offset = val.storage_offset()
    offset = int(offset) if not isinstance(offset, torch.SymInt) else int(offset.node.hint or 0)
    return StandInTensor(val.dtype, offset * val.element_size())


@dataclass
class KernelLaunch:
    kernel: object   # the @triton.jit function
    args: list       # stand-ins and ints, in launch order
    meta: dict       # constexprs and launch options (XBLOCK, num_warps, ...)


def precompile(launches: list[KernelLaunch], max_workers: int | None = None) -> int:
    """Compile the distinct kernels of `launches` in parallel; returns how many were submitted."""
    if not launches or interpreting() or not torch.cuda.is_available():
        return 0
    try:
        from triton.runtime import _async_compile  # private: absent in some Triton version, no harm

        if _async_compile.active_mode.get() is not None:
            return 0  # someone else is batching compiles here; our launches compile as they come
        return _compile_all(launches, max_workers or min(16, os.cpu_count() or 1))
    except Exception:  # an optimisation only: whatever failed here compiles (or fails) at its launch
        return 0


def _compile_all(launches: list[KernelLaunch], workers: int) -> int:
    from triton.runtime import driver
    from triton.runtime._async_compile import AsyncCompileMode

    # Errors are left to the real launch, which reports them as it would without precompiling.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        with AsyncCompileMode(pool, ignore_errors=True) as mode:
            for launch in launches:
                launch.kernel.warmup(*launch.args, grid=(1,), **launch.meta)
            submitted = list(mode.future_kernels.values())
        # AsyncCompileMode's exit waited for the compiles; now the launchers (cached on disk by
        # signature, so the first launch only loads them)
        launchers = [pool.submit(driver.active.launcher_cls, fk.kernel.src, fk.kernel.metadata)
                     for fk in submitted if fk.kernel is not None]
        for future in launchers:
            future.exception()
    return len(submitted)
