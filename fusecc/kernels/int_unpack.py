"""In registers, from fusecc's int4/int8 weights (layouts: quant_matmul.py's module docstring) to exact
float32 integers: unpacking int4 words, and making int8 values float without a conversion instruction.

Each packed word is loaded once, as a [BN, BK/8] tile read coalesced, then replicated 8 times along K in
registers (three tl.interleave's put word j at columns 8j .. 8j + 7) and shifted by 4 * (k % 8); vLLM's
Triton AWQ kernel unpacks the same way. On an H100 the alternatives were slow: gathering each word once
per nibble (words[n, k // 8]) ran the dequantize kernel at a quarter of the int8 one's bandwidth, and a
third-axis unpack ([BN, BK/8, 8], reduced over both axes) held the one-row GEMV to ~380 GB/s
(benchmarks/results/quant_linears.json's note).
"""

import triton
import triton.language as tl

# 2^23 as float32 bits: adding an integer 0 <= v < 2^23 to them gives the bits of the float 2^23 + v
# (int8_to_float)
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def unpack_int4_tile(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K: tl.constexpr):
    """Nibbles of input columns k0 .. k0 + BLOCK_K of rows offs_n -> int32 [BN, BLOCK_K] values 0..15
    (0 past k_hi). k0 is a multiple of 8; each int32 word is loaded once (module docstring)."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                    mask=n_ok[:, None] & (offs_w * 8 < k_hi)[None, :], other=0)  # [BN, BK/8]
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)  # [BN, BK]: column 8j + i holds word j
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4
    return (words >> shifts[None, :]) & 0xF


@triton.jit
def int8_to_float(q):
    """int8 values -> the same values as exact float32, without a conversion instruction: q + 128
    (0..255) is added into the mantissa of 2^23 (one integer add) and 2^23 + 128 subtracted (one float
    add). H100 conversions run at 16 per SM and clock, an eighth of the FMA rate. Measured
    (benchmarks/results/quant_linears.json, run 2): with it and the per-channel accumulation the int8
    GEMV went from 1.80x to 2.17x bf16 at qkv_proj; the same trick on int4 nibbles made the int4 GEMV
    slower (13.7 -> 15.9 us), so int4 keeps the conversion."""
    return (q.to(tl.int32) + (_MAGIC_BITS + 128)).to(tl.float32, bitcast=True) - (_MAGIC + 128)


@triton.jit
def nibble_planes_of(x, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [ROWS, BLOCK_K] -> its 8 planes x[:, 8j + i], i = 0..7, each [ROWS, BLOCK_K / 8], split off in
    registers: the activations that meet nibble i of each packed word."""
    c0, c1 = tl.split(tl.reshape(x, (ROWS, BLOCK_K // 8, 2, 2, 2)))  # plane i = 4a + 2b + c
    b0c0, b1c0 = tl.split(c0)
    b0c1, b1c1 = tl.split(c1)
    x0, x4 = tl.split(b0c0)
    x2, x6 = tl.split(b1c0)
    x1, x5 = tl.split(b0c1)
    x3, x7 = tl.split(b1c1)
    return x0, x1, x2, x3, x4, x5, x6, x7
