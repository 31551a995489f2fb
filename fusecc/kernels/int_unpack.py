"""In registers, from fusecc's int4/int8 weights (layouts: quant_matmul.py's module docstring) to exact
float32 integers: unpacking int4 words and converting small integers without conversion instructions.

Each packed word is loaded once, as a [BN, BK/8] tile read coalesced, then replicated 8 times along K in
registers (three tl.interleave's put word j at columns 8j .. 8j + 7) and shifted by 4 * (k % 8); vLLM's
Triton AWQ kernel unpacks the same way. On an H100 the alternatives were slow: gathering each word once
per nibble (words[n, k // 8]) ran the dequantize kernel at a quarter of the int8 one's bandwidth, and a
third-axis unpack ([BN, BK/8, 8], reduced over both axes) held the one-row GEMV to ~380 GB/s
(benchmarks/results/quant_lin.json's first rows).
"""

import triton
import triton.language as tl

# 2^23 as float32 bits: OR-ing an integer 0 <= v < 2^23 into the mantissa gives the float 2^23 + v exactly
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
def small_ints_to_float(q, OFFSET: tl.constexpr):
    """int32 values v with 0 <= v + OFFSET < 2^23 -> the same values as exact float32, without a
    conversion instruction: the integer is placed in the mantissa of 2^23 (one integer add or or) and 2^23
    subtracted (one float add). On an H100 int-to-float conversions run at 16 per SM and clock, an eighth
    of the FMA rate; they, not the memory, bounded the one-row GEMV (two conversions per int4 byte)."""
    if OFFSET == 0:
        bits = q | _MAGIC_BITS  # with unpack_int4_tile's mask, one three-input logic op
    else:
        bits = q + (_MAGIC_BITS + OFFSET)
    return bits.to(tl.float32, bitcast=True) - (_MAGIC + OFFSET)


@triton.jit
def biased_nibbles(nibbles, dtype: tl.constexpr):
    """int32 values 0..15 -> (value + nibble_bias(dtype)) in `dtype`, exact, for tl.dot operands: in bf16
    and fp16 the nibble is OR-ed into the mantissa of 128 (bf16) or 1024 (fp16), one logic op and a
    truncation, no conversion; fp32 gets the value itself (small_ints_to_float). The caller takes
    bias * sum(x) off the dot's fp32 result."""
    if dtype == tl.bfloat16:
        return (nibbles | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float16:
        return (nibbles | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        return small_ints_to_float(nibbles, 0)


@triton.jit
def nibble_bias(dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        return 128.0
    elif dtype == tl.float16:
        return 1024.0
    else:
        return 0.0
