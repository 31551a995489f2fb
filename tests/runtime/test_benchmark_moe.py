"""benchmarks/moe.py --smoke's throughput section (issue 21) runs end to end on CPU: one transformers
Qwen3-MoE model, its weights in fusecc's engine, both on the same workload, their ratio reported.
Only that section runs (~10 s on 2 cores); the whole smoke adds the kernel, quantized and decode
sections (~25 s), whose code the kernel and engine tests cover."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_throughput_section(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/moe.py"), "--smoke", "--skip-decode", "--tokens", "",
                           "--quant-tokens", "", "--hf-experts", "grouped_mm,eager", "--out", str(out)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kernel"] == {} and report["quantized"] == {} and report["decode"] is None  # skipped
    section = report["throughput"]
    assert "error" not in section, section.get("error")
    workload = section["workload"]
    assert (workload["requests"], workload["output_tokens"]) == (6, 8)
    assert section["layers"] == 2 and section["full_layers"] == 48
    runs = section["hf_by_experts_implementation"]
    assert set(runs) == {"grouped_mm", "eager"} and all("tok_s" in r for r in runs.values()), runs
    assert section["hf_experts_implementation"] in runs
    assert section["hf_inductor_tok_s"] == max(r["tok_s"] for r in runs.values())
    assert section["hf_inductor_compiled"] is False and "EAGER" in section["hf_baseline"]  # CPU: no inductor
    # every request's tokens, on each side: the HF batch is all 6 requests here
    assert section["hf_inductor_tokens"] == section["fusecc_tokens"] == 6 * 8
    assert section["fusecc_preemptions"] == 0
    assert section["fusecc_vs_hf_inductor"] == section["fusecc_tok_s"] / section["hf_inductor_tok_s"] > 0
