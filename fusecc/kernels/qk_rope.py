"""Query/key preparation of a decoder layer in one kernel: per-head RMSNorm (Qwen3's q_norm / k_norm,
optional) and rotary embedding (non-interleaved, rotate_half) of the q and k heads of the fused qkv
projection's output, as the native models compute them (runtime/models/llama.py):

    q, k = qkv[:, :Hq*D].view(T, Hq, D), qkv[:, Hq*D:(Hq+Hkv)*D].view(T, Hkv, D)
    q, k = q_norm(q), k_norm(k)                          # if NORM: fp32 rms, cast back, times the weight
    x = x * cos[pos] + cat(-x2, x1) * sin[pos]           # cos/sin cast to x's dtype first

The compiled graph runs that as four generated kernels (two norms, two rotations: rotate_half reads
another column of the normalized row, which the generated kernels cannot take from registers) for every
layer of every step; at batch-1 decode each is a launch of a few microseconds around a few KB. Here one
program per (token, group of 8 heads) holds those heads as a [heads, D] tile and reads the rotated half as
a second load of the same rows (an L1 hit), so the norm's result never leaves registers. Roundings follow eager's:
the normalized value, its product with the weight, x * cos, rot * sin and their sum are each rounded to
x's dtype, so bf16 results match the eager modules' up to the last bit of the fp32 sum of squares (another
order) and the rsqrt.

The kernel launches with enable_fp_fusion=False. The math is written in fp32 with an explicit
`.to(dtype).to(fp32)` at each eager rounding, but LLVM (legitimately) narrows fptrunc(fmul/fadd(fpext a,
fpext b)) into native bf16/fp16 arithmetic on sm_90, and with contraction allowed (Triton's default) the
NVPTX backend then fused x * cos and the sum into one `fma.rn.bf16x2`, dropping the product's rounding:
about 15% of H100 bf16 outputs were one bf16 step off eager even without the norm. Without fusion every
float op is a separately rounded `.rn` instruction (which ptxas may not contract either; Triton also passes
it --fmad=false). tests/kernels/test_qk_rope.py checks the sm_90 PTX for that, on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normed(x, rstd, w, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """x (fp32 values of DTYPE) normalized as RMSNorm rounds it: (x * rstd) in DTYPE, times the weight in DTYPE."""
    if NORM:
        return (w * (x * rstd).to(DTYPE).to(tl.float32)).to(DTYPE).to(tl.float32)
    return x


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, HQ, HEADS,
                         stride_qkv, stride_cos, stride_q, stride_k, eps,
                         D: tl.constexpr, NORM: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, D)
    rot_cols = (cols + D // 2) % D  # rotate_half: column d meets column d + D/2 (mod D)
    in_heads = (heads < HEADS)[:, None]
    row = qkv_ptr + token * stride_qkv + heads[:, None] * D
    x = tl.load(row + cols[None, :], mask=in_heads, other=0.0)
    x_rot = tl.load(row + rot_cols[None, :], mask=in_heads, other=0.0).to(tl.float32)
    x = x.to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    rstd = tl.zeros((BLOCK_H, 1), dtype=tl.float32)
    w = tl.zeros((BLOCK_H, D), dtype=tl.float32)
    w_rot = w
    if NORM:
        # the mean as CUDA's mean reduction computes it, the sum times 1/D (exact where D is a power of two);
        # `/` would be div.full.f32, an approximation
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) * (1.0 / D) + eps)[:, None]
        is_q = (heads < HQ)[:, None]
        w = tl.where(is_q, tl.load(qw_ptr + cols).to(tl.float32)[None, :],
                     tl.load(kw_ptr + cols).to(tl.float32)[None, :])
        w_rot = tl.where(is_q, tl.load(qw_ptr + rot_cols).to(tl.float32)[None, :],
                         tl.load(kw_ptr + rot_cols).to(tl.float32)[None, :])
    x = _normed(x, rstd, w, NORM, dtype)
    x_rot = _normed(x_rot, rstd, w_rot, NORM, dtype)
    # cat(-x2, x1); a product with -1 negates zeros too (Triton's `-x` is 0 - x: +0 stays +0)
    x_rot = x_rot * tl.where((cols < D // 2)[None, :], -1.0, 1.0)
    position = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cos_ptr + position * stride_cos + cols).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + position * stride_cos + cols).to(dtype).to(tl.float32)[None, :]
    out = ((x * cos).to(dtype).to(tl.float32) + (x_rot * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(q_ptr + token * stride_q + heads[:, None] * D + cols[None, :], out, mask=(heads < HQ)[:, None])
    k_heads = tl.maximum(heads - HQ, 0)
    tl.store(k_ptr + token * stride_k + k_heads[:, None] * D + cols[None, :], out,
             mask=((heads >= HQ) & (heads < HEADS))[:, None])


# heads a program takes: at batch-1 decode (one token) a Qwen3 layer's 36 q and k heads spread over 5
# programs instead of one, each with a [8, D] tile that stays in registers
HEADS_PER_PROGRAM = 8


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, num_heads: int,
                 num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (Hq + 2 Hkv) * D] (rows contiguous along the features) -> q [T, Hq, D], k [T, Hkv, D]
    normalized (when the weights are given) and rotated, by the kernel; cos/sin [positions, D] fp32."""
    T = qkv.shape[0]
    q = qkv.new_empty((T, num_heads, head_dim))
    k = qkv.new_empty((T, num_kv_heads, head_dim))
    if T:
        heads = num_heads + num_kv_heads
        norm = q_weight is not None
        block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads))
        _qk_norm_rope_kernel[(T, triton.cdiv(heads, block_h))](
            qkv, positions, cos, sin, q_weight if norm else cos, k_weight if norm else cos, q, k, num_heads, heads,
            qkv.stride(0), cos.stride(0), q.stride(0), k.stride(0), eps, D=head_dim, NORM=norm,
            BLOCK_H=block_h, num_warps=4 if block_h * head_dim >= 1024 else 1,
            enable_fp_fusion=False)  # each eager rounding stays one: no (b)f16 or fp32 FMA contraction
    return q, k


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as transformers computes it: normalized in fp32, cast back, then scaled
    (runtime/models/llama.py's RMSNorm module; this kernel's reference)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE of x [T, heads, D], cos/sin tables [positions, D] cast to x's dtype first, as
    transformers does (runtime/models/llama.py's Rotary module; this kernel's reference)."""
    c, s = cos[positions].to(x.dtype).unsqueeze(1), sin[positions].to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat([-x2, x1], dim=-1) * s


def qk_norm_rope_reference(qkv, positions, cos, sin, q_weight, k_weight, eps: float, num_heads: int,
                           num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops: the native modules' rms_norm and rotate."""
    T = qkv.shape[0]
    q = qkv[:, :num_heads * head_dim].view(T, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(T, num_kv_heads, head_dim)
    if q_weight is not None:
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    return rotate(q, cos, sin, positions), rotate(k, cos, sin, positions)
