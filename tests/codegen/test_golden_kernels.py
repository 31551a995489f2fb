"""Golden files of the kernels generated for one small decoder MLP block, so a refactor that
changes code generation shows up as a diff. Regenerate with FUSECC_UPDATE_GOLDEN=1 after reading
the new kernels."""

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.codegen.compile_helpers import assert_close, compile_and_run

GOLDEN = Path(__file__).parent / "golden"


def mlp_block(h, delta, norm_w, w_gate, w_up, w_down):
    h = h + delta
    x = norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    return h + (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def test_generated_kernels_match_golden_files(tmp_path):
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(16),
            torch.randn(16, 32), torch.randn(16, 32), torch.randn(32, 16))
    got = compile_and_run(mlp_block, *args, tmp_path=tmp_path)
    assert_close(got.outputs, mlp_block(*args), tol=1e-4)
    assert len(got.kernels) == 3  # add + RMSNorm, SwiGLU, residual add
    if os.environ.get("FUSECC_UPDATE_GOLDEN") == "1":
        for old in GOLDEN.glob("*.py"):
            old.unlink()
        for name, source in got.kernels.items():
            (GOLDEN / f"{name}.py").write_text(source)
    expected = {p.stem: p.read_text() for p in GOLDEN.glob("*.py")}
    assert sorted(expected) == sorted(got.kernels), "kernel names (structural hashes) changed"
    for name, source in got.kernels.items():
        assert source == expected[name], f"{name} differs from its golden file"
