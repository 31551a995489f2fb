"""The quantized matmul kernels compile for Hopper (sm_90) through Triton's real GPU pipeline, on CPU
(the stand-in driver of hopper_compile_check.py): both paths (decode split-K, prefill tiles) of int4,
int8 and fp8, bf16 activations, the one-row GEMV and the many-row path's int4/int8 dequantize kernel; and the fused MoE kernels (GEMV decode, grouped GEMM) with int8, int4
and fp8 experts. By default the hand-picked config of each path compiles (what a launch
without autotuning runs); `python -m tests.kernels.test_quant_hopper_compile --all-configs` compiles
every autotune config."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("_weight_only_matmul_kernel", "_fp8_matmul_kernel")


def test_quant_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSECC_AUTOTUNE")}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_quant_hopper_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines() if line.strip())
    # {int4 g128, int4 g32, int8} x 2 paths, and int4 nibble planes (decode tiles: FMA, biased; prefill: biased)
    assert int(compiled.get("_weight_only_matmul_kernel", 0)) >= 9, proc.stdout
    assert int(compiled.get("_fp8_matmul_kernel", 0)) >= 4, proc.stdout  # {channel, block} x 2 paths
    assert int(compiled.get("_dequantize_weight_kernel", 0)) >= 2, proc.stdout  # int4, int8 (many-row path)
    # int4 g128, int4 g32, int8 (one row), and int4's two nibble-plane forms, each g128 and g32
    assert int(compiled.get("_weight_only_gemv_kernel", 0)) >= 7, proc.stdout
    assert int(compiled.get("_quantize_per_token_kernel", 0)) >= 1, proc.stdout
    assert int(compiled.get("_sum_splits_kernel", 0)) >= 1, proc.stdout
    assert int(compiled.get("_moe_gemv_kernel", 0)) >= 6, proc.stdout  # {int8, int4, fp8} x {gate_up, down}
    assert int(compiled.get("_moe_gemm_kernel", 0)) >= 6, proc.stdout
    assert int(compiled.get("_route_topk_kernel", 0)) >= 2, proc.stdout  # the MoE routing kernel


def compile_int4_planes(x, N: int, K: int) -> None:
    """int4's nibble-plane tiles, in the GEMV and the decode tiles (FMA planes; biased planes, whose inline
    PTX ptxas must accept): not their kernels' first configs, so forced (what autotuning compiles)."""
    import torch

    from fusecc.kernels import launch, quant_gemv, quant_matmul
    from fusecc.kernels.quant_matmul import weight_only_matmul

    fitting = launch._FITTING_CONFIG
    rows = torch.zeros(40, x.shape[1], dtype=x.dtype)  # past the decode tiles: the prefill tiles
    forms = ((quant_gemv._weight_only_gemv, "gemv", x, lambda c: c.kwargs["PLANES"] == quant_matmul.FMA_PLANES),
             (quant_gemv._weight_only_gemv, "gemv", x, lambda c: c.kwargs["PLANES"] == quant_matmul.BIASED_PLANES),
             (quant_matmul._decode_kernel, "tiles", x, lambda c: c.kwargs["PLANES"] == quant_matmul.FMA_PLANES),
             (quant_matmul._decode_kernel, "tiles", x, lambda c: c.kwargs["PLANES"] == quant_matmul.BIASED_PLANES),
             (quant_matmul._prefill_kernel, "tiles", rows,
              lambda c: c.kwargs["PLANES"] == quant_matmul.BIASED_PLANES))
    for kernel, path, a, chosen in forms:
        configs = kernel.configs
        kernel.configs, launch._FITTING_CONFIG = [c for c in configs if chosen(c)], {}
        try:
            for group in (128, 32) if path == "gemv" else (128,):  # the tiles' planes need one group a tile
                weight_only_matmul(a, torch.zeros(N, K // 8, dtype=torch.int32), torch.ones(N, K // group),
                                   torch.zeros(N, K // group), 4, group, path=path)
        finally:
            kernel.configs, launch._FITTING_CONFIG = configs, fitting


def compile_all(all_configs: bool) -> None:
    import torch

    from fusecc.kernels.launch import kernel_autotuning
    from fusecc.kernels.fp8_matmul import fp8_matmul
    from fusecc.kernels.quant_matmul import dequantize_weight, weight_only_matmul

    bf16 = torch.bfloat16
    N, K = 128, 1024  # at M = 1: 2 tiles of 64 on 4 "SMs" -> split-K (and its sum kernel)
    with kernel_autotuning(all_configs):
        for M in (1, 300):  # the decode (split) and the prefill path
            x = torch.randn(M, K, dtype=bf16)
            for group in (128, 32):
                weight_only_matmul(x, torch.zeros(N, K // 8, dtype=torch.int32), torch.ones(N, K // group),
                                   torch.zeros(N, K // group), 4, group, path="tiles")
            weight_only_matmul(x, torch.zeros(N, K, dtype=torch.int8), torch.ones(N, 1), None, 8, -1,
                               bias=torch.zeros(N, dtype=bf16), path="tiles")
        x = torch.randn(1, K, dtype=bf16)  # the one-row GEMV
        for group in (128, 32):
            weight_only_matmul(x, torch.zeros(N, K // 8, dtype=torch.int32), torch.ones(N, K // group),
                               torch.zeros(N, K // group), 4, group, path="gemv")
        weight_only_matmul(x, torch.zeros(N, K, dtype=torch.int8), torch.ones(N, 1), None, 8, -1, path="gemv")
        compile_int4_planes(x, N, K)
        for bits, qweight in ((4, torch.zeros(N, K // 8, dtype=torch.int32)), (8, torch.zeros(N, K, dtype=torch.int8))):
            dequantize_weight(qweight, torch.ones(N, K // 128), torch.zeros(N, K // 128), bits, 128, K, bf16)
            w8 = torch.zeros(N, K, dtype=torch.float8_e4m3fn)
            fp8_matmul(x, w8, torch.ones(N, 1), -1, use_scaled_mm=False)
            fp8_matmul(x, w8, torch.ones(N, K // 128), 128)
        compile_quantized_moe()


def compile_quantized_moe() -> None:
    import torch

    from fusecc.kernels.fused_moe import fused_moe
    from fusecc.kernels.moe_expert_weights import ExpertQuant

    E, H, inter, top_k = 8, 512, 256, 2
    packed = {"int8": (torch.int8, 1), "int4": (torch.int32, 8), "fp8": (torch.float8_e4m3fn, 1)}
    for fmt, (dtype, per_word) in packed.items():
        group = 128 if fmt == "int4" else -1
        quants = []
        for N, K in ((2 * inter, H), (H, inter)):
            groups = 1 if group == -1 else K // group
            zeros = torch.zeros(E, N, groups) if fmt == "int4" else None
            quants.append((torch.zeros(E, N, K // per_word).to(dtype), ExpertQuant(fmt, group, torch.ones(E, N, groups),
                                                                                    zeros)))
        (w13, q13), (w2, q2) = quants
        for tokens in (1, 64):  # the GEMV decode path and the grouped GEMMs
            x = torch.randn(tokens, H, dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E)[:top_k] for _ in range(tokens)])
            fused_moe(x, w13, w2, torch.rand(tokens, top_k), ids, w13_quant=q13, w2_quant=q2)
    from fusecc.kernels.moe_routing import route_topk

    for experts, k in ((128, 8), (8, 2)):  # one warp up to 256 experts
        route_topk(torch.randn(3, experts, dtype=torch.bfloat16), k, True)


if __name__ == "__main__":
    from tests.kernels import hopper_compile_check as check

    check.install()
    compile_all("--all-configs" in sys.argv)
    for name, count in sorted(check.COMPILED.items()):
        print(f"{name} {count}")
