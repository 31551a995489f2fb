"""Weight-only quantized matmul: W4A16 and W8A16 (`BITS` constexpr), dequantized in registers.

    out[M, N] = x[M, K] @ W[N, K].T (+ bias),   W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],  g = k // group

fusecc's weight layouts (output channel first, so fused q|k|v and gate|up stack along dim 0):

    int4:  qweight int32 [N, K/8]: word j of row n holds k = 8j + i in bits 4i..4i+3 (unsigned 0..15,
           little-endian nibbles along K). AWQ's and GPTQ's packings are converted into this at load
           (fusecc/quantization/packing.py).
    int8:  qweight int8 [N, K], signed.
    scales fp32 [N, ceil(K / group)]; zeros fp32 [N, ceil(K / group)] or None (symmetric: zero 0).
    group_size -1 = one group per row (per-output-channel scales, [N, 1]).

fp32 scales and zeros keep fp16 (AWQ/GPTQ) and bf16 values exact whatever the activation dtype; a
fractional zero also represents GGUF's Q4_1 (w = d * q + m: zero = -m / d).
int4 is unpacked in registers from words loaded once, int8 made float without a conversion instruction
(fusecc/kernels/int_unpack.py). The decode tiles also offer int4 as nibble planes, 8 dots of K = BK/8:
dequantized by one FMA a weight (_planes_dot), or left raw as bias + q in half precision, made two at a
time by one and-or in inline PTX, with scale, zero and bias applied per row and group after the dots
(_biased_planes_dot: compiled for sm_90, about a third of the unpacked tile's instructions per weight);
the autotuner keeps whichever form is fastest.
Paths (decode split-K / prefill) and autotuning: fusecc/kernels/quant_launch.py.
One row (batch-1 decode) goes to a GEMV without tensor cores (fusecc/kernels/quant_gemv.py) or to the
tiles, whichever the GPU times faster for the weight's shape (one_row_path).

Many rows (M >= DEQUANTIZE_MIN_ROWS[bits]): the weight is dequantized once into a [N, K] buffer of x's
dtype by a memory-bound kernel, then multiplied by cuBLAS (torch.mm), as vLLM's AWQ path does from 256
tokens. At prefill sizes the matmul is compute-bound, and on an H100 the in-register int4 dequant held
the tensor cores to about 48 TFLOP/s (benchmarks/results/quant_linears.json); dequantizing N*K values
once costs what reading the bf16 weight twice would. The buffer is transient (prefill runs outside
CUDA graphs; the KV pool's sizing profiles a full prefill, so its peak counts it). Its weights are the
fp32-computed (q - z) * s rounded to x's dtype, as in the fused tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusecc.kernels.exact_dot import exact_dot
from fusecc.kernels.int_unpack import (_BIASED_PLANES, BIASED_PLANES, FMA_PLANES, INLINE_PTX,  # noqa: F401
                                      UNPACKED, biased_nibble_planes, int4_words, int8_to_float, nibble_bias, nibble_planes_of,
                                      unpack_int4_tile)
from fusecc.kernels.launch import autotune_enabled, launch_tuned
from fusecc.kernels.quant_gemv import weight_only_gemv
from fusecc.kernels.quant_launch import (DECODE_MAX_ROWS, choose_split_k, decode_configs, finish_splits,
                                         k_per_split, m_bucket, prefill_configs, program_tile,
                                         split_align, store_output_tile)
from fusecc.triton_support import interpreting


@triton.jit
def _row_group(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, GROUP_SIZE: tl.constexpr,
               HAS_ZEROS: tl.constexpr):
    """(scale, zero) [BN] of rows offs_n in the group holding input column k0 (zero 0 without zero points):
    for a tile lying in one group."""
    g = k0 // GROUP_SIZE
    scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0)
    zero = tl.zeros_like(scale)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0.0)
    return scale, zero


@triton.jit
def _dequantize(q, offs_n, n_ok, offs_k, k_ok, k0, s_ptr, z_ptr, stride_sn, stride_zn,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, ONE_GROUP: tl.constexpr):
    """q [BN, X] fp32 integer values of input columns offs_k [X] -> (q - zero) * scale [BN, X] fp32."""
    if ONE_GROUP:  # the tile lies in one group: one scale (and zero) per row
        scale, zero = _row_group(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, GROUP_SIZE, HAS_ZEROS)
        s = scale[:, None]
        if HAS_ZEROS:
            q = q - zero[:, None]
    else:  # several groups per tile (group 32 or 64 with wide K tiles): gathered per element
        g = offs_k[None, :] // GROUP_SIZE
        mask = n_ok[:, None] & k_ok[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g, mask=mask, other=0.0)
        if HAS_ZEROS:
            q = q - tl.load(z_ptr + offs_n[:, None] * stride_zn + g, mask=mask, other=0.0)
    return q * s


@triton.jit
def _plane_dot(acc, x_plane, words, scale, zero_scale, SHIFT: tl.constexpr):
    """acc + x_plane @ the dequantized nibble plane at bit SHIFT: the nibble masked in place is q * 2^SHIFT
    (exact as a float), so (q - z) * s is one FMA with s / 2^SHIFT and z * s."""
    w = (words & (0xF << SHIFT)).to(tl.float32) * (scale * (1.0 / (1 << SHIFT)))[:, None] - zero_scale[:, None]
    return exact_dot(x_plane, tl.trans(w.to(x_plane.dtype)), acc)


@triton.jit
def _planes_dot(acc, x, w_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_wn, stride_sn, stride_zn, k0, k_hi,
                GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x [BM, BK] @ the int4 tile's dequantized weights, as 8 dots of K = BK/8, one per nibble plane
    (plane i: input columns 8j + i): each weight is an and, a conversion and one FMA, no shift, and x's
    planes are split off the loaded tile in registers. One group per tile (GROUP_SIZE % BK == 0)."""
    words = int4_words(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K).to(tl.uint32, bitcast=True)
    scale, zero = _row_group(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, GROUP_SIZE, HAS_ZEROS)
    zero_scale = zero * scale
    x0, x1, x2, x3, x4, x5, x6, x7 = nibble_planes_of(x, BLOCK_M, BLOCK_K)
    acc = _plane_dot(acc, x0, words, scale, zero_scale, 0)
    acc = _plane_dot(acc, x1, words, scale, zero_scale, 4)
    acc = _plane_dot(acc, x2, words, scale, zero_scale, 8)
    acc = _plane_dot(acc, x3, words, scale, zero_scale, 12)
    acc = _plane_dot(acc, x4, words, scale, zero_scale, 16)
    acc = _plane_dot(acc, x5, words, scale, zero_scale, 20)
    acc = _plane_dot(acc, x6, words, scale, zero_scale, 24)
    return _plane_dot(acc, x7, words, scale, zero_scale, 28)


@triton.jit
def _biased_planes_dot(acc, x, w_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_wn, stride_sn, stride_zn, k0, k_hi,
                       GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """acc + x [BM, BK] @ the int4 tile's dequantized weights with the tensor cores multiplying the raw
    nibbles: 8 dots of K = BK/8 against the planes of bias + q (int_unpack.biased_nibble_planes: about one
    instruction per weight), then per row and group

        sum_k (q - z) s x = s * (sum_k (bias + q) x - (bias + z) * sum_k x)

    (bias + q) x is exact in fp32 (an 8- or 11-bit by 8- or 11-bit product), so the result is the
    float64 one up to fp32 accumulation; _planes_dot instead rounds each dequantized weight to x's dtype
    before its dot, as the unpacked tile does. x bf16 or fp16; one group per tile."""
    words = int4_words(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3, w4, w5, w6, w7 = biased_nibble_planes(words, x.dtype, INLINE_PTX)
    x0, x1, x2, x3, x4, x5, x6, x7 = nibble_planes_of(x, BLOCK_M, BLOCK_K)
    dots = tl.dot(x0, tl.trans(w0))
    dots = tl.dot(x1, tl.trans(w1), dots)
    dots = tl.dot(x2, tl.trans(w2), dots)
    dots = tl.dot(x3, tl.trans(w3), dots)
    dots = tl.dot(x4, tl.trans(w4), dots)
    dots = tl.dot(x5, tl.trans(w5), dots)
    dots = tl.dot(x6, tl.trans(w6), dots)
    dots = tl.dot(x7, tl.trans(w7), dots)
    scale, zero = _row_group(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, GROUP_SIZE, HAS_ZEROS)
    offset = zero + nibble_bias(x.dtype)
    x_sum = tl.sum(x.to(tl.float32), axis=1)
    return acc + (dots - x_sum[:, None] * offset[None, :]) * scale[None, :]


# the int4 tile's forms (config kwarg PLANES, int_unpack's constants), each autotuned against the others:
# unpacked along K and dequantized; nibble planes dequantized by one FMA a weight (_planes_dot); nibble
# planes of bias + q multiplied raw (_biased_planes_dot)


@triton.jit(do_not_specialize=["M"])  # per-step sizes: kernels/launch.py
def _weight_only_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, k_split,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_zn, stride_os, stride_om, stride_on,
    M_BUCKET,  # autotune key only
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PLANES: tl.constexpr,
):
    pid_k, offs_m, offs_n, m_ok, n_ok, k_lo, k_hi = program_tile(M, N, K, k_split, BLOCK_M, BLOCK_N)
    ONE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        if BITS == 4 and PLANES == _BIASED_PLANES:  # int4, x half precision, one group a tile, BLOCK_K >= 128
            acc = _biased_planes_dot(acc, x, w_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_wn, stride_sn, stride_zn, k0,
                                     k_hi, GROUP_SIZE, HAS_ZEROS, BLOCK_M, BLOCK_K)
        elif BITS == 4 and PLANES:  # int4, the tile in one group, BLOCK_K >= 128: _planes_dot
            acc = _planes_dot(acc, x, w_ptr, s_ptr, z_ptr, offs_n, n_ok, stride_wn, stride_sn, stride_zn, k0, k_hi,
                              GROUP_SIZE, HAS_ZEROS, BLOCK_M, BLOCK_K)
        else:
            if BITS == 4:
                q = unpack_int4_tile(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K).to(tl.float32)
            else:
                q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0)
                q = int8_to_float(q)
            w = _dequantize(q, offs_n, n_ok, offs_k, k_ok, k0, s_ptr, z_ptr, stride_sn, stride_zn,
                            GROUP_SIZE, HAS_ZEROS, ONE_GROUP)
            acc += exact_dot(x, tl.trans(w.to(x.dtype)), None)  # [BN, BK] in x's dtype
    store_output_tile(acc, out_ptr, b_ptr, pid_k, stride_os, stride_om, stride_on, offs_m, offs_n, m_ok, n_ok,
                      PARTIAL, HAS_BIAS)


@triton.jit
def _dequantize_weight_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                              BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] (x's dtype) = (q - zero) * scale, one [BLOCK_N, BLOCK_K] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok, k_ok = offs_n < N, offs_k < K
    mask = n_ok[:, None] & k_ok[None, :]
    if BITS == 4:
        q = unpack_int4_tile(w_ptr, offs_n, n_ok, stride_wn, k0, K, BLOCK_K).to(tl.float32)
    else:
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
        q = int8_to_float(q)
    w = _dequantize(q, offs_n, n_ok, offs_k, k_ok, k0, s_ptr, z_ptr, stride_sn, stride_zn,
                    GROUP_SIZE, HAS_ZEROS, GROUP_SIZE % BLOCK_K == 0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"]


def _with_planes(configs: list[triton.Config], planes: int) -> list[triton.Config]:
    return [triton.Config({**c.kwargs, "PLANES": planes}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in configs]


def _fitting_planes(configs: list[triton.Config], bits, group, x_dtype) -> list[triton.Config]:
    # nibble planes: int4 only, K tiles of 128+ (dots of K >= 16) lying in one group; the biased planes
    # are half-precision floats, so x must be bf16 or fp16 (the dot's operands share a dtype)
    def fits(c: triton.Config) -> bool:
        mode, block_k = c.kwargs["PLANES"], c.kwargs["BLOCK_K"]
        if mode == UNPACKED:
            return True
        planes = bits == 4 and block_k >= 128 and group is not None and group % block_k == 0
        return planes and (mode != BIASED_PLANES or x_dtype in (torch.bfloat16, torch.float16))

    return [c for c in configs if fits(c)]


# decode tiles: each config in each of the int4 tile's forms (the autotuner picks)
_decode_kernel = triton.autotune(
    configs=[c for mode in (UNPACKED, FMA_PLANES, BIASED_PLANES) for c in _with_planes(decode_configs(), mode)],
    key=_KEY, cache_results=True,
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: _fitting_planes(
        configs, kw.get("BITS"), kw.get("GROUP_SIZE"), named_args["x_ptr"].dtype)},
)(_weight_only_matmul_kernel)


def _biased_prefill_configs() -> list[triton.Config]:
    """Tiles of 17+ rows in the biased-planes form: K tiles of 128 (8 dots of K = 16)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "PLANES": BIASED_PLANES}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "PLANES": BIASED_PLANES}, num_warps=w,
                          num_stages=s)
            for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)]]


# prefill tiles (17 rows up to the dequantize path's threshold): unpacked, or int4 as biased planes
_prefill_kernel = triton.autotune(
    configs=_with_planes(prefill_configs(), UNPACKED) + _biased_prefill_configs(), key=_KEY, cache_results=True,
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: _fitting_planes(
        configs, kw.get("BITS"), kw.get("GROUP_SIZE"), named_args["x_ptr"].dtype)},
)(_weight_only_matmul_kernel)


def group_constexpr(group_size: int, K: int) -> int:
    """The kernel's GROUP_SIZE: per-channel (-1) becomes a power of two >= K, so every tile is in group 0."""
    return max(256, triton.next_power_of_2(K)) if group_size == -1 else group_size


# rows from which the weight is dequantized for cuBLAS rather than in registers (module docstring), from
# benchmarks/results/quant_linears.json's crossover rows (H100, Llama-8B qkv_proj and gate_up_proj): int4's
# tiles win at 64 rows and lose at 256; int8's tie at 256 and lose by 1.5x at 1024.
DEQUANTIZE_MIN_ROWS = {4: 256, 8: 512}
_DEQUANT_BLOCK_N, _DEQUANT_BLOCK_K = 32, 128


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` from fusecc's int4/int8 layout, on the GPU (Triton)."""
    N = qweight.shape[0]
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    zeros_arg = zeros if zeros is not None else scales
    grid = (triton.cdiv(N, _DEQUANT_BLOCK_N), triton.cdiv(K, _DEQUANT_BLOCK_K))
    _dequantize_weight_kernel[grid](
        qweight, scales, zeros_arg, out, N, K, qweight.stride(0), scales.stride(0), zeros_arg.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_constexpr(group_size, K), HAS_ZEROS=zeros is not None,
        BLOCK_N=_DEQUANT_BLOCK_N, BLOCK_K=_DEQUANT_BLOCK_K, num_warps=4)
    return out


PATHS = ("gemv", "tiles", "dequantize")


def weight_only_path(M: int, bits: int) -> str:
    """The path a call with M rows takes: one row -> gemv (quant_gemv.py; on a GPU one_row_path may time
    tiles faster); up to DEQUANTIZE_MIN_ROWS -> tiles (split-K decode tiles to DECODE_MAX_ROWS, then
    prefill tiles); beyond -> dequantize + cuBLAS."""
    if M == 1:
        return "gemv"
    return "dequantize" if M >= DEQUANTIZE_MIN_ROWS[bits] else "tiles"


# (weight shape, bits, group, zeros?, bias?, dtype, device) -> the faster one-row path on this GPU
_ONE_ROW_CHOICE: dict = {}
ONE_ROW_PATHS = ("gemv", "tiles")


def one_row_path(x, qweight, scales, zeros, bits: int, group_size: int, bias, measure: bool | None = None) -> str:
    """gemv or tiles (M padded to the tensor cores' 16) for one row,
    whichever ran faster the first time this weight shape came: which one wins depends on the shape and
    the GPU's ratio of ALU to tensor-core and memory throughput. Timed once per shape when autotuning is
    on (measure: default x on a GPU and autotune_enabled()), never while a CUDA graph is captured (the
    engine runs every shape before capturing); gemv until timed."""
    if measure is None:
        measure = x.is_cuda and autotune_enabled()
    if not measure:
        return "gemv"
    key = (tuple(qweight.shape), bits, group_size, zeros is not None, bias is not None, x.dtype, x.device)
    path = _ONE_ROW_CHOICE.get(key)
    if path is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return "gemv"
        times = {p: _time_one_row(lambda p=p: weight_only_matmul(x, qweight, scales, zeros, bits, group_size,
                                                                  bias, path=p)) for p in ONE_ROW_PATHS}
        path = _ONE_ROW_CHOICE[key] = min(times, key=times.get)
    return path


def _time_one_row(run) -> float:
    """Median milliseconds of run() (autotuning, if any, happens in its first call, before the timing)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def weight_only_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bits: int, group_size: int, bias: torch.Tensor | None = None,
                       split_k: int | None = None, path: str | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequantized W [N, K].T -> [M, N] in x's dtype. path: one of PATHS
    to force (benchmarks, tests; gemv needs M == 1), None: weight_only_path's; split_k: the K splits
    of the gemv and decode-tile paths (tests)."""
    M, K = x.shape
    N = qweight.shape[0]
    check_weight_only(qweight, scales, zeros, bits, group_size, K)
    if path is None:
        path = weight_only_path(M, bits)
        if path == "gemv":
            path = one_row_path(x, qweight, scales, zeros, bits, group_size, bias)
    if path not in PATHS or (path == "gemv" and M != 1):
        raise ValueError(f"weight-only path must be one of {', '.join(PATHS)} (gemv for one row), got {path!r} "
                         f"for {M} rows")
    if path == "dequantize" and M > 0:
        w = dequantize_weight(qweight, scales, zeros, bits, group_size, K, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    if path == "gemv":
        out = torch.empty((1, N), dtype=x.dtype, device=x.device)
        return weight_only_gemv(x.contiguous(), qweight, scales, zeros, bits, group_constexpr(group_size, K), bias,
                                out, split_k)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    group = group_constexpr(group_size, K)
    consts = dict(BITS=bits, GROUP_SIZE=group, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None)
    zeros_arg = zeros if zeros is not None else scales
    bias_arg = bias if bias is not None else scales
    if M <= DECODE_MAX_ROWS:
        align = split_align(_decode_kernel.configs)
        splits = choose_split_k(M, N, K, align, x.device, split_k)
        step = k_per_split(K, splits, align)
        splits = triton.cdiv(K, step)
        target = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
        launch_tuned(_decode_kernel, grid, (
            x, qweight, scales, zeros_arg, bias_arg, target, M, N, K, step,
            x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros_arg.stride(0),
            target.stride(0) if splits > 1 else 0, target.stride(-2), target.stride(-1), m_bucket(M),
        ), dict(consts, PARTIAL=splits > 1), _decode_kernel.configs[0])
        return finish_splits(target, bias, out) if splits > 1 else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), 1)  # noqa: E731
    launch_tuned(_prefill_kernel, grid, (
        x, qweight, scales, zeros_arg, bias_arg, out, M, N, K, K,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), zeros_arg.stride(0),
        0, out.stride(0), out.stride(1), m_bucket(M),
    ), dict(consts, PARTIAL=False), _prefill_kernel.configs[0])
    return out


def check_weight_only(qweight, scales, zeros, bits: int, group_size: int, K: int) -> None:
    """ValueError naming what does not match fusecc's int4/int8 layout (module docstring)."""
    N = qweight.shape[0]
    if bits == 4:
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (N, triton.cdiv(K, 8)):
            raise ValueError(f"int4 qweight must be int32 [N, ceil(K/8)] = [{N}, {triton.cdiv(K, 8)}], "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
    elif bits == 8:
        if qweight.dtype != torch.int8 or tuple(qweight.shape) != (N, K):
            raise ValueError(f"int8 qweight must be int8 [N, K] = [{N}, {K}], got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
    else:
        raise ValueError(f"weight-only bits must be 4 or 8, got {bits}")
    if qweight.stride(1) != 1:
        raise ValueError(f"qweight must be row-major (stride 1 along K), got strides {qweight.stride()}")
    groups = 1 if group_size == -1 else triton.cdiv(K, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        # a single group's column stride is never used (a [N, 1] view of a transpose has stride N there)
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (N, groups)
                              or (groups > 1 and t.stride(1) != 1)):
            raise ValueError(f"{name} must be float32 [N, groups] = [{N}, {groups}] (row-major), got "
                             f"{t.dtype} {tuple(t.shape)}")


# ---- torch reference (CPU runs and tests) ----

def unpack_int4(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """int32 [N, ceil(K/8)] -> int32 [N, K] values 0..15 (nibble i of word j is k = 8j + i)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    return ((qweight.unsqueeze(-1) >> shifts) & 0xF).reshape(qweight.shape[0], -1)[:, :K]


def dequantize_weight_only(qweight, scales, zeros, bits: int, group_size: int, K: int,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] in `dtype` (computed in fp32)."""
    q = (unpack_int4(qweight, K) if bits == 4 else qweight).float()
    group = K if group_size == -1 else group_size
    g = torch.arange(K, device=q.device) // group  # [K] group of each input column
    if zeros is not None:
        q = q - zeros.float()[:, g]
    return (q * scales.float()[:, g]).to(dtype)


def weight_only_matmul_reference(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    return torch.nn.functional.linear(x, dequantize_weight_only(qweight, scales, zeros, bits, group_size,
                                                                x.shape[1], x.dtype), bias)
