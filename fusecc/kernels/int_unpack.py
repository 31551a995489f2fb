"""In registers, from fusecc's int4/int8 weights (layouts: quant_matmul.py's module docstring) to exact
float32 integers: unpacking int4 words, and making int8 values float without a conversion instruction.

Each packed word is loaded once, as a [BN, BK/8] tile read coalesced, then replicated 8 times along K in
registers (three tl.interleave's put word j at columns 8j .. 8j + 7) and shifted by 4 * (k % 8); vLLM's
Triton AWQ kernel unpacks the same way. On an H100 the alternatives were slow: gathering each word once
per nibble (words[n, k // 8]) ran the dequantize kernel at a quarter of the int8 one's bandwidth, and a
third-axis unpack ([BN, BK/8, 8], reduced over both axes) held the one-row GEMV to ~380 GB/s
(benchmarks/results/quant_linears.json's note).

For the tensor cores, biased_nibble_planes makes int4 words half-precision operands directly: the 8
nibble planes of a word as bias + q, two values an instruction (a lop3 in inline PTX); the GEMV widens
the same planes to fp32 (exact, a shift where a conversion instruction would be a quarter-rate one).
"""

import triton
import triton.language as tl

from fusecc.triton_support import interpreting

# 2^23 as float32 bits: adding an integer 0 <= v < 2^23 to them gives the bits of the float 2^23 + v
# (int8_to_float)
_MAGIC_BITS = tl.constexpr(0x4B000000)
_MAGIC = tl.constexpr(8388608.0)


@triton.jit
def int4_words(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K: tl.constexpr):
    """The packed words holding input columns k0 .. k0 + BLOCK_K of rows offs_n, as stored: int32
    [BN, BLOCK_K / 8], one coalesced load (0 for rows past n_ok and words past k_hi). k0 is a multiple of 8."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    return tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :],
                   mask=n_ok[:, None] & (offs_w * 8 < k_hi)[None, :], other=0)


@triton.jit
def unpack_int4_tile(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K: tl.constexpr):
    """Nibbles of input columns k0 .. k0 + BLOCK_K of rows offs_n -> int32 [BN, BLOCK_K] values 0..15
    (0 past k_hi). k0 is a multiple of 8; each int32 word is loaded once (module docstring)."""
    words = int4_words(w_ptr, offs_n, n_ok, stride_wn, k0, k_hi, BLOCK_K)  # [BN, BK/8]
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


# The int4 tile forms that kernels autotune against each other (config kwarg PLANES): unpacked along K;
# 8 nibble planes, each weight made float by a conversion (FMA planes); 8 nibble planes of bias + q made
# two at a time by one and-or (biased planes, below)
UNPACKED, FMA_PLANES, BIASED_PLANES = 0, 1, 2
_BIASED_PLANES = tl.constexpr(BIASED_PLANES)
# biased_nibble_planes' ASM argument: inline PTX where kernels are compiled for a GPU, its pure-Triton
# twin where the interpreter runs them
INLINE_PTX = tl.constexpr(not interpreting())


# bits of the half-precision float whose unit in the last place is 1 (bf16 128.0, fp16 1024.0), twice: OR-ing
# a nibble into a half's low mantissa bits gives that float plus the nibble, exactly
_BF16_BIAS_BITS = tl.constexpr(0x43004300)
_FP16_BIAS_BITS = tl.constexpr(0x64006400)


def _biased_planes_asm(bias_bits: int) -> str:
    """PTX of biased_nibble_planes: $8 the word, $0 .. $7 the planes (the low half of each and-or is
    nibble i, the high half nibble i + 4). lop3's 0xEA is (a & b) | c."""
    lines = []
    for i in range(4):
        source = "$8" if i == 0 else "s"
        if i:
            lines.append(f"shr.u32 s, $8, {4 * i};")
        lines.append(f"lop3.b32 t, {source}, 0x000F000F, {bias_bits:#010x}, 0xEA;")
        lines.append(f"mov.b32 {{${i}, ${i + 4}}}, t;")
    return "{ .reg .b32 t, s; " + " ".join(lines) + " }"


_BIASED_PLANES_ASM_BF16 = tl.constexpr(_biased_planes_asm(_BF16_BIAS_BITS.value))
_BIASED_PLANES_ASM_FP16 = tl.constexpr(_biased_planes_asm(_FP16_BIAS_BITS.value))
_PLANES_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r")
_EIGHT_INT16 = tl.constexpr((tl.int16,) * 8)


@triton.jit
def nibble_bias(DTYPE: tl.constexpr):
    """The offset biased_nibble_planes adds to every nibble in DTYPE: 128 (bf16) or 1024 (fp16)."""
    return 128.0 if DTYPE == tl.bfloat16 else 1024.0


@triton.jit
def _biased_pair(words, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """Nibbles SHIFT/4 and SHIFT/4 + 4 of each word as (bias + nibble) in DTYPE: one and-or (LOP3) for both."""
    bits = _BF16_BIAS_BITS if DTYPE == tl.bfloat16 else _FP16_BIAS_BITS
    t = ((words >> SHIFT) & 0x000F000F) | bits
    low = (t & 0xFFFF).to(tl.uint16).to(DTYPE, bitcast=True)
    high = (t >> 16).to(tl.uint16).to(DTYPE, bitcast=True)
    return low, high


@triton.jit
def biased_nibble_planes(words, DTYPE: tl.constexpr, ASM: tl.constexpr):
    """uint32 words [..] -> their 8 nibble planes as DTYPE (bf16 or fp16) tensors of the same shape, plane i
    holding nibble_bias + nibble i (bits 4i .. 4i + 3), exact. Two nibbles of a word (i and i + 4, one in
    each 16-bit half) become two halves with one and-or against the bits of the bias (the FasterTransformer /
    Marlin conversion): about one instruction per weight, where a shift, mask and int-to-float conversion
    per weight cost three. The tensor cores then multiply bias + q exactly; the caller removes the bias
    with the zero point, once per row and group. ASM: the same in inline PTX (GPU only: the interpreter
    runs no assembly), so the halves come out of the 32-bit register without extraction instructions."""
    if ASM:  # the halves come out as int16 bits (one output type for both dtypes), bitcast below
        if DTYPE == tl.bfloat16:
            h0, h1, h2, h3, h4, h5, h6, h7 = tl.inline_asm_elementwise(
                asm=_BIASED_PLANES_ASM_BF16, constraints=_PLANES_CONSTRAINTS, args=[words], dtype=_EIGHT_INT16,
                is_pure=True, pack=1)
        else:
            h0, h1, h2, h3, h4, h5, h6, h7 = tl.inline_asm_elementwise(
                asm=_BIASED_PLANES_ASM_FP16, constraints=_PLANES_CONSTRAINTS, args=[words], dtype=_EIGHT_INT16,
                is_pure=True, pack=1)
        return (h0.to(DTYPE, bitcast=True), h1.to(DTYPE, bitcast=True), h2.to(DTYPE, bitcast=True),
                h3.to(DTYPE, bitcast=True), h4.to(DTYPE, bitcast=True), h5.to(DTYPE, bitcast=True),
                h6.to(DTYPE, bitcast=True), h7.to(DTYPE, bitcast=True))
    p0, p4 = _biased_pair(words, 0, DTYPE)
    p1, p5 = _biased_pair(words, 4, DTYPE)
    p2, p6 = _biased_pair(words, 8, DTYPE)
    p3, p7 = _biased_pair(words, 12, DTYPE)
    return p0, p1, p2, p3, p4, p5, p6, p7
