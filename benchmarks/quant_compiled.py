"""Compiled hand-written quantized linears (GPU): a Llama-3-8B-shape SwiGLU MLP (hidden 4096, intermediate
14336) whose linears dequantize their own weights (tests/passes/quantized_modules.py: int8 per channel,
`F.linear(x, w.to(x.dtype) * scale[:, None])`; int4 group 128 from uint8 nibbles with zero points),
compiled with fusecc (`freeze=True`: fusecc/passes/quantized_linear_matching.py turns each into one
`fusecc::weight_only_linear`), against the same MLP with bf16 `nn.Linear`s compiled by fusecc, in one
run. Also the hand-written model run eagerly (what the user has without the pass: a full dequantize per
call) and how many linears the dump reports fused.

    python benchmarks/quant_compiled.py --out benchmarks/results/quant_compiled.json
    python benchmarks/quant_compiled.py --smoke --out /tmp/quant_compiled_smoke.json   # tiny, CPU
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = __file__.rsplit("/", 2)[0]
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "passes")]

from benchmarks.quant import timeit  # noqa: E402
from quantized_modules import Int4TwoPerByte, Int8Linear  # noqa: E402


class SwiGLU(torch.nn.Module):
    def __init__(self, make_linear, hidden: int, inter: int):
        super().__init__()
        self.gate, self.up, self.down = make_linear(hidden, inter), make_linear(hidden, inter), make_linear(inter, hidden)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build(method: str, hidden: int, inter: int, group: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    make = {"bf16": lambda k, n: torch.nn.Linear(k, n, bias=False),
            "int8": lambda k, n: Int8Linear(k, n, bias=False),
            "int4": lambda k, n: Int4TwoPerByte(k, n, group)}[method]
    model = SwiGLU(make, hidden, inter).eval()
    for module in model.modules():  # scales and zero points in the activations' dtype, as such models keep them
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))
    if method == "bf16":
        for p in model.parameters():
            p.data.mul_(hidden ** -0.5)
    return model.to(device=device, dtype=dtype) if method == "bf16" else model.to(device)


def fused_linears(dump_dir: str) -> int:
    """Linears the pass rewrote in each compiled graph (one graph per shape class): the fewest."""
    counts = []
    for path in glob.glob(os.path.join(dump_dir, "*", "report.json")):
        with open(path) as f:
            records = json.load(f)["passes"]
        counts.append(sum(r["stats"].get("rewritten", 0) for r in records if r["name"] == "quantized_linear_matching"))
    return min(counts, default=0)


def main() -> int:
    from fusecc.backend import fusecc_backend

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    hidden, inter, group = (64, 128, 32) if args.smoke else (4096, 14336, 128)
    rows = [1, 16] if args.smoke else [1, 16, 512]
    import triton

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
              "dtype": str(dtype), "shape": {"hidden": hidden, "intermediate": inter, "group": group}, "results": []}
    baseline: dict[int, float] = {}
    for method in ("bf16", "int8", "int4"):
        model = build(method, hidden, inter, group, device, dtype)
        dump_dir = tempfile.mkdtemp(prefix=f"quant_compiled_{method}_")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=fusecc_backend, options={"freeze": True, "dump_dir": dump_dir})
        for M in rows:
            x = torch.randn(M, hidden, device=device, dtype=dtype)
            with torch.no_grad():
                compiled(x)  # compile (and autotune) outside the timing
                ms = timeit(lambda: compiled(x), device, reps=3 if args.smoke else 0) * 1e3
                eager_ms = timeit(lambda: model(x), device, reps=3 if args.smoke else 0) * 1e3
            if method == "bf16":
                baseline[M] = ms
            entry = {"method": method, "M": M, "compiled_ms": ms, "eager_ms": eager_ms,
                     "speedup_vs_compiled_bf16": baseline[M] / ms, "fused_linears": fused_linears(dump_dir)}
            report["results"].append(entry)
            print(json.dumps(entry), flush=True)
        del model, compiled
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
