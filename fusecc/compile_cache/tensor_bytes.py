"""A tensor as plain bytes (dtype, shape, stride, device, data), rebuilt without torch.load.

torch.load (and a pickled tensor, which goes through it) returns fake tensors when it runs
where Dynamo's fake mode is current: inside a backend, where a stored graph is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorBytes:
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    device: str
    data: bytes

    @staticmethod
    def pack(t: torch.Tensor) -> "TensorBytes":
        t = t.detach()
        dense = t.contiguous().cpu()
        data = dense.reshape(-1).view(torch.uint8).numpy().tobytes() if dense.numel() else b""
        return TensorBytes(t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device), data)

    def unpack(self) -> torch.Tensor:
        if self.data:
            dense = torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)
        else:
            dense = torch.empty(self.shape, dtype=self.dtype)
        out = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return out.copy_(dense)
