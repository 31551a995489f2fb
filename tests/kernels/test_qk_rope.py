"""fusecc/kernels/qk_rope.py (per-head q/k RMSNorm and rotary embedding in one kernel) against the native
modules' torch ops, in the interpreter and on a GPU; the fusecc::qk_norm_rope op; and its sm_90 PTX, compiled on
CPU (`python -m tests.kernels.test_qk_rope` prints its float arithmetic), keeping each of eager's roundings."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusecc.kernels.qk_rope import qk_norm_rope, qk_norm_rope_reference

ROOT = Path(__file__).resolve().parents[2]


def rope_tables(positions: int, head_dim: int):
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32),
                        1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def case(tokens, hq, hkv, d, dtype, norm, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype).to(device)
    positions = torch.randint(0, 50, (tokens,), generator=g).to(device)
    cos, sin = (t.to(device) for t in rope_tables(64, d))
    qw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device) if norm else None
    kw = (torch.rand(d, generator=g) + 0.5).to(dtype).to(device) if norm else None
    return qkv, positions, cos, sin, qw, kw, 1e-6, hq, hkv, d


# heads over one program, two (a q/k boundary inside the second), and a partial last group
@pytest.mark.parametrize("tokens,hq,hkv,d", [(5, 4, 2, 16), (3, 6, 6, 32), (1, 8, 1, 64), (2, 12, 5, 16)])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_modules(tokens, hq, hkv, d, norm, dtype):
    args = case(tokens, hq, hkv, d, dtype, norm, seed=d + hq)
    q, k = qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    assert q.shape == (tokens, hq, d) and k.shape == (tokens, hkv, d) and q.dtype == dtype
    # fp16: every rounding as the modules'; fp32: the norm's sum in another order
    tol = dict(rtol=0, atol=0) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q, rq, **tol)
    torch.testing.assert_close(k, rk, **tol)


def test_op_on_cpu_is_the_modules_ops():
    import fusecc.ops  # noqa: F401  (registers fusecc::qk_norm_rope)

    args = case(4, 4, 2, 16, torch.float32, True)
    q, k = torch.ops.fusecc.qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    assert torch.equal(q, rq) and torch.equal(k, rk) and q.is_contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,norm", [(32, 4, True), (32, 8, False), (16, 16, True)])
def test_gpu_bf16_matches_the_modules(hq, hkv, norm):
    import fusecc.ops  # noqa: F401

    args = case(37, hq, hkv, 128, torch.bfloat16, norm, device="cuda")
    q, k = torch.ops.fusecc.qk_norm_rope(*args)
    rq, rk = qk_norm_rope_reference(*args)
    # the same roundings; rsqrt's last bit may differ between the kernel and torch: at most one bf16 step
    for out, ref in ((q, rq), (k, rk)):
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
        assert (out != ref).float().mean().item() < 0.01


# (q heads, kv heads, norm, dtype) compiled for sm_90: Qwen3 (q/k norms), Llama (rotation only), fp16
PTX_CASES = ((32, 4, True, torch.bfloat16), (32, 8, False, torch.bfloat16), (16, 16, True, torch.float16))
FLOAT_TYPES = {"f16", "f16x2", "bf16", "bf16x2", "f32", "f64"}


def float_arithmetic(ptx: str) -> list[str]:
    """The float add / sub / mul / fma / mad instructions of a PTX text, with their modifiers (`mul.rn.bf16x2`)."""
    ops = []
    for line in ptx.splitlines():
        m = re.match(r"\s*(?:@!?%\w+\s+)?((?:add|sub|mul|fma|mad)(?:\.\w+)+)\s", line)
        if m and m.group(1).split(".")[-1] in FLOAT_TYPES:
            ops.append(m.group(1))
    return ops


def test_sm90_ptx_keeps_each_eager_rounding():
    """Eager rounds x * cos, rot * sin and their sum each to the activation dtype (and the norm's products).
    On sm_90 LLVM narrows those fp32 ops to native bf16 ones, and, contraction allowed, fused x * cos into the
    sum: one fma.rn.bf16x2 on an H100, 15% of the bf16 outputs a step off eager. So: no float FMA, and every
    float add / sub / mul rounded (`.rn`: ptxas may not contract it into an FMA either)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_qk_rope"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ops = json.loads(proc.stdout.splitlines()[-1])
    assert len(ops) == len(PTX_CASES), ops
    for case, instructions in ops.items():
        assert any(op.startswith("mul.") for op in instructions), (case, instructions)  # the parse found them
        fused = [op for op in instructions if op.split(".")[0] in ("fma", "mad")]
        unrounded = [op for op in instructions if ".rn." not in op]
        assert not fused and not unrounded, (case, sorted(set(fused + unrounded)))


def sm90_float_arithmetic() -> dict:
    """Compiles the kernel for sm_90 through hopper_compile_check's stand-in driver (no TRITON_INTERPRET):
    each PTX_CASES launch's float arithmetic."""
    from triton.runtime.jit import JITFunction

    from tests.kernels import hopper_compile_check

    hopper_compile_check.install()
    compiled = []
    compile_only = JITFunction.run

    def run(self, *args, **kwargs):
        compiled.append(compile_only(self, *args, **kwargs))
        return compiled[-1]

    JITFunction.run = run
    cos = torch.randn(64, 128)
    ops = {}
    for hq, hkv, norm, dtype in PTX_CASES:
        qkv = torch.randn(3, (hq + 2 * hkv) * 128, dtype=dtype)
        w = torch.ones(128, dtype=dtype) if norm else None
        qk_norm_rope(qkv, torch.arange(3), cos, cos, w, w, 1e-6, hq, hkv, 128)
        ops[f"{hq}/{hkv} norm={norm} {dtype}"] = float_arithmetic(compiled[-1].asm["ptx"])
    return ops


if __name__ == "__main__":
    print(json.dumps(sm90_float_arithmetic()))
