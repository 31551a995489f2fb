"""The one rule of which part of a full (Hugging Face) tensor a rank holds.

A dimension is cut into `units` (attention heads of head_dim rows, or single rows); rank r of
`world` holds a contiguous run of units:

    units >= world:  units / world each (must divide): rank r holds [r * n, (r + 1) * n)
    units <  world:  one unit, replicated: world / units ranks hold each (KV heads of GQA models
                     with fewer KV heads than ranks; must divide)

q heads and KV heads follow the same rule, so rank r's q heads use rank r's KV heads: q head j
reads KV head j * kv / q, and j in rank r's q range maps into its KV range (or its one KV head).
"""

from __future__ import annotations

import torch


def shard_range(units: int, rank: int, world: int, what: str = "units") -> tuple[int, int]:
    """(first unit, number of units) that `rank` holds."""
    if units >= world:
        if units % world:
            raise ValueError(f"{what}={units} is not divisible by tensor_parallel_size={world}")
        n = units // world
        return rank * n, n
    if world % units:
        raise ValueError(f"{what}={units} < tensor_parallel_size={world} and does not divide it (needed to "
                         f"replicate them)")
    return rank // (world // units), 1


def shard_for_rank(tensor: torch.Tensor, dim: int, rank: int, world: int, unit: int = 1,
                   what: str = "units") -> torch.Tensor:
    """`tensor`'s slice along `dim` that `rank` holds, `unit` rows per unit (head_dim for heads)."""
    size = tensor.shape[dim]
    if size % unit:
        raise ValueError(f"{what}: dimension {dim} of size {size} is not a multiple of {unit}")
    first, count = shard_range(size // unit, rank, world, what)
    return tensor.narrow(dim, first * unit, count * unit)


def padded_shard_for_rank(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of a vocabulary-sized tensor [V, ...] for `rank`, each rank holding ceil(V / world)
    rows and the last ranks zero padding past V (vocabularies rarely divide by the world size)."""
    per = -(-tensor.shape[0] // world)
    out = tensor.new_zeros((per, *tensor.shape[1:]))
    rows = tensor[rank * per:(rank + 1) * per]
    out[:rows.shape[0]] = rows
    return out


def input_columns(full: torch.Tensor, first: int, count: int, inputs: int) -> torch.Tensor:
    """Input columns [first, first + count) of a full [N, inputs / per] tensor whose stored columns each
    cover `per` inputs: 1 for weights, 8 for packed int4 words, the group size for scales and zeros; a
    single stored column (per-channel scales) belongs to every rank. ValueError where a stored column
    would straddle the cut."""
    per = inputs // full.shape[-1]
    if full.shape[-1] == 1 and inputs > 1:
        return full
    if per * full.shape[-1] != inputs or first % per or count % per:
        raise ValueError(f"a tensor of {full.shape[-1]} columns for {inputs} inputs cannot be split at input column "
                         f"{first} (+{count}): each of its columns covers {per} inputs (packed int4 words, scale "
                         f"groups)")
    return full.narrow(-1, first // per, count // per)
