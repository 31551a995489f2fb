"""`fusecc bench serve` against a local server: the report and the plot are written and plausible;
against no server, or one that wants a key, one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.serve.conftest import REPO, free_port


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


# --- a server that is not there or refuses the key: one line naming the URL, exit code 2 ----------

def _bench_fails(base_url: str, *extra: str, env: dict | None = None) -> str:
    """Run `fusecc bench serve` expecting it to refuse to start; returns its one stderr line."""
    # no key from the developer's environment unless the test gives one
    clean = {k: v for k, v in os.environ.items() if k not in ("FUSECC_API_KEY", "OPENAI_API_KEY")}
    cmd = [sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", base_url, "--num-requests", "2",
           "--input-len", "4", "--output-len", "2", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(REPO), **(env or {})})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


class _Unauthorized(BaseHTTPRequestHandler):
    """Answers 401 to everything, as an OpenAI-compatible server with a key does without one."""

    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def unauthorized_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_bench_closed_port_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    line = _bench_fails(url)
    assert line == f"fusecc bench serve: {url} refused the connection: is fusecc-serve running?"


def test_bench_401_is_one_line(unauthorized_url):
    line = _bench_fails(unauthorized_url)
    assert line == f"fusecc bench serve: {unauthorized_url} answered 401 Unauthorized: pass --api-key " \
                   "(or set FUSECC_API_KEY)"
    # with --model the lookup is not needed, but the server is still asked before the load starts
    line = _bench_fails(unauthorized_url, "--model", "m", "--api-key", "wrong")
    assert line == f"fusecc bench serve: {unauthorized_url} answered 401 Unauthorized: the API key was not accepted"


def test_bench_usage_mistakes_are_argparse_errors(tmp_path):
    for extra in (("--num-requests", "0"), ("--min-token-id", "9", "--max-token-id", "9"),
                  ("--out", str(tmp_path / "missing" / "r.json"))):
        cmd = [sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", "http://127.0.0.1:9", *extra]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines()[-1].startswith("fusecc bench serve: error: ")
    proc = subprocess.run([sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", "127.0.0.1:8000"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not an http:// or https:// URL" in proc.stderr


def test_bench_api_key_from_the_environment(make_server, tmp_path):
    server = make_server("--served-model-name", "fake-model", "--api-key", "sesame")
    assert "answered 401 Unauthorized: pass --api-key" in _bench_fails(server.url)
    out = tmp_path / "result.json"
    for var in ("FUSECC_API_KEY", "OPENAI_API_KEY"):
        env = {k: v for k, v in os.environ.items() if k not in ("FUSECC_API_KEY", "OPENAI_API_KEY")}
        cmd = [sys.executable, "-m", "fusecc.cli", "bench", "serve", "--base-url", server.url, "--num-requests", "2",
               "--input-len", "4", "--output-len", "2", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={**env, "PYTHONPATH": str(REPO), var: "sesame"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(out.read_text())["completed"] == 2
