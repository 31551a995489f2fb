"""Vocabulary-parallel embedding and LM head: rank r holds rows [r * per, (r + 1) * per) of the
[V, hidden] table, per = ceil(V / world) (the last rank's rows past V are zero).

    embed = VocabParallelEmbedding(V, hidden, tp)    # ids [T] -> [T, hidden], all-reduced
    head = ParallelLMHead(V, hidden, tp)             # or ParallelLMHead(..., tied=embed)
    logits = head.compute_logits(hidden)             # [S, hidden] -> [S, V] float32 on every rank

The logits are all-gathered to every rank, not gathered to rank 0 only: every rank runs the same
sampler on the same logits (the executor returns rank 0's tokens), so the model runner's code is
the same on every rank, and the gather is a functional collective that compiles.
"""

from __future__ import annotations

import torch
from torch import nn

from fusecc.distributed.collectives import all_gather_last_dim, all_reduce
from fusecc.distributed.shard import padded_shard_for_rank
from fusecc.distributed.state import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype=None, device=None) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.first = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, part: int = 0) -> None:
        if full.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)}; the embedding expects "
                             f"{(self.vocab_size, param.shape[1])}")
        param.data.copy_(padded_shard_for_rank(full, self.tp.rank, self.tp.size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]; other ranks' ids look up row 0 and are zeroed, then summed
        local = ids - self.first
        mine = (local >= 0) & (local < self.per_rank)
        rows = nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype), self.tp.group_name)


class ParallelLMHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, tied: VocabParallelEmbedding | None = None,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        if tied is not None:
            self.weight = tied.weight  # the same parameter: loaded once, through the embedding
        else:
            per_rank = -(-vocab_size // tp.size)
            self.weight = nn.Parameter(torch.empty(per_rank, hidden_size, dtype=dtype, device=device),
                                       requires_grad=False)
            self.weight.weight_loader = VocabParallelEmbedding.weight_loader.__get__(self)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [S, hidden] -> local [S, per_rank] -> gathered [S, world * per_rank] -> [S, V]
        local = nn.functional.linear(hidden, self.weight).float()
        return all_gather_last_dim(local, self.tp.size, self.tp.group_name)[:, :self.vocab_size]
