"""The real fusecc-serve process on a free loopback port, for every serve test.

    def test_x(fake_server):            # one per test session, FakeAsyncEngine behind it
        httpx.get(fake_server.url + "/health")

Servers are started with `python -m fusecc.serve.cli` (the same code path as the console script),
waited for with a bounded /health poll, and always terminated (then killed) by a finalizer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE = "tests.serve.fake_engine:make_engine"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of GET /metrics, e.g. metric("fusecc_requests_finished_total", 'reason="abort"')."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        pattern = "^" + re.escape(name + ("{" + labels + "}" if labels else "")) + r" (\S+)$"
        m = re.search(pattern, text, re.MULTILINE)
        assert m, f"{name}{{{labels}}} not in /metrics"
        return float(m.group(1))

    def wait_for_metric(self, name: str, labels: str, pred, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, labels)
            if pred(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def start_server(tmp_dir: Path, *args: str, env: dict | None = None, start_timeout: float = START_TIMEOUT_S,
                 engine_factory: str | None = FAKE) -> ServerProcess:
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "fusecc.serve.cli", "--host", "127.0.0.1", "--port", str(port), *args]
    if engine_factory:
        cmd += ["--engine-factory", engine_factory]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, log_path)
    deadline = time.monotonic() + start_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"server not healthy after {start_timeout}s:\n{server.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve"), "--served-model-name", "fake-model")
    yield server
    server.stop()


@pytest.fixture
def make_server(tmp_path):
    """Start servers with custom arguments inside one test; all are stopped afterwards."""
    servers: list[ServerProcess] = []

    def make(*args: str, **kw) -> ServerProcess:
        servers.append(start_server(tmp_path, *args, **kw))
        return servers[-1]

    yield make
    for s in servers:
        s.stop(signal.SIGKILL)
