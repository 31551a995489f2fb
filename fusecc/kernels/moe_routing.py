"""MoE routing of a step's tokens in one kernel: softmax over each token's router logits, its top k,
optionally renormalized, as the native MoE blocks route (runtime/models/moe.py):

    probs = softmax(logits, fp32);  weights, ids = topk(probs, k);  weights /= weights.sum(-1)  (renormalize)

torch runs that as a softmax kernel, topk's kernels and, renormalized, a sum and a divide: three to five
launches per MoE layer, each a few microseconds for a [tokens, experts] tensor of a few hundred bytes at
batch-1 decode, where one layer's whole expert computation takes ~25-40 us (Qwen3-30B-A3B, H100). Here one
program per token keeps its row in registers: softmax, then k rounds of (max, lowest index holding it,
knock it out), then the renormalization, and stores k weights (fp32) and ids (int64, as torch.topk).

Ties between equal probabilities go to the lower expert index. torch.topk on CUDA does not promise an
order among ties; on CPU tensors the op runs the torch reference itself (route_topk_reference), so CPU
results are torch's exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_topk_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_lt, stride_wt, stride_it,
                       TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    logits = tl.load(logits_ptr + token * stride_lt + offs, mask=valid, other=float("-inf")).to(tl.float32)
    shifted = tl.exp(logits - tl.max(logits, axis=0))
    probs = shifted / tl.sum(shifted, axis=0)
    probs = tl.where(valid, probs, -1.0)  # past the experts: never chosen (probabilities are >= 0)
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_K,), dtype=tl.float32)
    chosen_ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for i in tl.static_range(TOP_K):
        best = tl.max(probs, axis=0)
        best_id = tl.min(tl.where(probs == best, offs, BLOCK_E), axis=0)
        chosen = tl.where(slots == i, best, chosen)
        chosen_ids = tl.where(slots == i, best_id.to(tl.int64), chosen_ids)
        probs = tl.where(offs == best_id, -1.0, probs)
    if RENORMALIZE:
        chosen = chosen / tl.sum(chosen, axis=0)  # slots past TOP_K hold 0
    in_k = slots < TOP_K
    tl.store(weights_ptr + token * stride_wt + slots, chosen, mask=in_k)
    tl.store(ids_ptr + token * stride_it + slots, chosen_ids, mask=in_k)


def route_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype) -> (weights fp32 [T, top_k], ids int64 [T, top_k]), by the kernel."""
    T, E = logits.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T:
        block_e = triton.next_power_of_2(E)
        _route_topk_kernel[(T,)](logits, weights, ids, E, logits.stride(0), weights.stride(0), ids.stride(0),
                                 TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_E=block_e,
                                 BLOCK_K=triton.next_power_of_2(top_k), num_warps=1 if block_e <= 256 else 4)
    return weights, ids


def route_topk_reference(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same routing in torch ops (the MoE blocks' eager definition)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def check_routing(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"router logits must be a float [tokens, experts] tensor, got {tuple(logits.shape)} "
                         f"{logits.dtype}")
    if not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"top_k={top_k} must be in [1, experts={logits.shape[1]}]")
    if logits.stride(-1) != 1:
        raise ValueError("router logits must be contiguous along the experts")
