"""A static KV-cache write (`cache.index_copy_(dim, pos, k)`) becomes the store of the kernel that
computes `k`, through the interpreter on CPU: the cache holds what eager writes, step after step;
the generated kernel stores into the cache and the wrapper calls no index_copy_; and where fusing
could reorder an access to the cache it is not fused, with the reason in the dump."""

import torch
from torch import nn

from tests.codegen.compile_helpers import read_dump


class RopeCacheWrite(nn.Module):
    """k = rotate(x) written to rows `pos` of a [B, H, T, D] cache held in a buffer; v (a plain
    transpose of its input, computed by a copy kernel) likewise; returns something of both."""

    def __init__(self, read_before_write: bool = False):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(2, 3, 16, 8))
        self.register_buffer("v_cache", torch.zeros(2, 3, 16, 8))
        self.read_before_write = read_before_write

    def forward(self, x, v, cos, sin, pos):
        # x, v: [B, S, H, D]; cos, sin: [S, D]; pos: [S]
        k = x.transpose(1, 2) * 2.0
        half = k.shape[-1] // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
        k = k * cos + rotated * sin
        extra = self.k_cache.sum() if self.read_before_write else 0.0
        k = k + extra  # with read_before_write, the cache is read between k's first op and the write
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, (v * 1.5).transpose(1, 2))
        return self.k_cache.sum(-1) + self.v_cache.mean(-1)


def _inputs(step: int, seq: int):
    g = torch.Generator().manual_seed(step)
    x, v = torch.randn(2, seq, 3, 8, generator=g), torch.randn(2, seq, 3, 8, generator=g)
    cos, sin = torch.randn(seq, 8, generator=g), torch.randn(seq, 8, generator=g)
    pos = torch.arange(step, step + seq)
    return x, v, cos, sin, pos


def _run_steps(model, reference, tmp_path):
    """Three calls at moving positions against eager; returns (kernels, wrapper, report)."""
    dump = tmp_path / "dump"
    compiled = torch.compile(model, backend="fusecc",
                             options={"codegen": "triton", "strict": True, "dump_dir": str(dump)})
    for step in (0, 4, 8):
        args = _inputs(step, 4)
        with torch.no_grad():
            torch.testing.assert_close(compiled(*args), reference(*args), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.k_cache, reference.k_cache, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.v_cache, reference.v_cache, rtol=1e-5, atol=1e-5)
    assert model.k_cache[:, :, 12:].abs().sum() == 0  # rows never written stay untouched
    assert model.k_cache[:, :, :12].abs().sum() > 0
    return read_dump(dump)


def test_cache_writes_are_stores_of_the_kernels_computing_them(tmp_path):
    torch.manual_seed(0)
    model, reference = RopeCacheWrite(), RopeCacheWrite()
    kernels, wrapper, report = _run_steps(model, reference, tmp_path)
    assert report["codegen"]["codegen_fallbacks"] == 0, report["notes"]
    assert "index_copy" not in wrapper, wrapper
    # Both kernels store into their cache argument (an input pointer), with the row loaded from pos
    # and bounds-checked, and neither materialises k or v in an output buffer.
    scatter_kernels = [src for src in kernels.values() if "tl.store(in_ptr" in src]
    assert len(scatter_kernels) == 2, kernels
    for src in scatter_kernels:
        assert "out_ptr" not in src.split("def ", 1)[1].split(")")[0], src
        assert ".to(tl.int64)" in src and ">= 0)" in src and "< 16)" in src, src


def test_cache_read_between_kernel_and_write_is_not_fused(tmp_path):
    torch.manual_seed(0)
    model, reference = RopeCacheWrite(read_before_write=True), RopeCacheWrite(read_before_write=True)
    kernels, wrapper, report = _run_steps(model, reference, tmp_path)
    notes = "\n".join(report["notes"])
    assert wrapper.count("index_copy") >= 1, wrapper  # k's write runs as ATen
    assert sum("tl.store(in_ptr" in src for src in kernels.values()) == 1  # v's is still fused
    assert "runs as ATen index_copy_" in notes and "between the kernel's first op and the write" in notes, notes


# ---- reads around an in-place write keep their side of it (found by a miscompile hunt) ----

def _check_against_eager(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    eager_args = [a.clone() for a in args]
    compiled_args = [a.clone() for a in args]
    compiled = torch.compile(fn, backend="fusecc", options={"codegen": "triton", "strict": True})
    with torch.no_grad():
        expected = fn(*eager_args)
        actual = compiled(*compiled_args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_args, eager_args):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _read_write_read(cache, pos, k):
    before = cache * 2                 # reads the old rows
    cache.index_copy_(0, pos, k)
    return before + cache              # same iteration space: must not share a kernel with `before`


def _write_then_reduce(cache, pos, k):
    kk = k * 2
    cache.index_copy_(0, pos, kk)      # fused into kk's kernel
    return cache.sum(-1), kk + 1       # the sum must wait for the write; kk + 1 starts a new kernel


def _put_then_read(cache, pos, k):
    before = cache * 2
    cache[pos] = k                     # index_put_, never fused: still orders the reads around it
    return before + cache


def _stats_before_write(cache, pos, k):
    old = cache.sum(-1, keepdim=True)
    cache.index_copy_(0, pos, k)
    return cache / (old + 10)


def _extern_read_before_write(cache, pos, k, w):
    scores = cache @ w                 # an extern (mm) reading the old cache
    cache.index_copy_(0, pos, k * 3)
    return scores, cache + 1


def test_reads_keep_their_side_of_an_in_place_write():
    torch.manual_seed(0)
    cache, pos, k = torch.randn(6, 4), torch.tensor([1, 3]), torch.randn(2, 4)
    for fn in (_read_write_read, _write_then_reduce, _put_then_read, _stats_before_write):
        _check_against_eager(fn, cache, pos, k)
    _check_against_eager(_extern_read_before_write, cache, pos, k, torch.randn(4, 4))
