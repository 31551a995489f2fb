"""Host-side pieces shared by the quantized matmul kernels (quant_matmul.py, fp8_matmul.py).

Both kernels compute `out[M, N] = x[M, K] @ dequant(W)[N, K].T` with the quantized weight stored
output-channel first (row n of every weight tensor belongs to output n), and both have two paths:

    decode  (M <= DECODE_MAX_ROWS): 16-row tiles, wide K tiles, split-K over the programs so that a
             batch-1 step still launches ~2 programs per SM; every packed weight byte is read once and
             dequantized in registers. Splits write fp32 partials [splits, M, N], summed on the host.
    prefill (larger M): tensor-core tiles (BLOCK_M 64/128), one program per output tile, no split.

The path is chosen by M; each path is autotuned per shape class (M bucket, N, K, format) on the GPU
and runs one small config under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.launch import num_sms
from fusecc.triton_support import interpreting

DECODE_MAX_ROWS = 16


def decode_configs(max_block_k: int = 256) -> list[triton.Config]:
    if interpreting():  # K tiles of 128 here, 32 in prefill_configs: the CPU tests see both tile widths
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": min(128, max_block_k)}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(64, 128, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 4, 3),
                                 (32, 128, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (16, 256, 2, 4)]
            if bk <= max_block_k]


def prefill_configs(max_block_k: int = 256) -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 3),
                                     (128, 128, 128, 8, 3)]
            if bk <= max_block_k]


def split_align(configs: list[triton.Config]) -> int:
    """K per split is a multiple of every config's BLOCK_K, so a split starts on a tile (and group) edge."""
    return max(c.kwargs["BLOCK_K"] for c in configs)


def choose_split_k(M: int, N: int, K: int, align: int, device: torch.device, split_k: int | None = None) -> int:
    """Splits of K for the decode path: enough programs for ~2 per SM (tiles assumed 64 wide in N),
    at least `align` K per split. `split_k` overrides (tests)."""
    if split_k is None:
        tiles = triton.cdiv(M, DECODE_MAX_ROWS) * triton.cdiv(N, 64)
        split_k = max(1, min(2 * num_sms(device) // max(tiles, 1), K // (2 * align)))
    return max(1, min(split_k, triton.cdiv(K, align)))


def k_per_split(K: int, splits: int, align: int) -> int:
    return triton.cdiv(triton.cdiv(K, splits), align) * align


def m_bucket(M: int) -> int:
    """Autotune key: power-of-two bucket of the row count (one tuning per shape class, not per batch)."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


@triton.jit
def program_tile(M, N, K, k_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile of a (split-K) matmul grid (M tiles, N tiles, K splits): (pid_k, rows
    offs_m [BM], columns offs_n [BN], their in-bounds masks, its K range [k_lo, k_hi))."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    k_lo = pid_k * k_split
    return pid_k, offs_m, offs_n, offs_m < M, offs_n < N, k_lo, tl.minimum(K, k_lo + k_split)


@triton.jit
def store_output_tile(acc, out_ptr, b_ptr, pid_k, stride_os, stride_om, stride_on, offs_m, offs_n, m_ok, n_ok,
                      PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A matmul program's fp32 tile acc [BM, BN] out: with PARTIAL, into split pid_k's fp32 partial sums
    (finish_splits adds them and the bias); else + bias, in the output's dtype."""
    out_mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc,
                 mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, splits, numel, N,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(partial_ptr + s * numel + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def finish_splits(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """partial [splits, M, N] fp32 (contiguous) -> out [M, N] contiguous (+ bias), in out's dtype: one launch."""
    splits, M, N = partial.shape
    block = 1024
    _sum_splits_kernel[(triton.cdiv(M * N, block),)](partial, bias if bias is not None else partial, out, splits,
                                                     M * N, N, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out
