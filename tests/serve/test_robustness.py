"""Hostile or unlucky clients over raw HTTP: made-up methods, ambiguous framing, slow senders,
browser-style posts, a shutdown that outlasts its requests. Each must get a bounded, well-formed
answer, and the server must keep its resources (metric series, connections) bounded."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fusecc.runtime.async_engine import EngineShutDown
from tests.serve.fake_engine import FakeAsyncEngine

CMPL = "/v1/completions"
_STANDARD_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or `timeout` passes; returns what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
        return got


def test_made_up_methods_fold_into_one_metric_series(fake_server):
    with httpx.Client(base_url=fake_server.url, timeout=5) as c:
        for i in range(30):
            assert c.request(f"M{i}X", CMPL).status_code == 405
    text = httpx.get(fake_server.url + "/metrics", timeout=5).text
    methods = set(re.findall(r'^fusecc_http_requests_total\{method="([^"]*)"', text, re.MULTILINE))
    assert "other" in methods and methods <= _STANDARD_METHODS | {"other"}, methods


def test_content_length_with_chunked_encoding_is_rejected(fake_server):
    # RFC 9112 6.1: a message with both is a smuggling vector; the server must not guess the framing
    body = b'{"prompt": "x", "max_tokens": 1}'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body))
    start = time.monotonic()
    answer = _raw(fake_server.port, head + body, timeout=5)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Transfer-Encoding" in answer and time.monotonic() - start < 4


def test_post_without_json_content_type_is_415(fake_server):
    # a browser page may send a CORS "simple" text/plain POST without a preflight
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(fake_server.url + CMPL, content=body, headers=headers, timeout=5)
        assert r.status_code == 415, (content_type, r.text)
        assert r.json()["error"]["param"] == "Content-Type"
    ok = httpx.post(fake_server.url + CMPL, content=body, timeout=5,
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    from tests.serve.conftest import start_server

    # the key from the environment, not the command line (where `ps` shows it)
    server = start_server(tmp_path_factory.mktemp("keyed"), "--request-read-timeout", "1",
                          env={"FUSECC_API_KEY": "k3y"})
    yield server
    server.stop(signal.SIGKILL)


def test_api_key_from_environment_and_case_insensitive_scheme(keyed_server):
    body = {"prompt": "x", "max_tokens": 1}
    assert httpx.post(keyed_server.url + CMPL, json=body, timeout=5).status_code == 401
    for auth in ("Bearer k3y", "bearer k3y", "BEARER k3y", "Bearer  k3y"):
        r = httpx.post(keyed_server.url + CMPL, json=body, headers={"Authorization": auth}, timeout=5)
        assert r.status_code == 200, (auth, r.text)
    for auth in ("Bearer K3Y", "Basic k3y", "k3y", "Bearerk3y"):
        r = httpx.post(keyed_server.url + CMPL, json=body, headers={"Authorization": auth}, timeout=5)
        assert r.status_code == 401, auth


def test_slow_clients_are_timed_out(keyed_server):
    # --request-read-timeout 1: headers and then the body must each arrive within a second
    cases = {
        "nothing": b"",
        "half a header": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        "half a body": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": "),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        start = time.monotonic()
        answers = dict(zip(cases, pool.map(lambda data: _raw(keyed_server.port, data, timeout=6), cases.values())))
        elapsed = time.monotonic() - start
    assert elapsed < 5, elapsed  # each connection was closed by the server, not by our 6 s timeout
    assert answers["nothing"] == b""
    assert answers["half a header"].startswith(b"HTTP/1.1 408"), answers
    assert answers["half a body"].startswith(b"HTTP/1.1 408"), answers
    assert b'"code":"request_timeout"' in answers["half a body"].replace(b" ", b"")
    assert httpx.get(keyed_server.url + "/health", timeout=5).status_code == 200


def _stream_lines(url: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + CMPL, json=body, timeout=20) as r:
        assert r.status_code == 200
        return list(r.iter_lines())


@pytest.mark.parametrize("second_sigint", [False, True])
def test_requests_outliving_the_shutdown_get_503(make_server, second_sigint):
    # token delay 0.05 s x 400 tokens: nothing finishes within the 0.5 s shutdown timeout
    timeout = "30" if second_sigint else "0.5"
    server = make_server("--shutdown-timeout", timeout, env={"FUSECC_FAKE_TOKEN_DELAY": "0.05"})
    body = {"prompt": "slow", "max_tokens": 400}
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(_stream_lines, server.url, {**body, "stream": True})
        plain = pool.submit(httpx.post, server.url + CMPL, json=body, timeout=20)
        server.wait_for_metric("fusecc_num_requests_running", "", lambda v: v == 2)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        if second_sigint:  # Ctrl-C twice: stop now, without waiting the 30 s
            time.sleep(0.3)
            server.proc.send_signal(signal.SIGINT)
        lines, r = stream.result(timeout=20), plain.result(timeout=20)
    assert server.proc.wait(timeout=15) == 0 and time.monotonic() - t0 < 5
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    events = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log
    # both are logged (and counted) as ended by the server, not as 200 with their partial tokens
    assert len(re.findall(r"POST /v1/completions 503 \S+ aborted \(server shutting down\)", log)) == 2, log


class _ShutDownEngine(FakeAsyncEngine):
    """An engine stopped under its requests (what a forced shutdown does): generate raises
    EngineShutDown after one output."""

    async def generate(self, prompt, params, request_id):
        async for out in super().generate(prompt, params, request_id):
            yield out
            raise EngineShutDown(f"the engine was shut down before request {request_id!r} finished")


def test_engine_shut_down_under_a_request_is_503_not_500():
    from fastapi.testclient import TestClient

    from fusecc.serve.app import create_app

    with TestClient(create_app(_ShutDownEngine(), "m")) as tc:
        r = tc.post(CMPL, json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
        with tc.stream("POST", CMPL, json={"prompt": "x", "max_tokens": 5, "stream": True}) as s:
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "server_shutting_down"
