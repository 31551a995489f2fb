"""Launching the hand-written kernels: whether to autotune, the launch itself, and the device facts
the launch heuristics read. Shared by the attention, MoE and quantized-matmul kernels.

    with kernel_autotuning(False):                 # inside a compiled graph: its `autotune` option
        launch_tuned(kernel, grid, args, constexprs, first_choice)
    num_sms(device)                                # programs-per-SM heuristics (split-KV, split-K)

Per-step sizes: Triton compiles a kernel anew for an int argument that newly equals 1 or is
divisible by 16 (its "specialisation"), so a size that changes from step to step (the rows of a
linear, the block table's width, the MoE kernel's token-expert pairs) compiles a second variant the
first time it is a multiple of 16: on the GPU a stall of up to a second in the middle of serving,
after the warm-up compiled everything else. Such arguments are listed in their kernel's
`@triton.jit(do_not_specialize=[...])`; they only bound masks and loops, where the
specialisation buys nothing. Sizes that set load alignment (K, strides of the weights) keep it.
"""

import contextlib
import contextvars
import os
from typing import Optional

import torch
import triton

from fusecc.triton_support import interpreting

# Set by compiled graphs around each call (their `autotune` option, on with mode="max-autotune");
# None outside them, where FUSECC_AUTOTUNE decides.
_AUTOTUNE_OVERRIDE: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("fusecc_autotune", default=None)


def autotune_enabled() -> bool:
    """Whether the attention kernels search their tile configs (compiling and timing each, once per
    shape class: seconds of compile time) or launch a hand-picked one. Inside a compiled graph its
    `autotune` option decides; direct calls follow FUSECC_AUTOTUNE (default on)."""
    forced = _AUTOTUNE_OVERRIDE.get()
    if forced is not None:
        return forced
    return os.environ.get("FUSECC_AUTOTUNE", "1") != "0"


@contextlib.contextmanager
def kernel_autotuning(enabled: bool):
    token = _AUTOTUNE_OVERRIDE.set(enabled)
    try:
        yield
    finally:
        _AUTOTUNE_OVERRIDE.reset(token)


# (kernel, constexprs, dtypes) -> the config launched without autotuning: the hand-picked one, or
# the first of the others that fits in shared memory (fp32 tiles are twice the size of bf16 ones)
_FITTING_CONFIG: dict = {}


def launch_tuned(kernel, grid, args: tuple, kwargs: dict, first_choice: triton.Config) -> None:
    """Launch an @triton.autotune kernel: over its configs when autotune_enabled(), else directly
    with `first_choice` (its hand-picked config for these constexprs; no timing runs), or, when
    that config does not fit on the device, the first of the kernel's configs that does."""
    if autotune_enabled() and not interpreting():
        kernel[grid](*args, **kwargs)
        return
    key = (id(kernel), tuple(sorted(kwargs.items())),
           tuple(a.dtype for a in args if hasattr(a, "dtype")))
    known = _FITTING_CONFIG.get(key)
    if known is not None:
        _launch_with(kernel, grid, args, kwargs, known)
        return
    from triton.runtime.errors import OutOfResources

    candidates = [first_choice] + [c for c in kernel.configs if c is not first_choice]
    for i, config in enumerate(candidates):
        try:
            # a config that does not fit fails when its binary is loaded, before anything runs
            _launch_with(kernel, grid, args, kwargs, config)
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _FITTING_CONFIG[key] = config
        return


def _launch_with(kernel, grid, args: tuple, kwargs: dict, config: triton.Config) -> None:
    # what the autotuner does for its chosen config: the pre-hook first (TMA kernels size their
    # descriptors' boxes there), then the launch
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(kernel.arg_names, args)), **kwargs, **config.kwargs})
    kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


_SM_COUNT = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so the split path is what the CPU tests exercise
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
