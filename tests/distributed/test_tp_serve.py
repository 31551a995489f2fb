"""fusecc-serve with --tensor-parallel-size 2 (CPU, gloo, spawned ranks): it answers, and a worker
killed in the middle of a request ends the server: exit code 1, a log line saying why, no rank
left running and no hang (a server that only answered 503 would keep its port and its GPUs)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.runtime.hf_checkpoints import save_tiny_checkpoint
from tests.serve.conftest import start_server


def spawned_ranks(pid: int) -> list[int]:
    """The server's multiprocessing children that run a rank (not the resource tracker)."""
    ranks = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            ranks.append(int(child))
    return ranks


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    status = Path(f"/proc/{pid}/status").read_text()
    return "\nState:\tZ" in status  # exited, waiting for its (dead) parent's reaper


def test_a_killed_worker_ends_the_server(tmp_path):
    save_tiny_checkpoint("llama", tmp_path / "ckpt")
    server = start_server(tmp_path, str(tmp_path / "ckpt"), "--tensor-parallel-size", "2", "--device", "cpu",
                          "--enforce-eager", "--max-model-len", "256", "--num-kv-blocks", "64",
                          "--served-model-name", "tiny", engine_factory=None, start_timeout=180)
    try:
        request = {"model": "tiny", "prompt": "w3 w4 w5", "max_tokens": 4, "temperature": 0}
        first = httpx.post(server.url + "/v1/completions", json=request, timeout=60)
        assert first.status_code == 200, first.text
        ranks = spawned_ranks(server.proc.pid)
        assert len(ranks) == 2, ranks

        long_request = {**request, "max_tokens": 200, "ignore_eos": True}
        answers = []
        worker = threading.Thread(target=lambda: answers.append(
            httpx.post(server.url + "/v1/completions", json=long_request, timeout=120)))
        worker.start()
        time.sleep(1.0)  # the request is being generated
        os.kill(ranks[1], signal.SIGKILL)
        assert server.proc.wait(timeout=90) == 1, server.log()
        worker.join(timeout=30)
        assert answers and answers[0].status_code >= 500  # the request in flight got an error, not a hang
        assert "the engine failed, so the server shut down" in server.log()
        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in ranks), [pid for pid in ranks if not gone(pid)]
    finally:
        server.stop(signal.SIGKILL)
