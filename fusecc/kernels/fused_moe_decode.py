"""Fused MoE for one or two tokens (batch-1/2 decode): matrix-vector products, no sort, no separate sum.

With a token or two each (token, expert) pair is its own group: the grouped GEMMs of fused_moe.py would
pad each pair to a 16-row tile and need the sort step before and the top-k sum after, three extra
launches per layer where the whole MoE block reads ~75 MB (Qwen3-30B-A3B) in ~25 us. Here:

    gate_up:  program (pair p, n-tile):   act[p, n]  = silu(w1[e_p] @ x[p // top_k]) * (w3[e_p] @ x[..])
    down:     program (token t, n-tile):  out[t, n]  = sum_k topk_weights[t, k] * (w2[e_{t,k}] @ act[t*top_k + k])

Each program streams its expert's [BLOCK_N, K] weight rows once (K contiguous: coalesced) and reduces
on the CUDA cores in fp32; the top-k sum happens in registers and the output is written once, rounded
once. Shapes and weight layouts are fused_moe.py's (w13 [E, 2*inter, hidden], w2 [E, hidden, inter]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.fp8_matmul import quantize_fp8_per_token_triton
from fusecc.kernels.launch import launch_tuned
from fusecc.kernels.moe_expert_weights import ExpertQuant, expert_int4_rows, expert_weight_tile, kernel_quant_args
from fusecc.triton_support import interpreting

DECODE_MAX_TOKENS = 2  # fused_moe takes this path up to here (a pair per expert is the common case)


def gemv_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            # narrow n-tiles keep the SMs busy when N is small (the down projection's grid is tokens x N / BLOCK_N)
            for bn, bk, w, s in [(32, 256, 4, 3), (16, 256, 4, 3), (64, 128, 4, 3), (32, 512, 8, 2),
                                 (16, 512, 4, 2), (64, 256, 8, 3), (8, 256, 4, 3), (8, 512, 4, 2)]]


@triton.jit
def _activation_chunk(a_row, kk, k_ok, stride_ak, EVEN_K: tl.constexpr):
    """Columns kk of one activation row, fp32 (masked only when K is not a multiple of the chunk)."""
    if EVEN_K:
        return tl.load(a_row + kk * stride_ak).to(tl.float32)
    return tl.load(a_row + kk * stride_ak, mask=k_ok, other=0.0).to(tl.float32)


@triton.autotune(configs=gemv_configs(), key=["N", "K", "GATED", "TOP_K", "FORMAT", "GROUP_SIZE"],
                 cache_results=True)
@triton.jit
def _moe_gemv_kernel(a_ptr, b_ptr, c_ptr, ids_ptr, weights_ptr, s_ptr, z_ptr, a_scale_ptr, N, K,
                     stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_se, stride_sn, stride_ze, stride_zn,
                     TOP_K: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                     FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # GATED: a pair; else a token
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if GATED:
        expert = tl.load(ids_ptr + row).to(tl.int64)
        a_row_index = (row // TOP_K).to(tl.int64)
        a_row = a_ptr + a_row_index * stride_am
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            k_ok = kk < K
            a = _activation_chunk(a_row, kk, k_ok, stride_ak, EVEN_K)
            acc += tl.sum(_weight_rows(b_ptr, s_ptr, z_ptr, expert, offs_n, n_ok, kk, k_ok, k, K, stride_be, stride_bn,
                                       stride_bk, stride_se, stride_sn, stride_ze, stride_zn, FORMAT, GROUP_SIZE,
                                       HAS_ZEROS, BLOCK_K, a_ptr.dtype.element_ty) * a[None, :], axis=1)
            acc_up += tl.sum(_weight_rows(b_ptr, s_ptr, z_ptr, expert, offs_n + N, n_ok, kk, k_ok, k, K, stride_be,
                                          stride_bn, stride_bk, stride_se, stride_sn, stride_ze, stride_zn, FORMAT,
                                          GROUP_SIZE, HAS_ZEROS, BLOCK_K, a_ptr.dtype.element_ty) * a[None, :],
                             axis=1)
        if FORMAT == 3:  # the row's activation scale (W8A8)
            row_scale = tl.load(a_scale_ptr + a_row_index)
            acc *= row_scale
            acc_up *= row_scale
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        # one loop over (expert, K tile) pairs rather than a K loop per expert: a down projection's K
        # (the expert's intermediate size, 768 at Qwen3-30B-A3B) is a few tiles, too short a loop for the
        # software pipeline to hide the loads' latency once per expert. The routing weight (and W8A8's
        # activation scale) is folded into the activation chunk, sum_j w_j (W_j a_j) = sum_j W_j (w_j a_j),
        # so one accumulator serves every expert.
        k_tiles = tl.cdiv(K, BLOCK_K)
        for step in range(0, TOP_K * k_tiles):
            j = step // k_tiles
            k = (step - j * k_tiles) * BLOCK_K
            pair = row * TOP_K + j
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            kk = k + offs_k
            k_ok = kk < K
            coef = tl.load(weights_ptr + pair).to(tl.float32)
            if FORMAT == 3:
                coef *= tl.load(a_scale_ptr + pair)
            a = _activation_chunk(a_ptr + pair.to(tl.int64) * stride_am, kk, k_ok, stride_ak, EVEN_K) * coef
            acc += tl.sum(_weight_rows(b_ptr, s_ptr, z_ptr, expert, offs_n, n_ok, kk, k_ok, k, K, stride_be,
                                       stride_bn, stride_bk, stride_se, stride_sn, stride_ze, stride_zn, FORMAT,
                                       GROUP_SIZE, HAS_ZEROS, BLOCK_K, a_ptr.dtype.element_ty) * a[None, :], axis=1)
    tl.store(c_ptr + row.to(tl.int64) * stride_cm + offs_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _weight_rows(b_ptr, s_ptr, z_ptr, expert, offs_n, n_ok, kk, k_ok, k0, K, stride_be, stride_bn, stride_bk,
                 stride_se, stride_sn, stride_ze, stride_zn, FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr, a_dtype: tl.constexpr):
    """Rows offs_n, columns kk of the expert's weights, fp32 [BLOCK_N, BLOCK_K]: float weights as
    stored; integer ones dequantized and rounded to the activations' dtype (as the GEMM multiplies
    them); FP8 ones scaled in fp32 (the product of W8A8 is fp32)."""
    mask = n_ok[:, None] & k_ok[None, :]
    if FORMAT == 0:
        w = tl.load(b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn + kk[None, :] * stride_bk,
                    mask=mask, other=0.0)
        return w.to(tl.float32)
    if FORMAT == 2:
        w = expert_int4_rows(b_ptr, s_ptr, z_ptr, expert, offs_n, n_ok, k0, K, stride_be, stride_bn, stride_se,
                             stride_sn, stride_ze, stride_zn, GROUP_SIZE, HAS_ZEROS, BLOCK_K, a_dtype)
        return w.to(tl.float32)
    rows = offs_n[:, None].to(tl.int64)
    if FORMAT == 3:
        w = expert_weight_tile(b_ptr, s_ptr, z_ptr, expert, rows, kk[None, :], n_ok[:, None], mask, k0, stride_be,
                               stride_bn, stride_bk, stride_se, stride_sn, stride_ze, stride_zn, FORMAT, GROUP_SIZE,
                               HAS_ZEROS, BLOCK_K, False, tl.float32)
    else:
        w = expert_weight_tile(b_ptr, s_ptr, z_ptr, expert, rows, kk[None, :], n_ok[:, None], mask, k0, stride_be,
                               stride_bn, stride_bk, stride_se, stride_sn, stride_ze, stride_zn, FORMAT, GROUP_SIZE,
                               HAS_ZEROS, BLOCK_K, False, a_dtype)
    return w.to(tl.float32)


def _gemv(a, b, c, ids, weights, n: int, k: int, top_k: int, gated: bool, quant: ExpertQuant | None,
          a_scale) -> None:
    def grid(meta):
        return (c.shape[0], triton.cdiv(n, meta["BLOCK_N"]))

    s, z, q_consts = kernel_quant_args(quant, k, c)
    launch_tuned(_moe_gemv_kernel, grid, (
        a, b, c, ids, weights, s, z, a_scale if a_scale is not None else weights, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        s.stride(0), s.stride(1), z.stride(0), z.stride(1),
    ), dict(TOP_K=top_k, GATED=gated, EVEN_K=k % 512 == 0, **q_consts), _first_config(gated))


def _first_config(gated: bool) -> triton.Config:
    """Without autotuning: 32-wide n-tiles for gate_up (pairs x N programs), 16 for down (tokens x N)."""
    configs = _moe_gemv_kernel.configs
    return configs[0] if gated or len(configs) == 1 else configs[1]


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, w13_quant: ExpertQuant | None = None,
                     w2_quant: ExpertQuant | None = None) -> torch.Tensor:
    """fused_moe.fused_moe's result for few tokens (arguments checked there) -> [tokens, hidden]."""
    M, H = x.shape
    inter, top_k = w13.shape[1] // 2, topk_ids.shape[1]
    fp8 = w13_quant is not None and w13_quant.format == "fp8"
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    a, a_scale = quantize_fp8_per_token_triton(x) if fp8 else (x, None)  # W8A8: e4m3 rows and their scales
    act = x.new_empty((M * top_k, inter))
    _gemv(a, w13, act, ids, weights, inter, H, top_k, True, w13_quant, a_scale)
    a, a_scale = quantize_fp8_per_token_triton(act) if fp8 else (act, None)
    out = x.new_empty((M, H))
    _gemv(a, w2, out, ids, weights, H, inter, top_k, False, w2_quant, a_scale)
    return out
