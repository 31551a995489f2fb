"""Weight-only GEMV: one activation row (batch-1 decode) times an int4/int8 weight, without tensor cores.

    out[1, N] = x[1, K] @ W[N, K].T,   W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]

At one row the matmul is a pass over the weight bytes: what matters is reading them at full bandwidth
and spending as few instructions per weight as possible. The tile path (quant_matmul.py) pads the row to
16 for tl.dot and dequantizes every weight to x's dtype first. Here each program reads [BLOCK_N, BLOCK_K]
weights (int4: packed words loaded once and unpacked in registers, kernels/int_unpack.py), multiplies the raw
integers by x in fp32 and folds the group's scale and zero in once per row and tile:

    sum_k (q - z) * s * x = s * (sum_k q * x - z * sum_k x)      (one group per tile: BLOCK_K <= group)

With per-channel scales (int8's default) the whole row is one group, so the products accumulate
elementwise over the K loop and are reduced once. int8 values become floats without a conversion
instruction (int_unpack.int8_to_float). Measured on an H100 (benchmarks/results/quant_linears.json):
the int8 GEMV reads its weights at 2.2-2.7 TB/s; the int4 one at ~1 TB/s, so something other than the
memory bounds it (two weights a byte to unpack, convert, multiply and add); removing its conversions
through the mantissa of 2^23 made it slower. A third int4 form (biased planes: bias + q made two at a
time in bf16 by one and-or, widened by a shift) spends no integer-to-float conversion at all; it is
autotuned beside the other two and not yet measured on a GPU.

K is split over programs (partial sums added by quant_launch.finish_splits) so that a narrow N still
fills the GPU. Layouts: quant_matmul.py's module docstring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.int_unpack import (_BIASED_PLANES, BIASED_PLANES, FMA_PLANES, INLINE_PTX, UNPACKED,
                                      biased_nibble_planes, int4_words, int8_to_float, nibble_bias, nibble_planes_of,
                                      unpack_int4_tile)
from fusecc.kernels.launch import launch_tuned
from fusecc.kernels.quant_launch import choose_split_k, finish_splits, k_per_split, split_align
from fusecc.triton_support import interpreting


def gemv_configs() -> list[triton.Config]:
    """PLANES (int4 only; int_unpack's forms): the tile unpacked along K, as 8 nibble planes made float by
    conversions, or as 8 planes of bias + q (below)."""
    if interpreting():  # the interpreter runs the first that fits (launch_tuned); tests force the others
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "PLANES": form}, num_warps=4, num_stages=1)
                for form in (UNPACKED, FMA_PLANES, BIASED_PLANES)]
    plain = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PLANES": UNPACKED}, num_warps=w, num_stages=s)
             for bn, bk, w, s in [(64, 128, 4, 3), (32, 256, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3),
                                  (32, 128, 4, 4), (128, 64, 4, 4), (256, 32, 8, 3), (128, 32, 4, 4),
                                  (256, 128, 8, 3), (128, 128, 4, 4)]]
    planes = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "PLANES": form}, num_warps=w, num_stages=s)
              for form in (FMA_PLANES, BIASED_PLANES)
              for bn, bk, w, s in [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3),
                                   (128, 64, 4, 4), (256, 64, 8, 3)]]
    return plain + planes


@triton.jit
def _tile_products(x_ptr, w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                   PLANES: tl.constexpr):
    """(products, x) of the K tile k0 .. k0 + BLOCK_K: q * x elementwise (fp32; summing products over its
    second axis gives sum_k q[n, k] x[k]; biased planes: (bias + q) * x, the caller subtracts
    bias * sum_k x) and the x values it used (summing them gives sum_k x[k]).
    int4 unpacked along K: [BN, BK] and [BK]. int4 planes: [BN, BK/8] and [BK/8], the 8 nibble planes
    (plane i: input columns 8j + i, against x[8j + i]) added into one tile as they are made: no
    replication along K, an eighth of the adds.
    FMA planes: nibble i masked in place is q * 16^i, exact as a float (4 significant bits), against
    x / 16^i (a power of two: exact): an and, a conversion and an FMA a weight. Compiled for sm_90
    (cuobjdump of the [64, 128] tile, 4 warps) about 6% fewer instructions than the unpacked tile.
    Biased planes: two nibbles of a word become two bf16 values 128 + q with one and-or
    (int_unpack.biased_nibble_planes), widened to fp32 exactly by a shift: no integer-to-float
    conversion, which sm_90 issues at a quarter of the FMA rate. Their speed on a GPU is the
    autotuner's call."""
    if BITS == 4 and PLANES:  # a plane form
        words = int4_words(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K).to(tl.uint32, bitcast=True)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)  # one contiguous load
        x_all = tl.sum(tl.reshape(x, (BLOCK_K // 8, 8)), axis=1)  # [BK/8]: each word's 8 columns
        x0, x1, x2, x3, x4, x5, x6, x7 = nibble_planes_of(x[None, :], 1, BLOCK_K)  # [1, BK/8] each
        if PLANES == _BIASED_PLANES:
            w0, w1, w2, w3, w4, w5, w6, w7 = biased_nibble_planes(words, tl.bfloat16, INLINE_PTX)
            products = w0.to(tl.float32) * x0
            products += w1.to(tl.float32) * x1
            products += w2.to(tl.float32) * x2
            products += w3.to(tl.float32) * x3
            products += w4.to(tl.float32) * x4
            products += w5.to(tl.float32) * x5
            products += w6.to(tl.float32) * x6
            products += w7.to(tl.float32) * x7
        else:
            products = (words & 0xF).to(tl.float32) * x0
            products += (words & 0xF0).to(tl.float32) * (x1 * (1.0 / 16))
            products += (words & 0xF00).to(tl.float32) * (x2 * (1.0 / 16 ** 2))
            products += (words & 0xF000).to(tl.float32) * (x3 * (1.0 / 16 ** 3))
            products += (words & 0xF0000).to(tl.float32) * (x4 * (1.0 / 16 ** 4))
            products += (words & 0xF00000).to(tl.float32) * (x5 * (1.0 / 16 ** 5))
            products += (words & 0xF000000).to(tl.float32) * (x6 * (1.0 / 16 ** 6))
            products += (words & 0xF0000000).to(tl.float32) * (x7 * (1.0 / 16 ** 7))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_all = tl.load(x_ptr + offs_k, mask=offs_k < k_hi, other=0.0).to(tl.float32)
        if BITS == 4:
            q = unpack_int4_tile(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K).to(tl.float32)
        else:
            q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=n_ok[:, None] & (offs_k < k_hi)[None, :], other=0)
            q = int8_to_float(q)
        products = q * x_all[None, :]
    return products, x_all


@triton.jit
def _minus_offsets(qx, x_sum, z_ptrs, n_ok, HAS_ZEROS: tl.constexpr, BIASED: tl.constexpr):
    """sum_k (q' - o) x = sum_k q' x - o * sum_k x for the offsets o the products carried: the zero
    point, and the bias of biased planes (q' = bias + q)."""
    if BIASED:
        qx = qx - nibble_bias(tl.bfloat16) * x_sum
    if HAS_ZEROS:
        qx = qx - tl.load(z_ptrs, mask=n_ok, other=0.0) * x_sum
    return qx


@triton.jit
def _weight_only_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, k_split,
                             stride_wn, stride_sn, stride_zn, stride_os,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                             ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PLANES: tl.constexpr):
    """Program (n tile, k split): fp32 partial sums of out[n] over its K range into out_ptr[split, n].
    ONE_GROUP (per-channel scales: the whole K range is one group): products accumulate elementwise in a
    [BN, BK] tile (one FMA per weight) and are reduced, scaled and shifted by the zero once at the end;
    otherwise each tile (one group) is reduced and scaled as it comes."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = offs_n < N
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    if ONE_GROUP:
        WIDTH: tl.constexpr = BLOCK_K // 8 if BITS == 4 and PLANES else BLOCK_K
        products = tl.zeros((BLOCK_N, WIDTH), dtype=tl.float32)
        x_sums = tl.zeros((WIDTH,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            tile, x = _tile_products(x_ptr, w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BITS, BLOCK_K, PLANES)
            products += tile
            x_sums += x
        qx = _minus_offsets(tl.sum(products, axis=1), tl.sum(x_sums, axis=0), z_ptr + offs_n * stride_zn, n_ok,
                            HAS_ZEROS, BITS == 4 and PLANES == _BIASED_PLANES)
        acc = tl.load(s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0) * qx
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            tile, x = _tile_products(x_ptr, w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BITS, BLOCK_K, PLANES)
            g = k0 // GROUP_SIZE
            qx = _minus_offsets(tl.sum(tile, axis=1), tl.sum(x, axis=0), z_ptr + offs_n * stride_zn + g, n_ok,
                                HAS_ZEROS, BITS == 4 and PLANES == _BIASED_PLANES)
            acc += tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0) * qx
    tl.store(out_ptr + pid_k * stride_os + offs_n, acc, mask=n_ok)


_weight_only_gemv = triton.autotune(configs=gemv_configs(), key=["N", "K", "BITS", "GROUP_SIZE"],
                                    cache_results=True,
                                    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw:
                                                      _fitting_block_k(configs, kw.get("GROUP_SIZE"), kw.get("BITS"))},
                                    )(_weight_only_gemv_kernel)


def _fitting_block_k(configs: list[triton.Config], group: int | None, bits: int | None) -> list[triton.Config]:
    # one group per tile: BLOCK_K divides the group (per-channel groups are a power of two >= K);
    # nibble planes are an int4 layout
    keep = [c for c in configs if (group is None or group % c.kwargs["BLOCK_K"] == 0)
            and not (bits == 8 and c.kwargs["PLANES"])]
    return keep or [configs[0]]


def weight_only_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group: int, bias: torch.Tensor | None, out: torch.Tensor,
                     splits: int | None = None) -> torch.Tensor:
    """x [1, K] -> out [1, N] (+ bias). `group` is quant_matmul.group_constexpr's (a power of two >= K
    for per-channel scales); the layout was checked by the caller. splits: override (tests)."""
    K = x.shape[1]
    N = qweight.shape[0]
    fitting = _fitting_block_k(_weight_only_gemv.configs, group, bits)
    align = split_align(fitting)  # every split starts on a tile (and group) edge, as the decode tiles' do
    step = k_per_split(K, choose_split_k(1, N, K, align, x.device, splits), align)
    splits = triton.cdiv(K, step)
    partial = torch.empty((splits, 1, N), dtype=torch.float32, device=x.device)
    zeros_arg = zeros if zeros is not None else scales
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    launch_tuned(_weight_only_gemv, grid, (
        x, qweight, scales, zeros_arg, partial, N, K, step,
        qweight.stride(0), scales.stride(0), zeros_arg.stride(0), partial.stride(0),
    ), dict(BITS=bits, GROUP_SIZE=group, HAS_ZEROS=zeros is not None, ONE_GROUP=group >= K), fitting[0])
    return finish_splits(partial, bias, out)
