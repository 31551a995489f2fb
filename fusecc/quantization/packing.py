"""Weight packings: other formats -> fusecc's layouts (fusecc/kernels/quant_matmul.py, fp8_matmul.py),
and round-to-nearest quantization of float weights at load.

All functions take one linear's tensors and return them output-channel first ([N, ...]).

AutoAWQ GEMM (quant_method "awq", version "gemm"), W [N, K], group G:
    qweight int32 [K, N/8]    8 output columns per word; column 8j + ORDER[i] in nibble i,
                              ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (so column c sits in nibble REVERSE[c])
    qzeros  int32 [K/G, N/8]  the same packing; w = (q - z) * s
    scales  fp16  [K/G, N]
GPTQ (quant_method "gptq", desc_act false), bits b in {4, 8}, p = 32 / b values per word:
    qweight int32 [K/p, N]    packed along the INPUT dim: row k = p*j + i in bits b*i.. of word j
    qzeros  int32 [K/G, N/p]  packed along the output dim, sequential; checkpoint_format "gptq" (v1)
                              stores z - 1 (so a symmetric 4-bit zero 8 is stored as 7), "gptq_v2" stores z
    scales  fp16  [K/G, N]
"""

from __future__ import annotations

import torch

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
FP8_MAX = 448.0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] integers 0..15 -> fusecc int4, int32 [N, ceil(K/8)] (nibble i of word j is k = 8j + i)."""
    N, K = q.shape
    padded = torch.zeros((N, -(-K // 8) * 8), dtype=torch.int64, device=q.device)
    padded[:, :K] = q.to(torch.int64) & 0xF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (padded.view(N, -1, 8) << shifts).sum(-1)  # [N, K/8] in 0 .. 2**32 - 1
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    # two's complement: values >= 2**31 become negative int32 with the same bits
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32/bits]: value i of word c at column c * 32/bits + i (sequential)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def awq_to_fusecc(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ GEMM tensors -> (int4 qweight [N, K/8], scales fp32 [N, K/G], zeros fp32 [N, K/G])."""
    order = torch.tensor(AWQ_REVERSE_ORDER, device=qweight.device)

    def logical(packed):  # [R, N/8] -> [R, N] in output-column order
        nibbles = _unpack_cols(packed, 4).view(packed.shape[0], -1, 8)
        return nibbles[:, :, order].reshape(packed.shape[0], -1)

    q = logical(qweight)  # [K, N]
    return pack_int4(q.t()), scales.float().t().contiguous(), logical(qzeros).float().t().contiguous()


def gptq_to_fusecc(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, v1_zeros: bool):
    """GPTQ tensors -> fusecc int4 (int32 [N, K/8]) or int8 (int8 [N, K]) qweight, scales and zeros
    fp32 [N, groups]. 8-bit values 0..255 become signed (q - 128, z - 128: the same differences)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    # [K/p, N] -> [K/p, p, N] -> [K, N]
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)).reshape(-1, qweight.shape[1])
    zeros = _unpack_cols(qzeros, bits)[:, :scales.shape[1]].float()  # [K/G, N]
    if v1_zeros:
        zeros = zeros + 1
    if bits == 4:
        return pack_int4(q.t()), scales.float().t().contiguous(), zeros.t().contiguous()
    assert per_word == 4
    return ((q - 128).to(torch.int8).t().contiguous(), scales.float().t().contiguous(),
            (zeros - 128).t().contiguous())


def fusecc_to_gptq_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """The inverse of gptq_to_fusecc for 4 bits, written as checkpoint_format "gptq_v2" (zeros stored as
    they are: v1's z - 1 cannot hold a zero point of 0): q [N, K] integers 0..15, scales and zeros
    [N, K/G] -> (qweight int32 [K/8, N], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]). GPTQ's
    qweight packs 8 input rows per word as fusecc's int4 packs 8 input columns, so it is fusecc's transposed."""
    N, K = q.shape
    if K % 8 or N % 8:
        raise ValueError(f"a GPTQ int4 checkpoint needs input and output sizes divisible by 8, not {K} and {N}")
    return pack_int4(q).t().contiguous(), pack_int4(zeros.t()), scales.t().to(torch.float16).contiguous()


def expand_fp8_scale(scale: torch.Tensor, N: int, group_size: int) -> torch.Tensor:
    """An fp8 checkpoint's weight scale -> fp32 [N, groups]: per tensor ([] or [1]) and per channel
    ([N] or [N, 1]) -> [N, 1]; 128x128 blocks [ceil(N/128), ceil(K/128)] -> each block row repeated
    over its 128 output rows. Exact (copies of the same values)."""
    scale = scale.float()
    if group_size == -1:
        if scale.numel() == 1:
            return scale.reshape(1, 1).expand(N, 1).contiguous()
        if scale.numel() == N:
            return scale.reshape(N, 1).contiguous()
        raise ValueError(f"fp8 weight_scale of shape {tuple(scale.shape)} is neither per-tensor nor per-channel "
                         f"for {N} output channels")
    if scale.dim() != 2 or scale.shape[0] != -(-N // group_size):
        raise ValueError(f"fp8 weight_scale_inv of shape {tuple(scale.shape)} does not hold "
                         f"{group_size}x{group_size} blocks of {N} output rows")
    return scale.repeat_interleave(group_size, dim=0)[:N].contiguous()


# ---- round-to-nearest quantization of float weights (quantization="int8" | "int4" | "fp8") ----

def quantize_int8(w: torch.Tensor, row_amax: torch.Tensor | None = None):
    """w [N, K] -> (int8 [N, K], scales fp32 [N, 1]): symmetric per output channel. row_amax [N, 1]:
    each row's max |w| when w holds only some of its columns (a tensor-parallel shard)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if row_amax is None else row_amax.float()
    scales = (amax / 127).clamp(min=1e-12)
    return (wf / scales).round().clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int):
    """w [N, K] -> (int4 qweight [N, K/8], scales, zeros fp32 [N, ceil(K/G)]): asymmetric per group,
    min(w, 0)..max(w, 0) mapped onto 0..15, integer zero points. A short last group is padded with its own values."""
    N, K = w.shape
    groups = -(-K // group_size)
    wf = w.float()
    if groups * group_size != K:  # pad with the last column: leaves every group's min/max unchanged
        wf = torch.cat([wf, wf[:, -1:].expand(N, groups * group_size - K)], dim=1)
    wg = wf.view(N, groups, group_size)
    # the range includes 0 (as GPTQ's quantizer does), so the integer zero point lies in 0..15
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = (-lo / scales).round().clamp(0, 15)
    q = (wg / scales[..., None] + zeros[..., None]).round().clamp(0, 15).view(N, -1)[:, :K]
    return pack_int4(q), scales, zeros


def quantize_fp8(w: torch.Tensor, row_amax: torch.Tensor | None = None):
    """w [N, K] -> (float8_e4m3fn [N, K], scales fp32 [N, 1]) per output channel (row_amax: as quantize_int8)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1, keepdim=True) if row_amax is None else row_amax.float()
    scales = (amax / FP8_MAX).clamp(min=1e-12)
    return (wf / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales
