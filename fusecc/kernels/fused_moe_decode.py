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

from fusecc.kernels.launch import launch_tuned
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


@triton.autotune(configs=gemv_configs(), key=["N", "K", "GATED", "TOP_K"], cache_results=True)
@triton.jit
def _moe_gemv_kernel(a_ptr, b_ptr, c_ptr, ids_ptr, weights_ptr, N, K,
                     stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                     TOP_K: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)  # GATED: a pair; else a token
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if GATED:
        expert = tl.load(ids_ptr + row).to(tl.int64)
        a_row = a_ptr + (row // TOP_K).to(tl.int64) * stride_am
        w_rows = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn  # gate rows; up: + N rows
        acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            k_ok = kk < K
            a = _activation_chunk(a_row, kk, k_ok, stride_ak, EVEN_K)
            w_ptrs = w_rows + kk[None, :] * stride_bk
            mask = n_ok[:, None] & k_ok[None, :]
            acc += tl.sum(tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) * a[None, :], axis=1)
            acc_up += tl.sum(tl.load(w_ptrs + N * stride_bn, mask=mask, other=0.0).to(tl.float32) * a[None, :],
                             axis=1)
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        for j in tl.static_range(TOP_K):
            pair = row * TOP_K + j
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            a_row = a_ptr + pair.to(tl.int64) * stride_am
            w_rows = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                kk = k + offs_k
                k_ok = kk < K
                a = _activation_chunk(a_row, kk, k_ok, stride_ak, EVEN_K)
                w = tl.load(w_rows + kk[None, :] * stride_bk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                part += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
            acc += tl.load(weights_ptr + pair).to(tl.float32) * part
    tl.store(c_ptr + row.to(tl.int64) * stride_cm + offs_n * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=n_ok)


def _gemv(a, b, c, ids, weights, n: int, k: int, top_k: int, gated: bool) -> None:
    def grid(meta):
        return (c.shape[0], triton.cdiv(n, meta["BLOCK_N"]))

    launch_tuned(_moe_gemv_kernel, grid, (
        a, b, c, ids, weights, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
    ), dict(TOP_K=top_k, GATED=gated, EVEN_K=k % 512 == 0), _first_config(gated))


def _first_config(gated: bool) -> triton.Config:
    """Without autotuning: 32-wide n-tiles for gate_up (pairs x N programs), 16 for down (tokens x N)."""
    configs = _moe_gemv_kernel.configs
    return configs[0] if gated or len(configs) == 1 else configs[1]


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe.fused_moe's result for few tokens (arguments checked there) -> [tokens, hidden]."""
    M, H = x.shape
    inter, top_k = w13.shape[1] // 2, topk_ids.shape[1]
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    act = x.new_empty((M * top_k, inter))
    _gemv(x, w13, act, ids, weights, inter, H, top_k, True)
    out = x.new_empty((M, H))
    _gemv(act, w2, out, ids, weights, H, inter, top_k, False)
    return out
