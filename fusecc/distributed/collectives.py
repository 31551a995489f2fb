"""Collectives over the TP group as functional collectives: `_c10d_functional.all_reduce` and
`all_gather_into_tensor` followed by `wait_tensor` trace into Dynamo graphs as ops (fusecc keeps
them as extern calls in place; fusecc/graph/node_kinds.py marks them impure), where the eager
`dist.all_reduce` would break the graph."""

from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional


def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum over ranks: [*] -> [*]."""
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group_name))


def all_reduce_max(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Elementwise max over ranks: [*] -> [*]."""
    return _c10d.wait_tensor(_c10d.all_reduce(x, "max", group_name))


def all_gather_last_dim(x: torch.Tensor, world: int, group_name: str) -> torch.Tensor:
    """[rows, n] on each rank -> [rows, world * n], rank r's columns at [r * n, (r + 1) * n). One rank's
    gather is its input: no collective (eager, as the LM head's gather runs, outside the decode CUDA
    graphs, it would cost a launch and a wait on the host each step)."""
    if world == 1:
        return x
    gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), world, group_name))
    rows, n = x.shape
    return gathered.view(world, rows, n).permute(1, 0, 2).reshape(rows, world * n)
