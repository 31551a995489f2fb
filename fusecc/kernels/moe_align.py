"""Sort the (token, expert) pairs of a MoE step by expert, each expert's run padded to BLOCK_M rows.

The fused MoE GEMMs (fused_moe.py) give each program BLOCK_M rows of ONE expert; this step lays the
pairs out so that every BLOCK_M-row block belongs to a single expert (vLLM's moe_align_block_size):

    topk_ids:         [tokens, top_k]  expert of each pair; pair p = token * top_k + k
    sorted_token_ids: [num_blocks * BLOCK_M] int32  pair ids grouped by expert (in pair order within an
                      expert), each expert's run padded with `numel` (= tokens * top_k, "no pair")
    expert_ids:       [num_blocks] int32  the expert of each block (blocks past the padded total: clamped,
                      never computed)
    total:            [1] int32  rows in use (sum of the padded runs); programs past it return at once

e.g. top_k=1, ids [2, 0, 2, 2, 1], BLOCK_M=2, numel=5:
    sorted_token_ids  [1 5 | 4 5 | 0 2 | 3 5 | ...]   expert_ids [0, 1, 2, 2, ...]   total 8

All shapes are known on the host without looking at the ids (no device->host sync, so a decode step can
run under a CUDA graph): experts with tokens contribute at most ceil(numel / BLOCK_M) full blocks plus one
partial block each, so num_blocks = ceil(numel / BLOCK_M) + min(num_experts, numel).

Two implementations with identical output: one Triton program while the pairs fit in a few
[CHUNK, experts] tiles (MAX_CHUNKS: decode and small batches, one launch instead of ~10 torch kernels,
which would cost more than the GEMMs at batch 1; up to 1024 pairs with 128 experts, 8192 with 8), and
torch ops (stable argsort, scatter) beyond, where one program looping over every pair would be the
slow step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CHUNKS = 8
TILE_ELEMENTS = 16384  # [CHUNK, E_PAD] int32 one-hot tile of the single program


def align_num_blocks(numel: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the BLOCK_M-row blocks that the padded runs of `numel` pairs occupy."""
    return triton.cdiv(numel, block_m) + min(num_experts, numel)


@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, numel, num_experts, num_blocks,
                      BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    # 1. pairs per expert ([CHUNK, E_PAD] one-hot per chunk of pairs)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)  # -1 matches no expert
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)  # [E_PAD] end row of each expert's run (inclusive cumsum)
    starts = ends - padded
    tl.store(total_ptr, tl.sum(padded, axis=0))
    # 2. every row "no pair", and each block's expert: the first expert whose run ends after the block
    for start in range(0, num_blocks * BLOCK_M, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + offs, tl.full([CHUNK], 0, tl.int32) + numel, mask=offs < num_blocks * BLOCK_M)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)
        e = tl.sum((ends[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(e, num_experts - 1), mask=blocks < num_blocks)
    tl.debug_barrier()  # the pair ids below overwrite some of the "no pair" rows written above
    # 3. each pair to its row: its expert's start + the pairs of that expert before it
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, numel, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)  # [CHUNK, E_PAD]
        row = tl.cumsum(hit, axis=0) - 1 + (seen + starts)[None, :]
        tl.store(sorted_ptr + tl.sum(hit * row, axis=1), offs, mask=offs < numel)
        seen += tl.sum(hit, axis=0)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int,
                         single_program: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids, expert_ids, total) for topk_ids [tokens, top_k]; see the module docstring.
    single_program: force one implementation (tests); None picks by size."""
    flat = topk_ids.reshape(-1)
    numel = flat.numel()
    num_blocks = align_num_blocks(numel, num_experts, block_m)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    chunk = max(16, min(triton.next_power_of_2(max(numel, 1)), TILE_ELEMENTS // e_pad))
    if single_program is None:
        single_program = triton.cdiv(numel, chunk) <= MAX_CHUNKS
    if not single_program:
        return _align_torch(flat, block_m, num_experts, num_blocks)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    total = torch.empty(1, dtype=torch.int32, device=flat.device)
    _moe_align_kernel[(1,)](flat.contiguous(), sorted_ids, expert_ids, total, numel, num_experts, num_blocks,
                            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, num_warps=8)
    return sorted_ids, expert_ids, total


def _align_torch(flat: torch.Tensor, block_m: int, num_experts: int, num_blocks: int):
    """The same layout from torch ops; fixed shapes, no sync (stable argsort keeps pair order)."""
    flat = flat.long()
    numel = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert
    expert_of = flat[order]
    rank = torch.arange(numel, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((num_blocks * block_m,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    block_rows = torch.arange(num_blocks, device=flat.device) * block_m
    expert_ids = torch.searchsorted(ends, block_rows, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)
