"""Quantized expert weights for the fused MoE kernels: their layouts, and loading one tile in a kernel.

The formats are the quantized linears' (quant_matmul.py, fp8_matmul.py) with an experts dimension in
front; N is an expert's output rows (2 * inter for gate_up, hidden for down), K its input columns:

    "int8":  w int8 [E, N, K];                 scales, zeros fp32 [E, N, groups] (zeros None: symmetric)
    "int4":  w int32 [E, N, ceil(K/8)]         scales, zeros fp32 [E, N, groups] (zeros None: symmetric)
             (nibble i of word j is column 8j + i, unsigned 0..15; w = (q - zero) * scale)
    "fp8":   w float8_e4m3fn [E, N, K];        scales fp32 [E, N, groups]; W8A8: the kernels' input rows
             are quantized per row to e4m3 first (fp8_matmul.quantize_fp8_per_token), each with a scale
    groups = 1 (group_size -1, per output channel) or ceil(K / group_size).

Integer weights are dequantized in registers to the activations' dtype (the dot runs in it, as for
bf16 weights); fp8 tiles go to the dot as they are and the weight scale multiplies the dot's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from fusecc.kernels.int_unpack import int8_to_float, unpack_int4_tile
from fusecc.kernels.quant_matmul import dequantize_weight_only, group_constexpr

# the kernels' FORMAT constexpr
FLOAT, INT8, INT4, FP8 = 0, 1, 2, 3
FORMATS = {"int8": INT8, "int4": INT4, "fp8": FP8}


@dataclass(frozen=True)
class ExpertQuant:
    """One projection's quantization data (w13's or w2's), passed to the kernels beside the weight."""
    format: str                       # "int8" | "int4" | "fp8"
    group_size: int                   # -1: per output channel
    scales: torch.Tensor              # fp32 [E, N, groups]
    zeros: Optional[torch.Tensor]     # fp32 [E, N, groups] or None

    def constexprs(self, K: int) -> dict:
        return dict(FORMAT=FORMATS[self.format], GROUP_SIZE=group_constexpr(self.group_size, K),
                    HAS_ZEROS=self.zeros is not None)


def kernel_quant_args(quant: ExpertQuant | None, K: int, placeholder: torch.Tensor) -> tuple:
    """(scales, zeros, constexprs) a fused MoE kernel takes for one projection; float weights get a 3-D
    stand-in (never read) and FORMAT=FLOAT, a symmetric one its scales in the zeros' place (never read)."""
    if quant is None:
        stand_in = placeholder.view(1, *placeholder.shape)
        return stand_in, stand_in, dict(FORMAT=FLOAT, GROUP_SIZE=1, HAS_ZEROS=False)
    zeros = quant.zeros if quant.zeros is not None else quant.scales
    return quant.scales, zeros, quant.constexprs(K)


def check_expert_quant(name: str, w: torch.Tensor, quant: ExpertQuant, E: int, N: int, K: int) -> None:
    """ValueError naming what in one projection does not match the layout of the module docstring."""
    if quant.format not in FORMATS:
        raise ValueError(f"fused_moe: unknown expert weight format {quant.format!r}; valid: {', '.join(FORMATS)}")
    want = {"int8": (torch.int8, (E, N, K)), "int4": (torch.int32, (E, N, -(-K // 8))),
            "fp8": (torch.float8_e4m3fn, (E, N, K))}[quant.format]
    if (w.dtype, tuple(w.shape)) != want or w.stride(2) != 1:
        raise ValueError(f"fused_moe: {quant.format} {name} must be {want[0]} {list(want[1])} (contiguous last dim), "
                         f"got {w.dtype} {list(w.shape)}")
    if quant.group_size != -1 and (quant.group_size <= 0 or quant.group_size % 16):
        raise ValueError(f"fused_moe: group_size must be -1 or a positive multiple of 16, got {quant.group_size}")
    if quant.format == "fp8" and quant.group_size not in (-1, 128):
        raise ValueError(f"fused_moe: fp8 expert scales must be per channel (-1) or 128-blocks, got {quant.group_size}")
    if quant.format == "fp8" and quant.zeros is not None:
        raise ValueError(f"fused_moe: fp8 {name} is symmetric (zeros must be None)")
    groups = 1 if quant.group_size == -1 else -(-K // quant.group_size)
    for what, t in (("scales", quant.scales), ("zeros", quant.zeros)):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (E, N, groups) or t.stride(2) != 1):
            raise ValueError(f"fused_moe: {name} {what} must be float32 [{E}, {N}, {groups}], got {t.dtype} "
                             f"{list(t.shape)}")


@triton.jit
def group_scale(s_ptr, expert, n_idx, n_ok, k0, stride_se, stride_sn, GROUP_SIZE: tl.constexpr):
    """The scale of rows n_idx (any shape) for the group holding input column k0."""
    return tl.load(s_ptr + expert * stride_se + n_idx * stride_sn + k0 // GROUP_SIZE, mask=n_ok, other=0.0)


@triton.jit
def expert_weight_tile(w_ptr, s_ptr, z_ptr, expert, n_idx, k_idx, n_ok, mask, k0,
                       stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_ze, stride_zn,
                       FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       BLOCK_K: tl.constexpr, RAW_FP8: tl.constexpr, dtype: tl.constexpr):
    """int8 or FP8 weights [n_idx x k_idx] of `expert` (n_idx, k_idx broadcast against each other:
    [1, BN] x [BK, 1] for a GEMM's [K, N] tile, [BN, 1] x [1, BK] for a GEMV's rows), k_idx within
    [k0, k0 + BLOCK_K), dequantized, in `dtype`; with RAW_FP8 an FP8 tile comes back as it is stored
    (e4m3, unscaled). int4 weights: expert_int4_rows (packed words are unpacked along K)."""
    q = tl.load(w_ptr + expert * stride_we + n_idx * stride_wn + k_idx * stride_wk, mask=mask, other=0.0)
    if FORMAT == 3 and RAW_FP8:
        return q
    if FORMAT == 1:  # INT8
        q = int8_to_float(q)
    return scale_expert_tile(q.to(tl.float32), s_ptr, z_ptr, expert, n_idx, k_idx, n_ok, mask, k0,
                             stride_se, stride_sn, stride_ze, stride_zn, GROUP_SIZE, HAS_ZEROS, BLOCK_K, dtype)


@triton.jit
def expert_int4_rows(w_ptr, s_ptr, z_ptr, expert, offs_n, n_ok, k0, K, stride_we, stride_wn,
                     stride_se, stride_sn, stride_ze, stride_zn, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """int4 rows offs_n [BN] of `expert`, input columns k0 .. k0 + BLOCK_K, dequantized, in `dtype`
    [BN, BK]: the GEMV's layout, where each packed word is loaded once and unpacked in registers
    (kernels/int_unpack.py); the GEMM's [K, N] tiles transpose them."""
    rows = offs_n.to(tl.int64)
    q = unpack_int4_tile(w_ptr + expert * stride_we, rows, n_ok, stride_wn, k0, K, BLOCK_K).to(tl.float32)
    kk = k0 + tl.arange(0, BLOCK_K)
    return scale_expert_tile(q, s_ptr, z_ptr, expert, rows[:, None], kk[None, :], n_ok[:, None],
                             n_ok[:, None] & (kk < K)[None, :], k0, stride_se, stride_sn, stride_ze, stride_zn,
                             GROUP_SIZE, HAS_ZEROS, BLOCK_K, dtype)


@triton.jit
def scale_expert_tile(q, s_ptr, z_ptr, expert, n_idx, k_idx, n_ok, mask, k0, stride_se, stride_sn, stride_ze,
                      stride_zn, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr,
                      dtype: tl.constexpr):
    """Stored values q (fp32, any tile shape broadcast from n_idx and k_idx) -> (q - zero) * scale in dtype."""
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies in one group: one scale (and zero) per row
        if HAS_ZEROS:
            q = q - group_scale(z_ptr, expert, n_idx, n_ok, k0, stride_ze, stride_zn, GROUP_SIZE)
        s = group_scale(s_ptr, expert, n_idx, n_ok, k0, stride_se, stride_sn, GROUP_SIZE)
    else:  # several groups per tile: gathered per element
        g = k_idx // GROUP_SIZE
        if HAS_ZEROS:
            q = q - tl.load(z_ptr + expert * stride_ze + n_idx * stride_zn + g, mask=mask, other=0.0)
        s = tl.load(s_ptr + expert * stride_se + n_idx * stride_sn + g, mask=mask, other=0.0)
    return (q * s).to(dtype)


# ---- torch reference (CPU runs and tests) ----

def dequantize_experts(w: torch.Tensor, quant: ExpertQuant, K: int, dtype: torch.dtype) -> torch.Tensor:
    """[E, N, K] float weights in `dtype` (computed in fp32), what the kernels multiply by."""
    E, N = w.shape[0], w.shape[1]
    groups = quant.scales.shape[2]
    scales = quant.scales.reshape(E * N, groups)
    if quant.format == "fp8":
        g = torch.arange(K, device=w.device) // (K if quant.group_size == -1 else quant.group_size)
        return (w.float() * quant.scales[:, :, g]).to(dtype)
    zeros = quant.zeros.reshape(E * N, groups) if quant.zeros is not None else None
    bits = 4 if quant.format == "int4" else 8
    return dequantize_weight_only(w.reshape(E * N, -1), scales, zeros, bits, quant.group_size, K,
                                  dtype).view(E, N, K)
