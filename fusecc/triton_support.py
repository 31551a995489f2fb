"""Where Triton kernels can run in this process: the one place that reads TRITON_INTERPRET.

`triton.jit` reads the variable when a kernel is defined, so it must be set (CPU-only machines,
tests) before fusecc's kernels are imported; these functions only report what was decided.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Triton's interpreter runs kernels on CPU tensors (slowly, one autotune config at a time)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def has_triton_driver() -> bool:
    """The interpreter, a GPU, or a stand-in driver that only compiles (tests/kernels/hopper_compile_check.py)."""
    if interpreting():
        return True
    try:
        from triton.runtime import driver

        driver.active.get_current_target()
        return True
    except Exception:  # "0 active drivers": no GPU and no interpreter
        return False
