"""Reinplace of a functionalized custom-op mutation (the paged KV-cache write)."""

import torch
from torch._functorch.aot_autograd import aot_module_simplified

import fusecc.ops  # noqa: F401
from fusecc.passes.reinplace import Reinplace


def _write_then_attend(x, k_cache, v_cache, slots, tables, lens):
    torch.ops.fusecc.write_kv_cache(x * 2, x * 3, k_cache, v_cache, slots)
    return torch.ops.fusecc.paged_attention(x, k_cache, v_cache, tables, lens)


def test_auto_functionalized_kv_write_becomes_the_inplace_op():
    stats, codes = [], []

    def backend(gm, example_inputs):
        def compile_fn(g, _):
            stats.append(Reinplace().run(g).stats)
            codes.append(g.code)
            return g.forward
        return aot_module_simplified(gm, example_inputs, fw_compiler=compile_fn, keep_inference_input_mutations=True)

    x = torch.randn(3, 2, 8)
    tables = torch.tensor([[0, 1], [2, 0], [3, 0]], dtype=torch.int32)
    lens = torch.tensor([3, 1, 2], dtype=torch.int32)
    slots = torch.tensor([2, 8, 13])
    caches = [torch.randn(4, 4, 2, 8) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    expected = _write_then_attend(x, *ref_caches, slots, tables, lens)
    with torch.inference_mode():
        actual = torch.compile(_write_then_attend, backend=backend)(x, *caches, slots, tables, lens)
    assert stats[0]["reinplaced:fusecc.write_kv_cache"] == 1
    assert "auto_functionalized" not in codes[0] and "copy_" not in codes[0]
    assert "fusecc.write_kv_cache.default" in codes[0]
    torch.testing.assert_close(actual, expected)
    for c, r in zip(caches, ref_caches):
        torch.testing.assert_close(c, r)


# ---- found by a hunt for miscompiles: these crashed the pass ----

def _compile_aten(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    eager_args, compiled_args = [a.clone() for a in args], [a.clone() for a in args]
    compiled = torch.compile(fn, backend="fusecc", options={"codegen": "aten", "strict": True})
    with torch.no_grad():
        expected, actual = fn(*eager_args), compiled(*compiled_args)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(compiled_args, eager_args):
        torch.testing.assert_close(got, want)
    return actual, compiled_args


def _write_and_return_cache(cache, k, pos):
    cache.index_copy_(1, pos, k)
    return cache


def _write_and_return_view(cache, k, pos):
    cache.index_copy_(1, pos, k)
    return cache.view(-1)


def test_returning_the_written_input_or_a_view_of_it_compiles_and_aliases_like_eager():
    args = (torch.zeros(2, 8, 4), torch.ones(2, 2, 4), torch.tensor([1, 5]))
    for fn in (_write_and_return_cache, _write_and_return_view):
        out, (cache, _, _) = _compile_aten(fn, *args)
        # eager returns the cache (or a view of it): writing through the output writes the cache
        out.add_(1)
        assert cache.sum() == 16 + cache.numel()


def test_a_view_taken_before_the_scatter_and_read_after_keeps_the_old_rows():
    # k_old is a slice of the cache taken before index_copy_ and read after it: the scatter must
    # stay functional, or k_old would see the new row (attention matching removes the clones)
    import torch.nn.functional as F

    from fusecc.backend import fusecc_backend

    def fn(q, ck, cv, pos, kn, vn):
        k_old, v_old = ck[:, :, :4].clone(), cv[:, :, :4].clone()
        ck.index_copy_(2, pos, kn)
        cv.index_copy_(2, pos, vn)
        return F.scaled_dot_product_attention(q, k_old, v_old)

    torch.manual_seed(0)
    q, ck, cv = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    pos, kn, vn = torch.tensor([1]), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=fusecc_backend, options={"codegen": "aten", "strict": True})
    ck_c, cv_c, ck_e, cv_e = ck.clone(), cv.clone(), ck.clone(), cv.clone()
    torch.testing.assert_close(compiled(q, ck_c, cv_c, pos, kn, vn), fn(q, ck_e, cv_e, pos, kn, vn))
    assert torch.equal(ck_c, ck_e) and torch.equal(cv_c, cv_e)


def _kv_write_returning_cache(x, k_cache, v_cache, slots):
    torch.ops.fusecc.write_kv_cache(x * 2, x * 3, k_cache, v_cache, slots)
    return k_cache


def _kv_write_returning_a_view(x, k_cache, v_cache, slots):
    torch.ops.fusecc.write_kv_cache(x * 2, x * 3, k_cache, v_cache, slots)
    return k_cache[0]


def test_kv_write_whose_cache_is_returned_stays_functional_and_compiles():
    # the copy back into the cache is the graph output (or a view of the new value is): the pass
    # used to erase that copy_ while the output still used it (strict compile error), or to
    # leave an output aliasing the input, which the verifier refused
    args = (torch.randn(3, 2, 8), torch.randn(4, 4, 2, 8), torch.randn(4, 4, 2, 8), torch.tensor([2, 8, 13]))
    for fn in (_kv_write_returning_cache, _kv_write_returning_a_view):
        _compile_aten(fn, *args)
