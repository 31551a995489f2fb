"""fusecc/kernels/moe_routing.py (softmax, top k, renormalization in one kernel) against torch's ops, in the
interpreter on CPU tensors and on a GPU; the fusecc::moe_route op's CPU path is torch's ops exactly."""

import pytest
import torch

from fusecc.kernels.moe_routing import route_topk, route_topk_reference


def distinct_logits(tokens: int, experts: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    # a random permutation per token in steps of 0.25 (exact in fp16 and bf16): no two probabilities tie,
    # so the chosen experts are unique
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g).float() * 0.25 for _ in range(tokens)]).to(dtype)


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (5, 128, 8), (3, 60, 4), (2, 6, 6)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_kernel_matches_torch_routing(tokens, experts, top_k, renormalize):
    logits = distinct_logits(tokens, experts, seed=experts + top_k)
    weights, ids = route_topk(logits, top_k, renormalize)
    ref_weights, ref_ids = route_topk_reference(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, ref_ids)  # sorted by probability, as torch.topk
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_half_precision_logits_and_no_tokens():
    logits = distinct_logits(4, 16, seed=1, dtype=torch.float16)
    weights, ids = route_topk(logits, 3, True)
    ref_weights, ref_ids = route_topk_reference(logits, 3, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-7)
    weights, ids = route_topk(logits[:0], 3, True)
    assert weights.shape == (0, 3) and ids.shape == (0, 3)


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, ids = route_topk(logits, 2, False)
    assert ids.tolist() == [[1, 2]]


def test_op_cpu_is_torch_and_bad_input_is_one_line():
    import fusecc.ops  # noqa: F401  (registers fusecc::moe_route)

    logits = torch.randn(7, 32)
    weights, ids = torch.ops.fusecc.moe_route(logits, 4, True)
    ref_weights, ref_ids = route_topk_reference(logits, 4, True)
    assert torch.equal(weights, ref_weights) and torch.equal(ids, ref_ids)
    with pytest.raises(ValueError, match="top_k=40 must be in"):
        torch.ops.fusecc.moe_route(logits, 40, True)
    with pytest.raises(ValueError, match="router logits must be a float"):
        torch.ops.fusecc.moe_route(logits[0], 2, True)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096])
def test_gpu_op_matches_torch(tokens):
    import fusecc.ops  # noqa: F401

    logits = distinct_logits(tokens, 128, seed=tokens).cuda().bfloat16()
    weights, ids = torch.ops.fusecc.moe_route(logits, 8, True)
    ref_weights, ref_ids = route_topk_reference(logits, 8, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
