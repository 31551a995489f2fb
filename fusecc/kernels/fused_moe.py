"""Fused mixture-of-experts MLP: two grouped GEMMs over tokens sorted by expert (after vLLM's fused_moe).

    x:            [tokens, hidden]                  the MoE block's input
    w13:          [experts, 2 * inter, hidden]      gate rows then up rows of each expert (HF's gate_up_proj)
    w2:           [experts, hidden, inter]          down projection of each expert (HF's down_proj)
    topk_weights: [tokens, top_k]                   routing weight of each chosen expert
    topk_ids:     [tokens, top_k]                   the chosen experts
    out:          [tokens, hidden] = sum_k topk_weights[t, k] * w2[e] @ (silu(w1[e] @ x[t]) * (w3[e] @ x[t])),
                                     e = topk_ids[t, k]

Steps (pair p = token * top_k + k):
1. moe_align.py sorts the pairs by expert, each expert's run padded to BLOCK_M rows.
2. gate_up GEMM: program (block, n-tile) multiplies the BLOCK_M rows of x of its block by the gate AND
   the up columns n-tile of its expert's w13 (two accumulators sharing each x tile), and stores
   silu(gate) * up, the SwiGLU epilogue: act [pairs, inter]; the [pairs, 2 * inter] pre-activation
   never reaches memory.
3. down GEMM: the same kernel (GATED=False) over act with w2; its epilogue multiplies each row by its
   routing weight: [pairs, hidden].
4. The top-k reduction is a separate `sum` over [tokens, top_k, hidden]. Fusing it into step 3 would
   take atomic adds into the output (rows of one token are in different experts' blocks, different
   programs): fp32 atomics need an fp32 buffer, a zero fill and a cast (three passes instead of one),
   and their order varies from run to run, so greedy outputs would not be reproducible. The sum reads
   top_k * hidden elements per token, next to the 3 * inter * hidden weights of each expert a token
   visits: noise.

Quantized experts (int8 / int4 / fp8, layouts in moe_expert_weights.py) run the same two kernels with
the weight tiles dequantized in registers (FORMAT constexpr); fp8 is W8A8: x and act are quantized per
row to e4m3 before each GEMM, the dots run in e4m3 and the row and weight scales multiply the results.

One or two tokens (batch-1/2 decode) take fused_moe_decode.py instead: matrix-vector kernels without
the sort and with the top-k sum in registers.

Tiles: BLOCK_M comes from the expected rows per expert (pairs / experts), fixed before the sort (the
padding depends on it): 16 for decode and small batches, up to 128 for long prefills. BLOCK_N/K, warps
and stages are autotuned per (N, K, BLOCK_M, GATED) when autotuning is on (FUSECC_AUTOTUNE, the compiled
graph's `autotune` option), else the hand-picked config of the class (first_config) is launched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.exact_dot import exact_dot
from fusecc.kernels.fp8_matmul import quantize_fp8_per_token, quantize_fp8_per_token_triton
from fusecc.kernels.fused_moe_decode import DECODE_MAX_TOKENS, fused_moe_decode
from fusecc.kernels.launch import launch_tuned
from fusecc.kernels.moe_align import moe_align_block_size
from fusecc.kernels.moe_expert_weights import (FP8, ExpertQuant, check_expert_quant, dequantize_experts,
                                               expert_int4_rows, expert_weight_tile, group_scale, kernel_quant_args)
from fusecc.triton_support import interpreting

# (BLOCK_M class, GATED) -> hand-picked (BLOCK_N, BLOCK_K, GROUP_M, warps, stages); the gated kernel
# reads 2 * BLOCK_N weight columns per tile, so its BLOCK_N is half the plain kernel's. Starting points
# from vLLM's H100 tables for E=128/N=768 and E=8/N=14336 (bf16), rescaled to the gated tile.
_FIRST = {
    (16, True): (32, 128, 1, 4, 4), (16, False): (64, 128, 1, 4, 4),
    (32, True): (64, 128, 1, 4, 3), (32, False): (128, 128, 1, 4, 3),
    (64, True): (64, 64, 8, 8, 3), (64, False): (128, 64, 8, 4, 3),
    (128, True): (64, 64, 8, 8, 3), (128, False): (128, 64, 8, 8, 3),
}


def _config(bn, bk, group, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_warps=warps, num_stages=stages)


def gemm_configs() -> list[triton.Config]:
    if interpreting():
        return [_config(16, 16, 1, 4, 1)]
    extra = [(32, 64, 1, 4, 4), (128, 64, 1, 4, 3), (32, 256, 1, 4, 2), (128, 128, 8, 8, 3), (64, 128, 8, 4, 3)]
    return [_config(*c) for c in dict.fromkeys(list(_FIRST.values()) + extra)]


def prune_configs(configs, named_args, **kwargs):
    """Short tiles (decode, small batches) sweep the weights once: no row grouping; tall tiles group
    rows for L2 reuse. Halves what autotuning compiles and times per shape (7 and 5 configs)."""
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    if block_m is None or len(configs) == 1:
        return configs
    keep = [c for c in configs if (c.kwargs["GROUP_M"] == 1) == (block_m <= 32)]
    if kwargs.get("FORMAT") == FP8:  # block-scaled FP8: a K tile must lie in one scale group
        keep = [c for c in keep if kwargs["GROUP_SIZE"] % c.kwargs["BLOCK_K"] == 0]
    return keep or configs


def first_config(block_m: int, gated: bool) -> triton.Config:
    """The config launched without autotuning."""
    configs = _moe_gemm_kernel.configs  # the autotuner's own objects: launch_tuned skips its first choice by identity
    if interpreting():
        return configs[0]
    want = _config(*_FIRST[(block_m, gated)])
    return next(c for c in configs if c.kwargs == want.kwargs and c.num_warps == want.num_warps
                and c.num_stages == want.num_stages)


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per tile from the mean rows per expert (decode: 16, a tile that is mostly padding anyway)."""
    per_expert = num_pairs / num_experts
    if per_expert <= 8:
        return 16
    if per_expert <= 24:
        return 32
    return 64 if per_expert <= 64 else 128


@triton.autotune(configs=gemm_configs(), key=["N", "K", "BLOCK_M", "GATED", "FORMAT", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": prune_configs}, cache_results=True)
@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])  # per-step sizes: kernels/launch.py
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr, s_ptr, z_ptr, a_scale_ptr,
    N, K, num_pairs, num_blocks,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_se, stride_sn, stride_ze, stride_zn,
    A_ROW_DIV: tl.constexpr,  # pair -> row of a: top_k when a is x (gate_up), 1 when a is act (down)
    GATED: tl.constexpr,  # b holds gate rows [0, N) and up rows [N, 2N): store silu(gate) * up
    ROUTED: tl.constexpr,  # multiply each row by its pair's routing weight
    EVEN_K: tl.constexpr,
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,  # moe_expert_weights.py
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    if FORMAT == 3:  # FP8: the weight scale multiplies each K tile's dot, so a tile must lie in one group
        tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    # grouped launch order: GROUP_M row blocks sweep the n-tiles together (their weight tiles stay in L2)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return  # past the padded runs: the block count was an upper bound
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    valid = pairs < num_pairs  # padding rows hold num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    # columns wrap around N instead of masking the weight loads; the store masks them
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    n_all = offs_n[None, :] < N  # true: the scale loads' mask
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [K, N] tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        if FORMAT == 0:
            if EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            acc = exact_dot(a, b, acc)
            if GATED:
                if EVEN_K:
                    b_up = tl.load(b_ptrs + N * stride_bn)
                else:
                    b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None], other=0.0)
                acc_up = exact_dot(a, b_up, acc_up)
            b_ptrs += BLOCK_K * stride_bk
        else:
            acc = _quantized_tile_dot(a, acc, b_ptr, s_ptr, z_ptr, expert, offs_n[None, :], n_all,
                                      (k * BLOCK_K + offs_k)[:, None], k_ok[:, None], k * BLOCK_K, K,
                                      stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_ze, stride_zn,
                                      FORMAT, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
            if GATED:
                acc_up = _quantized_tile_dot(a, acc_up, b_ptr, s_ptr, z_ptr, expert, offs_n[None, :] + N, n_all,
                                             (k * BLOCK_K + offs_k)[:, None], k_ok[:, None], k * BLOCK_K, K,
                                             stride_be, stride_bn, stride_bk, stride_se, stride_sn, stride_ze,
                                             stride_zn, FORMAT, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
    if FORMAT == 3:  # each row's activation scale (W8A8)
        row_scale = tl.load(a_scale_ptr + a_rows, mask=valid, other=0.0)[:, None]
        acc *= row_scale
        acc_up *= row_scale
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if ROUTED:
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < N))


@triton.jit
def _quantized_tile_dot(a, acc, w_ptr, s_ptr, z_ptr, expert, n_idx, n_ok, k_idx, k_ok, k0, K,
                        stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_ze, stride_zn,
                        FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """acc + a @ the expert's quantized [K, N] tile: integer weights dequantized to a's dtype first,
    FP8 ones multiplied on the tensor cores in e4m3 and the dot scaled by the tile's group scale.
    int4 tiles are unpacked as [N, K] rows from words loaded once, then transposed (the columns of
    this kernel's tiles wrap around N, so every row is valid)."""
    if FORMAT == 2:
        rows = tl.reshape(n_idx, (n_idx.shape[1],))
        b = tl.trans(expert_int4_rows(w_ptr, s_ptr, z_ptr, expert, rows, tl.full(rows.shape, 1, tl.int1), k0, K,
                                      stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
                                      GROUP_SIZE, HAS_ZEROS, BLOCK_K, a.dtype))
    else:
        b = expert_weight_tile(w_ptr, s_ptr, z_ptr, expert, n_idx, k_idx, n_ok, k_ok, k0,
                               stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_ze, stride_zn,
                               FORMAT, GROUP_SIZE, HAS_ZEROS, BLOCK_K, True, a.dtype)
    if FORMAT == 3:
        return acc + tl.dot(a, b) * group_scale(s_ptr, expert, n_idx, n_ok, k0, stride_se, stride_sn, GROUP_SIZE)
    return exact_dot(a, b, acc)


def _gemm(a, b, c, weights, sorted_ids, expert_ids, total, n: int, k: int, a_row_div: int, gated: bool,
          routed: bool, block_m: int, quant: ExpertQuant | None = None, a_scale=None) -> None:
    num_pairs, num_blocks = c.shape[0], expert_ids.shape[0]
    s, z, q_consts = kernel_quant_args(quant, k, c)

    def grid(meta):
        return (num_blocks * triton.cdiv(n, meta["BLOCK_N"]),)

    launch_tuned(_moe_gemm_kernel, grid, (
        a, b, c, weights, sorted_ids, expert_ids, total, s, z, a_scale if a_scale is not None else weights,
        n, k, num_pairs, num_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        s.stride(0), s.stride(1), z.stride(0), z.stride(1),
    ), dict(A_ROW_DIV=a_row_div, GATED=gated, ROUTED=routed, EVEN_K=k % 256 == 0,
            BLOCK_M=block_m, **q_consts), first_config(block_m, gated))


def check_moe_args(x, w13, w2, topk_weights, topk_ids, w13_quant: ExpertQuant | None = None,
                   w2_quant: ExpertQuant | None = None) -> None:
    """ValueError naming the first inconsistent shape or dtype. With quantized experts (both projections
    quantized, in one format) the weights' layouts are moe_expert_weights.py's."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe expects x [tokens, hidden], w13 [experts, 2*inter, hidden], w2 [experts, hidden, "
                         f"inter]; got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [tokens={x.shape[0]}, top_k]")
    E, two_inter, H = w13.shape[0], w13.shape[1], x.shape[1]
    if (w13_quant is None) != (w2_quant is None) or (w13_quant and w13_quant.format != w2_quant.format):
        raise ValueError("fused_moe: w13 and w2 must both be float or both quantized in one format")
    if w13_quant is not None:
        if two_inter % 2:
            raise ValueError(f"fused_moe: w13 has {two_inter} rows, not gate and up halves")
        check_expert_quant("w13", w13, w13_quant, E, two_inter, H)
        check_expert_quant("w2", w2, w2_quant, E, H, two_inter // 2)
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"fused_moe: quantized experts take fp16/bf16/fp32 activations, got {x.dtype}")
        return
    if w13.shape[2] != H or two_inter % 2 or tuple(w2.shape) != (E, H, two_inter // 2):
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match hidden "
                         f"{x.shape[1]} (w2 must be [experts, hidden, w13.shape[1] // 2])")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"fused_moe: x, w13, w2 dtypes differ: {x.dtype}, {w13.dtype}, {w2.dtype}")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_quant: ExpertQuant | None = None, w2_quant: ExpertQuant | None = None,
              block_m: int | None = None, decode: bool | None = None) -> torch.Tensor:
    """The MoE MLP of the module docstring -> [tokens, hidden] in x's dtype; w13_quant/w2_quant describe
    quantized expert weights (moe_expert_weights.py). Up to DECODE_MAX_TOKENS tokens run the
    matrix-vector kernels of fused_moe_decode.py instead (decode=True/False forces the choice); block_m
    overrides the tile-row heuristic (tests)."""
    check_moe_args(x, w13, w2, topk_weights, topk_ids, w13_quant, w2_quant)
    M, H = x.shape
    E, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    if M == 0:
        return x.new_zeros((0, H))
    x = x if x.stride(1) == 1 else x.contiguous()
    fp8 = w13_quant is not None and w13_quant.format == "fp8"
    if decode if decode is not None else M <= DECODE_MAX_TOKENS:
        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids, w13_quant, w2_quant)
    num_pairs = M * top_k
    block_m = block_m or choose_block_m(num_pairs, E)
    sorted_ids, expert_ids, total = moe_align_block_size(topk_ids, block_m, E)
    weights = topk_weights.reshape(-1).contiguous()  # [pairs]
    a, a_scale = quantize_fp8_per_token_triton(x) if fp8 else (x, None)  # W8A8: e4m3 rows and their scales
    act = x.new_empty((num_pairs, inter))
    _gemm(a, w13, act, weights, sorted_ids, expert_ids, total, inter, H, top_k, True, False, block_m,
          w13_quant, a_scale)
    a, a_scale = quantize_fp8_per_token_triton(act) if fp8 else (act, None)
    down = x.new_empty((num_pairs, H))
    _gemm(a, w2, down, weights, sorted_ids, expert_ids, total, H, inter, 1, False, True, block_m, w2_quant, a_scale)
    if top_k == 1:
        return down
    return down.view(M, top_k, H).sum(dim=1)


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, *, w13_quant: ExpertQuant | None = None,
                        w2_quant: ExpertQuant | None = None) -> torch.Tensor:
    """The same result from a loop over the experts that received tokens, as transformers' experts
    compute it (each expert's output weighted, rounded to x's dtype, summed into the output); the CPU
    path of `fusecc::fused_moe` and `fusecc::fused_moe_quantized`. Quantized experts: integer weights
    dequantized to x's dtype; FP8 (W8A8) also rounds each projection's input rows to e4m3 per row."""
    check_moe_args(x, w13, w2, topk_weights, topk_ids, w13_quant, w2_quant)
    inter, H = w13.shape[1] // 2, x.shape[1]
    fp8 = w13_quant is not None and w13_quant.format == "fp8"
    if w13_quant is not None:
        compute = torch.float32 if fp8 else x.dtype
        w13 = dequantize_experts(w13, w13_quant, H, compute)
        w2 = dequantize_experts(w2, w2_quant, inter, compute)

    def project(a, w):  # fp8: per-row e4m3 activations, the product in fp32 (the kernels' math)
        if not fp8:
            return torch.nn.functional.linear(a, w)
        aq, sa = quantize_fp8_per_token(a)
        return ((aq.float() * sa[:, None]) @ w.t()).to(a.dtype)

    out = torch.zeros_like(x)
    for e in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == e)
        gate, up = project(x[token], w13[e]).split([inter, inter], dim=-1)
        y = project(torch.nn.functional.silu(gate) * up, w2[e])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(x.dtype))
    return out
