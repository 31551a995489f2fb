"""Compile fusecc's Triton kernels for Hopper (sm_90) on a machine without a GPU.

Run as a script in a process without TRITON_INTERPRET (kernels must be real `triton.jit` functions):

    python -m tests.kernels.hopper_compile_check

It points Triton at a stand-in CUDA driver that reports an sm_90 target, makes every kernel launch
compile without running (`JITFunction.run(..., warmup=True)`), and every autotuned launch compile
each of its pruned configs. Then it calls the public wrappers — the same argument preparation,
strides and constexprs as on a GPU — on CPU tensors, and compiles the generated kernels of a tiny
Llama through the backend. Triton's full pipeline runs (MLIR passes, LLVM, ptxas from the Triton
wheel), so a kernel that the interpreter accepts but the GPU compiler rejects fails here, in CI.
Whether a config fits in shared memory and what the kernels compute are the GPU tests' business.

The Gluon prefill kernel (flash_attention_gluon.py) compiles through the same patched JIT.
Also checks that the hand-picked bf16 configs (what compiled graphs launch without autotuning) fit
in Hopper's shared memory, from the compiled binaries' metadata.

Prints one line per (kernel, configs compiled) and exits non-zero on the first failure.
"""

from __future__ import annotations

import collections
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("hopper_compile_check must run without TRITON_INTERPRET=1")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

COMPILED: collections.Counter = collections.Counter()
SHARED_BYTES: dict = {}  # kernel name -> largest shared memory of its hand-picked (non-autotuned) launches
HOPPER_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200
_HAND_PICKED = [False]


class HopperWithoutGPU:
    """What Triton's JIT asks of a driver to compile (not launch) a kernel."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


def _compile_only(original):
    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is None:
            raise RuntimeError(f"{self.fn.__name__} did not compile")
        COMPILED[self.fn.__name__] += 1
        if _HAND_PICKED[0]:
            name = self.fn.__name__
            SHARED_BYTES[name] = max(SHARED_BYTES.get(name, 0), kernel.metadata.shared)
        return kernel
    return run


def _every_config(self, *args, grid, warmup, **kwargs):
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):
        if config.pre_hook is not None:  # as the autotuner does before each benchmark (TMA boxes)
            config.pre_hook({**self.nargs, **kwargs, **config.kwargs})
        self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
    self.nargs = None


def install() -> None:
    from fusecc.kernels import flash_attention_gluon, flash_attention_tma

    driver.set_active(HopperWithoutGPU())
    # CPU tensors stand in for sm_90 ones
    flash_attention_tma.device_has_tma = lambda device: True
    flash_attention_gluon.device_is_hopper = lambda device: True
    JITFunction.run = _compile_only(JITFunction.run)
    Autotuner.run = _every_config


def attention_kernels(autotune: bool) -> None:
    """bf16 calls of every attention wrapper: with autotune, every pruned config compiles; without,
    the hand-picked one (what compiled graphs launch)."""
    from fusecc.kernels import flash_attention, flash_attention_gluon, paged_attention, paged_prefill_attention
    from fusecc.kernels import varlen_attention, write_kv_cache
    from fusecc.kernels.launch import kernel_autotuning

    bf16 = torch.bfloat16
    with kernel_autotuning(autotune):
        for d in (64, 128):
            q = torch.randn(1, 8, 300, d, dtype=bf16)
            k = torch.randn(1, 2, 300, d, dtype=bf16)
            flash_attention(q, k, k, causal=True)  # the TMA descriptor kernel (d=64), the Gluon one (d=128)
            flash_attention(q[..., :d - 16], k[..., :d - 16], k[..., :d - 16])  # odd head dim: pointer kernel
            flash_attention(q, k, k, attn_mask=torch.ones(1, 1, 300, 300, dtype=torch.bool))
            # one query row: the split-KV decode kernel, split (2 KV heads < 4 "SMs") and merged
            flash_attention(q[:, :, :1], k, k, attn_mask=torch.zeros(1, 1, 1, 300, dtype=bf16))
        # d=128 on a TMA device other than sm_90: the descriptor kernel
        is_hopper = flash_attention_gluon.device_is_hopper
        flash_attention_gluon.device_is_hopper = lambda device: False
        flash_attention(q, k, k, causal=False)
        flash_attention_gluon.device_is_hopper = is_hopper
        d = 128
        tokens = torch.randn(40, 8, d, dtype=bf16)
        cu = torch.tensor([0, 15, 40], dtype=torch.int32)
        kv = torch.randn(40, 2, d, dtype=bf16)
        varlen_attention(tokens, kv, kv, cu, cu, 25, 25, causal=True)
        cache = torch.randn(16, 16, 2, d, dtype=bf16)
        tables = torch.arange(16, dtype=torch.int32).view(2, 8)
        ctx = torch.tensor([100, 37], dtype=torch.int32)
        paged_attention(torch.randn(2, 8, d, dtype=bf16), cache, cache, tables, ctx)
        paged_attention(torch.randn(2, 8, d, dtype=bf16), cache, cache, tables, ctx, num_splits=1)
        paged_prefill_attention(tokens, cache, cache, cu, tables, ctx, 25)
        # the sliding-window / soft-capped variants (Gemma 2's layers)
        paged_attention(torch.randn(2, 8, d, dtype=bf16), cache, cache, tables, ctx, sliding_window=32, softcap=50.0)
        paged_prefill_attention(tokens, cache, cache, cu, tables, ctx, 25, sliding_window=32, softcap=50.0)
        write_kv_cache(kv, kv, cache, cache, torch.arange(40))
        if not autotune:  # the hand-picked configs only: the e4m3 conversions do not depend on the tile
            fp8_kv_cache_kernels(tokens, kv, cache.to(torch.float8_e4m3fn), tables, ctx, cu)


def fp8_kv_cache_kernels(tokens, kv, cache, tables, ctx, cu) -> None:
    """The FP8 KV cache's variants: e4m3 quantization in the write, e4m3 -> bf16 tiles in the reads."""
    from fusecc.kernels import paged_attention, paged_prefill_attention, write_kv_cache

    scales = dict(k_scale=0.5, v_scale=2.0)
    q = torch.randn(2, 8, tokens.shape[-1], dtype=tokens.dtype)
    paged_attention(q, cache, cache, tables, ctx, **scales)
    paged_attention(q, cache, cache, tables, ctx, num_splits=1, **scales)
    paged_prefill_attention(tokens, cache, cache, cu, tables, ctx, 25, **scales)
    write_kv_cache(kv, kv, cache, cache, torch.arange(40), **scales)


def qk_rope_kernel() -> None:
    from fusecc.kernels.qk_rope import qk_norm_rope

    cos = torch.randn(64, 128)
    for hq, hkv, weights in ((32, 4, True), (32, 8, False)):  # Qwen3 (q/k norms), Llama (rotation only)
        qkv = torch.randn(3, (hq + 2 * hkv) * 128, dtype=torch.bfloat16)
        w = torch.ones(128, dtype=torch.bfloat16) if weights else None
        qk_norm_rope(qkv, torch.arange(3), cos, cos, w, w, 1e-6, hq, hkv, 128)


def generated_kernels() -> None:
    from tests.codegen.model_zoo import build

    model = build("llama")
    compiled = torch.compile(model, backend="fusecc", options={"codegen": "triton", "strict": True})
    with torch.no_grad():
        compiled(torch.randint(0, 128, (2, 9)))
    # what the Llama does not have: NaN-propagating max/min rows, integer bit ops, fp16 I/O
    ops = lambda a, b: (torch.softmax(a, -1), a.amin(-1), ~b + 1, torch.floor(b))  # noqa: E731
    ops_compiled = torch.compile(ops, backend="fusecc", options={"codegen": "triton", "strict": True})
    with torch.no_grad():
        ops_compiled(torch.randn(4, 64, dtype=torch.float16), torch.arange(4, dtype=torch.int32))


def main() -> int:
    install()
    attention_kernels(autotune=True)
    _HAND_PICKED[0] = True
    attention_kernels(autotune=False)
    _HAND_PICKED[0] = False
    qk_rope_kernel()
    generated_kernels()
    for name, count in sorted(COMPILED.items()):
        print(f"{name} {count}")
    # a hand-picked bf16 config must fit: launch_tuned's fallback to another config is for fp32
    too_big = {name: size for name, size in SHARED_BYTES.items() if size > HOPPER_SHARED_LIMIT}
    if too_big:
        print(f"hand-picked configs over Hopper's shared memory ({HOPPER_SHARED_LIMIT} B): {too_big}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
