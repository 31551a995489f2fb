"""Values read through a multi-output view op (split, unbind, chunk): `x.split(2)[0]` is a view
of x, reached through operator.getitem, and every pass that asks what aliases what must see it.
Each case was a silent miscompile (found by a hunt) while `x[0]`, a single view op, was right."""

import torch

import fusecc  # noqa: F401


def _compile(fn, codegen="aten"):
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(fn, backend="fusecc", options={"codegen": codegen, "strict": True})


def test_a_clone_of_a_split_survives_a_later_write_to_its_source():
    # identity_clone dropped the clone: the output then read the input after add_ wrote it
    def fn(x):
        c = x.split(2)[0].clone()
        x.add_(1)
        return c

    with torch.no_grad():
        assert torch.equal(_compile(fn)(torch.arange(4.0)), fn(torch.arange(4.0)))


def test_split_outputs_of_a_copy_do_not_alias_the_input():
    # mul_by_one turned (x * 1).split(2) into x.split(2): writing an output wrote the input
    x = torch.arange(4.0)
    with torch.no_grad():
        out = _compile(lambda x: (x * 1).split(2))(x)
    out[0].add_(100)
    assert torch.equal(x, torch.arange(4.0))


def test_a_constant_returned_through_split_is_fresh_each_call():
    # constant folding materialised arange(4.) once: every call returned views of that buffer
    compiled = _compile(lambda x: (torch.arange(4.0).split(2), x + 1))
    with torch.no_grad():
        first = compiled(torch.zeros(1))
        first[0][0].add_(100)
        second = compiled(torch.zeros(1))
    assert torch.equal(second[0][0], torch.tensor([0.0, 1.0]))


def test_equal_split_chains_returned_twice_stay_two_tensors():
    # CSE merged the two chains, getitems included: outputs 0 and 2 were one tensor
    with torch.no_grad():
        (a0, _), (b0, _) = _compile(lambda x: (x.exp().split(2), x.exp().split(2)))(torch.zeros(4))
    a0.add_(1)
    assert torch.equal(b0, torch.ones(2))


def test_a_read_through_unbind_before_a_cache_write_stays_before_it():
    # fusion saw the getitem, not the mul, as the reader of the old cache: the mul joined the
    # kernel of the final add, which runs after the write (row 1 came out 4.0, eager 2.0). On CPU
    # the generated kernels run through the Triton interpreter (tests/conftest.py)
    def fn(cache, pos, k):
        a = cache.unbind(0)[0] * 2
        cache.index_copy_(1, pos, k)
        return a + (cache[0] + 1)

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def inputs():
        return (torch.zeros(2, 4, 8, device=device), torch.tensor([1], device=device),
                torch.ones(2, 1, 8, device=device))

    with torch.no_grad():
        assert torch.equal(_compile(fn, codegen="triton")(*inputs()), fn(*inputs()))
