"""The Gluon (warp-specialized, ping-pong) prefill kernel: which calls reach it, and what it computes.

Gluon has no interpreter, so on CPU the kernel is only compiled for sm_90 (here for its FA3
structure; every flash_attention call path also compiles in test_hopper_compile.py) and the
dispatch is checked with the launch recorded instead of run; on CPU the same calls run the
descriptor/pointer kernels through the interpreter (test_flash_attention*.py). On an H100/H200 the
kernel runs at real sizes against a float32 reference, outputs NaN-poisoned before each call.
"""

import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from fusecc.kernels import flash_attention_gluon, flash_attention_tma
from fusecc.kernels.reference import attention_reference
from tests.kernels.prefill_launches import poisoned_run, record_launches

HOPPER_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200


@pytest.fixture
def gluon_launches(monkeypatch):
    """Count launches of the Gluon kernel. On CPU the device is taken for sm_90 and the launch is
    recorded, not run (Gluon has no interpreter; the output is zero-filled)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(flash_attention_gluon, "device_is_hopper", lambda device: True)
        monkeypatch.setattr(flash_attention_tma, "device_has_tma", lambda device: True)
    return record_launches(monkeypatch, "launch_gluon_prefill", run_on_cpu=False)


def test_only_unmasked_half_precision_head_dim_128_reaches_the_kernel(gluon_launches):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not flash_attention_gluon.device_is_hopper(torch.device("cuda")):
        pytest.skip("the Gluon kernel is for sm_90")
    h = torch.randn(1, 2, 20, 128, dtype=torch.float16, device=device)
    poisoned_run(h, h, h, causal=True)
    assert gluon_launches == [((1, 2, 20, 128), True)]
    gluon_launches.clear()
    # head_dim 64, fp32, a mask, a misaligned row stride, no keys: the other kernels' business
    poisoned_run(h[..., :64].contiguous(), h[..., :64].contiguous(), h[..., :64].contiguous(), causal=False)
    f = h.float()
    poisoned_run(f, f, f, causal=False)
    poisoned_run(h, h, h, causal=False, attn_mask=torch.ones(20, 20, dtype=torch.bool, device=device))
    odd = torch.randn(1, 2, 20, 129, dtype=torch.float16, device=device)[..., :128]
    poisoned_run(odd, odd, odd, causal=False)
    empty = h[:, :, :0]
    assert torch.equal(poisoned_run(h, empty, empty, causal=False), torch.zeros_like(h))
    assert gluon_launches == []


def test_kernel_compiles_for_sm90_with_the_fa3_schedule():
    # A subprocess: on CPU the test session interprets triton.jit kernels (TRITON_INTERPRET=1),
    # and this needs Triton's real pipeline (MLIR passes, LLVM, ptxas from the wheel)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = """
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from fusecc.kernels import flash_attention_gluon as G
t = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16)
dq, dk = mangle_type(G.descriptor(t, G.ROWS_PER_CONSUMER)), mangle_type(G.descriptor(t, G.BLOCK_N))
fn = G._flash_attention_gluon_kernel
for causal in (False, True):
    sig = dict(zip(fn.arg_names, [dq, dk, dk, dq, "i32", "i32", "i32", "fp32"] + ["constexpr"] * 5))
    src = GluonASTSource(fn, sig, dict(HEAD_DIM=128, CAUSAL=causal, ROWS=G.ROWS_PER_CONSUMER,
                                       BLOCK_N=G.BLOCK_N, STAGES=G.STAGES))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    open(sys.argv[1] + f"/{int(causal)}.ptx", "w").write(k.asm["ptx"])
    print(int(causal), k.metadata.shared)
"""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", script, tmp], env=env, capture_output=True, text=True,
                              timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert proc.returncode == 0, proc.stderr[-4000:]
        shared = dict(line.split() for line in proc.stdout.splitlines())
        for causal in ("0", "1"):
            assert int(shared[causal]) <= HOPPER_SHARED_LIMIT
            ptx = open(os.path.join(tmp, f"{causal}.ptx")).read()
            # consumers take 240 registers a thread from the producer's warpgroup (setmaxnreg)
            assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)
            assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+\d+;", ptx)
            # the softmax of tile j runs with the PV GEMM of tile j-1 still in flight
            assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
            assert "cp.async.bulk.tensor" in ptx


def _rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


# (B, Hq, Hkv, Sq, Sk, causal, dtype, hf_layout)
GPU_CASES = [
    (1, 16, 16, 4096, 4096, False, torch.bfloat16, False),
    (1, 16, 16, 4096, 4096, True, torch.bfloat16, False),
    (2, 32, 8, 1000, 1000, True, torch.bfloat16, True),     # GQA, HF's transposed views, ragged tiles
    (2, 32, 8, 300, 1500, True, torch.bfloat16, False),     # seq_q < seq_k: causal aligned bottom-right
    (1, 8, 1, 1500, 700, True, torch.float16, False),       # MQA, seq_q > seq_k: 800 rows see nothing
    (3, 4, 2, 77, 333, False, torch.float16, True),
    (1, 4, 4, 129, 5, False, torch.bfloat16, False),        # fewer keys than one K tile
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,causal,dtype,hf_layout", GPU_CASES)
def test_gpu_matches_reference(gluon_launches, B, Hq, Hkv, Sq, Sk, causal, dtype, hf_layout):
    if not flash_attention_gluon.device_is_hopper(torch.device("cuda")):
        pytest.skip("the Gluon kernel is for sm_90")
    torch.manual_seed(0)
    if hf_layout:
        q = torch.randn(B, Sq, Hq, 128, dtype=dtype, device="cuda").transpose(1, 2)
        k, v = (torch.randn(B, Sk, Hkv, 128, dtype=dtype, device="cuda").transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(B, Hq, Sq, 128, dtype=dtype, device="cuda")
        k, v = (torch.randn(B, Hkv, Sk, 128, dtype=dtype, device="cuda") for _ in range(2))
    out = poisoned_run(q, k, v, causal)
    assert len(gluon_launches) == 1
    ref = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < 1e-2
    if causal and Sq > Sk:
        assert torch.equal(out[:, :, :Sq - Sk], torch.zeros_like(out[:, :, :Sq - Sk]))
