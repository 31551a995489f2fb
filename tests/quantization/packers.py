"""Reference packers written from the checkpoint formats' descriptions (not from fusecc's code):
AutoAWQ GEMM packs 8 output columns per int32 word in the interleaved order below; GPTQ packs its
weight along the input rows and its zero points along the output columns, sequentially. And the
on-the-fly quantizers' documented rounding rules, as a dequantized float weight (rtn_dequantized)."""

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds output column 8j + AWQ_ORDER[i]


def to_int32(words):
    return torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words], dtype=torch.int32)


def awq_pack(v: torch.Tensor) -> torch.Tensor:
    """v [R, C] 0..15 (rows = K or groups, columns = outputs) -> int32 [R, C/8]."""
    R, C = v.shape
    return to_int32([[sum(int(v[r, 8 * j + AWQ_ORDER[i]]) << (4 * i) for i in range(8)) for j in range(C // 8)]
                     for r in range(R)])


def gptq_pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] -> int32 [K*bits/32, N]: input row p*j + i in bits bits*i of word j."""
    p = 32 // bits
    K, N = q.shape
    return to_int32([[sum(int(q[p * j + i, n]) << (bits * i) for i in range(p)) for n in range(N)]
                     for j in range(K // p)])


def gptq_pack_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    p = 32 // bits
    R, C = z.shape
    return to_int32([[sum(int(z[r, p * j + i]) << (bits * i) for i in range(p)) for j in range(C // p)]
                     for r in range(R)])


def our_int4(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """fusecc int4 read back one nibble at a time: k = 8j + i at bits 4i of word j."""
    N = qweight.shape[0]
    return torch.tensor([[(int(qweight[n, k // 8]) >> (4 * (k % 8))) & 0xF for k in range(K)] for n in range(N)])


def rtn_dequantized(w: torch.Tensor, method: str) -> torch.Tensor:
    """int8: symmetric per output channel, step amax/127. int4: groups of 128 input columns (here one,
    K <= 128), range min(w, 0)..max(w, 0) over 0..15 with an integer zero point."""
    w = w.double()
    if method == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
        return ((w / step).round().clamp(-127, 127) * step).float()
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 15
    zero = (-lo / step).round()
    return (((w / step + zero).round().clamp(0, 15) - zero) * step).float()
