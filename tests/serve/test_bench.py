"""`fusecc bench serve` against a local server: the report and the plot are written and plausible."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.serve.conftest import REPO


def _bench(server, tmp_path, *load: str) -> dict:
    out, png = tmp_path / "result.json", tmp_path / "latency.png"
    cmd = [sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", server.url, "--num-requests", "12",
           "--input-len", "16", "--output-len", "8", "--seed", "1", "--out", str(out), "--plot", str(png), *load]  # default token ids: valid in a 257-id vocabulary
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ttft_ms" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return json.loads(out.read_text())


def test_bench_poisson_rate(fake_server, tmp_path):
    before = fake_server.metric("fusecc_prompt_tokens_total")
    report = _bench(fake_server, tmp_path, "--request-rate", "50")
    assert report["model"] == "fake-model"
    assert report["completed"] == 12 and report["failed"] == 0
    assert report["total_output_tokens"] == 12 * 8
    # Token-id prompts have exactly --input-len tokens.
    assert fake_server.metric("fusecc_prompt_tokens_total") - before == 12 * 16
    assert report["request_throughput"] > 0 and report["output_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = report[name]
        assert 0 < s["p50"] <= s["p95"] <= s["p99"], (name, s)
    assert report["ttft_ms"]["mean"] < report["e2e_ms"]["mean"]


def test_bench_fixed_concurrency_words(fake_server, tmp_path):
    report = _bench(fake_server, tmp_path, "--concurrency", "4", "--prompt-kind", "words")
    assert report["completed"] == 12 and report["concurrency"] == 4 and report["request_rate"] is None
