"""Generated kernels are compiled in parallel before the first call (fusecc/codegen/precompile.py).

CPU: the wrapper records one launch example per kernel launch, with the graph's dtypes, the
alignment of each pointer and the integer sizes (the interpreter has nothing to precompile).
GPU: the first call of a compiled function compiles no generated kernel at its launch.
"""

import pytest
import torch

import fusecc.codegen.wrapper as wrapper_module
from fusecc.codegen.precompile import StandInTensor, stand_in


def _rms_and_gate(x, w, gate):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    return torch.nn.functional.silu(gate) * h


def test_stand_in_reports_alignment_from_the_storage_offset():
    base = torch.empty(64, dtype=torch.float16)
    assert stand_in(base).data_ptr() % 16 == 0
    assert stand_in(base[8:]).data_ptr() % 16 == 0     # 8 halves = 16 bytes
    assert stand_in(base[3:]).data_ptr() % 16 == 6     # 3 halves = 6 bytes
    assert stand_in(base).dtype == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the interpreter; the GPU test below covers CUDA")
def test_every_launch_is_recorded_with_example_values(monkeypatch):
    recorded = []
    monkeypatch.setattr(wrapper_module, "precompile", lambda launches: recorded.append(launches))
    monkeypatch.setattr(wrapper_module, "_is_cuda_graph", lambda placeholders: True)
    x = torch.randn(6, 32)
    w = torch.randn(32)
    gate = torch.randn(8, 32)[2:]  # a view starting 2 * 32 floats in: still 16-byte aligned
    compiled = torch.compile(_rms_and_gate, backend="fusecc", options={"codegen": "triton", "strict": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, w, gate), _rms_and_gate(x, w, gate), rtol=1e-5, atol=1e-5)
    (launches,) = recorded
    assert len(launches) >= 1
    for launch in launches:
        pointers = [a for a in launch.args if isinstance(a, StandInTensor)]
        ints = [a for a in launch.args if isinstance(a, int)]
        assert pointers and all(p.dtype == torch.float32 for p in pointers)
        assert all(p.data_ptr() % 16 == 0 for p in pointers)
        assert 6 in ints  # the row count (numel of the row space)
        assert {"XBLOCK", "num_warps"} <= set(launch.meta)


def test_a_failing_precompile_never_fails_compilation(monkeypatch):
    import fusecc.codegen.precompile as precompile_module

    def broken(launches, workers):
        raise RuntimeError("compiler crashed")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precompile_module, "_compile_all", broken)
    launch = precompile_module.KernelLaunch(kernel=None, args=[], meta={})
    assert precompile_module.precompile([launch]) == 0


@pytest.mark.gpu
def test_first_call_compiles_no_generated_kernel_at_launch(monkeypatch, tmp_path):
    import triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path / "fusecc"))
    compiles = []

    def hook(*, fn, is_manual_warmup, **_):
        if fn.name.startswith("fused_"):
            compiles.append((fn.name, is_manual_warmup))
        return False

    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", hook)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(_rms_and_gate, backend="fusecc", options={"strict": True})
    with torch.no_grad():
        out = compiled(x, w, gate)
    expected = _rms_and_gate(x.float(), w.float(), gate.float())
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
    warmed = [name for name, warmup in compiles if warmup]
    at_launch = [name for name, warmup in compiles if not warmup]
    assert warmed, "nothing was precompiled"
    assert at_launch == [], f"compiled at launch despite precompiling: {at_launch}"
