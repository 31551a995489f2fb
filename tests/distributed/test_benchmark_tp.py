"""benchmarks/tp.py --smoke runs end to end on CPU with gloo (world size 2 spawned, 1 in-process
group) and reports what issue 22 asks for, each TP figure next to the plain engine's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(tmp_path, world: int) -> dict:
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/tp.py"), "--smoke", "--tp", str(world), "--out",
                           str(out)], cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_report(report: dict, world: int) -> None:
    assert report["world_size"] == world and report["backend"] == "gloo"
    assert [r["bytes"] for r in report["all_reduce"]][:2] == [64 * 4, 1 << 20]
    entry, = report["shapes"]
    for run in ("baseline_plain_engine", "tensor_parallel"):
        figures = entry[run]
        assert figures["decode_bs1_tok_s"] > 0 and figures["throughput_tokens"] == 6 * 4, (run, figures)
    assert entry["decode_bs1_tok_s_ratio_vs_plain"] > 0 and entry["throughput_tok_s_ratio_vs_plain"] > 0


def test_smoke_one_rank(tmp_path):
    check_report(run_smoke(tmp_path, 1), 1)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FUSECC_SLOW_TESTS"), reason="~20 s on 2 cores (the same code as the "
                    "torchrun test's ranks): run with FUSECC_SLOW_TESTS=1")
def test_smoke_two_ranks(tmp_path):
    check_report(run_smoke(tmp_path, 2), 2)
