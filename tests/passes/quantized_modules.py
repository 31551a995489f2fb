"""Weight-only quantized linears written by hand, the ways user code and gpt-fast / torchao-style
code write them, for the quantized-linear matching tests. Packing here is the tests' own (never
fusecc's), so a compiled model is checked against an independent eager dequantization.

Every module holds integer weights as buffers and dequantizes in its forward; `forward(x [*, K])`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pack_two_per_byte(q: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """q [N, K] in 0..15 -> uint8 [N, K/2]: column 2j in the low nibble of byte j (high_first: the high)."""
    first, second = q[:, 0::2], q[:, 1::2]
    if high_first:
        first, second = second, first
    return (first | (second << 4)).to(torch.uint8)


def pack_eight_per_word(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> int32 [N, K/8]: column 8j + i in bits 4i..4i+3 of word j."""
    words = sum(q[:, i::8].long() << (4 * i) for i in range(8))
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # same bits, signed


class Int8Linear(nn.Module):
    """F.linear(x, w_int8.to(x.dtype) * scale[:, None], bias): per-output-channel scales."""

    def __init__(self, K: int, N: int, bias: bool = True):
        super().__init__()
        self.register_buffer("weight", torch.randint(-127, 128, (N, K), dtype=torch.int8))
        self.register_buffer("scale", torch.rand(N) * 0.02 + 0.005)
        self.bias = nn.Parameter(torch.randn(N) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale[:, None], self.bias)


class Int8ScaleAfter(nn.Module):
    """gpt-fast's WeightOnlyInt8Linear: F.linear(x, w.to(x.dtype)) * scales (scale after the matmul)."""

    def __init__(self, K: int, N: int):
        super().__init__()
        self.register_buffer("weight", torch.randint(-127, 128, (N, K), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(N) * 0.02 + 0.005)

    def forward(self, x):
        return F.linear(x, self.weight.to(dtype=x.dtype)) * self.scales


class Int4TwoPerByte(nn.Module):
    """uint8 [N, K/2] (two nibbles a byte), unpacked by shift and mask; asymmetric group-wise:
    w = (q - zeros) * scales over [N, K/G, G]."""

    def __init__(self, K: int, N: int, group: int, high_first: bool = False):
        super().__init__()
        self.group, self.high_first = group, high_first
        self.register_buffer("packed", pack_two_per_byte(torch.randint(0, 16, (N, K)), high_first))
        self.register_buffer("scales", torch.rand(N, K // group) * 0.05 + 0.01)
        self.register_buffer("zeros", torch.randint(0, 16, (N, K // group)).float())

    def forward(self, x):
        p = self.packed
        low, high = p & 0xF, (p >> 4) & 0xF
        q = torch.stack([high, low] if self.high_first else [low, high], dim=-1).view(p.shape[0], -1)
        N, K = q.shape
        w = (q.view(N, K // self.group, self.group).to(x.dtype) - self.zeros[..., None]) * self.scales[..., None]
        return x @ w.view(N, K).t()


class Int4EightPerWord(nn.Module):
    """int32 [N, K/8] (eight nibbles a word), unpacked with a shift table; symmetric (zero point 8),
    torchao-style groups as rows of a [N*K/G, G] reshape."""

    def __init__(self, K: int, N: int, group: int):
        super().__init__()
        self.group = group
        self.register_buffer("packed", pack_eight_per_word(torch.randint(0, 16, (N, K))))
        self.register_buffer("scales", torch.rand(N, K // group) * 0.05 + 0.01)

    def forward(self, x):
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)
        q = ((self.packed.unsqueeze(-1) >> shifts) & 0xF).reshape(self.packed.shape[0], -1)  # [N, K]
        N, K = q.shape
        w = (q.reshape(-1, self.group).to(x.dtype) - 8) * self.scales.reshape(-1, 1)
        return F.linear(x, w.reshape(N, K))


class QuantizedMLP(nn.Module):
    """Four hand-written weight-only linears in a row (hidden -> inter -> hidden -> inter -> hidden),
    with activations between them."""

    def __init__(self, hidden: int = 64, inter: int = 48, group: int = 16):
        super().__init__()
        self.up = Int8Linear(hidden, inter)
        self.gate = Int4TwoPerByte(inter, hidden, group)
        self.down = Int8ScaleAfter(hidden, inter)
        self.out = Int4EightPerWord(inter, hidden, group)

    @torch.no_grad()
    def unit_gain_(self) -> "QuantizedMLP":
        """Rescale each linear's scales so that it maps unit-variance inputs to unit variance (real-size
        models then keep activations near 1, where bf16 comparisons are meaningful)."""
        for linear in (self.up, self.gate, self.down, self.out):
            in_features = linear.weight.shape[1] if hasattr(linear, "weight") else linear.packed.shape[1] * (
                2 if linear.packed.dtype == torch.uint8 else 8)
            gain = linear(torch.randn(64, in_features)).std()
            for name in ("scale", "scales"):
                if hasattr(linear, name):
                    setattr(linear, name, getattr(linear, name) / gain)
        return self

    def forward(self, x):
        x = torch.relu(self.up(x))
        x = F.silu(self.gate(x))
        return self.out(torch.tanh(self.down(x)))


class FP8RowwiseLinear(nn.Module):
    """W8A8 FP8 written by hand around `torch._scaled_mm`: e4m3 weight [N, K] with per-channel
    scales [1, N]; the activations quantized per row with a dynamic scale; a bias-and-scale
    epilogue in the output dtype."""

    def __init__(self, K: int, N: int, out_dtype=torch.float32):
        super().__init__()
        w = torch.randn(N, K)
        scale = w.abs().amax(1, keepdim=True) / 448
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, N]
        self.register_buffer("bias", torch.randn(N).to(out_dtype))
        self.out_dtype = out_dtype

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 448  # [M, 1]
        xq = (x2 / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                             out_dtype=self.out_dtype)
        return (y + self.bias).reshape(*x.shape[:-1], -1)
