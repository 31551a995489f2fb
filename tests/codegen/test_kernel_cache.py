"""Kernels are cached by structure: in memory within a process, on disk across processes."""

import os
import subprocess
import sys
import textwrap

from fusecc.codegen.kernel_cache import kernel_cache

SCRIPT = textwrap.dedent("""
    import torch
    def f(x, y):
        a = torch.sigmoid(x) * y
        b = torch.sigmoid(a) * y     # same structure as the line above after fusion boundaries
        return a.sum(-1), b.sum(-1)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        out = torch.compile(f, backend="fusecc", options={"codegen": "triton", "strict": True})(x, y)
    ref = f(x, y)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, ref))
    from fusecc.codegen.kernel_cache import kernel_cache, default_cache_dir
    cache = kernel_cache(str(default_cache_dir()))
    print("MISSES", cache.misses, "HITS", cache.hits)
""")


def _run(cache_dir):
    env = dict(os.environ, FUSECC_CACHE_DIR=str(cache_dir), TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_cache_persists_across_processes(tmp_path):
    first = _run(tmp_path)
    files = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("kernels/*.py")}
    assert files, first
    second = _run(tmp_path)
    again = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("kernels/*.py")}
    assert again == files, "the second process regenerated or rewrote kernels"
    assert "MISSES" in second


def test_same_structure_is_loaded_once(tmp_path):
    from fusecc.codegen.kernel_writer import KernelSource

    cache = kernel_cache(str(tmp_path))
    source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
              "def fused_pointwise_test(in_ptr0, out_ptr0, xnumel, XBLOCK: tl.constexpr):\n    pass\n")
    ks = KernelSource(name="fused_pointwise_test", source=source, kind="pointwise", size_args=[], numel=None,
                      xblock=16, rblock=None, num_warps=1, num_inputs=1, num_outputs=1, structure_hash="abc")
    first = cache.load(ks)
    second = cache.load(ks)
    assert first is second and cache.hits == 1 and cache.misses == 1
    assert (tmp_path / "fused_pointwise_test.py").read_text() == source
