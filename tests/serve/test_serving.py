"""Serving behaviour on the fake engine: disconnects free KV blocks, 200 concurrent requests, /metrics
moves, one log line per request, clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

import httpx
import openai

from tests.serve.fake_engine import expected_text

CMPL = "/v1/completions"


def _abort_count(server) -> float:
    return server.metric("fusecc_requests_finished_total", 'reason="abort"')


def test_disconnect_mid_stream_aborts_and_frees_blocks(make_server):
    server = make_server(env={"FUSECC_FAKE_TOKEN_DELAY": "0.01"})
    assert _abort_count(server) == 0
    with httpx.Client(base_url=server.url, timeout=10) as c:
        body = {"prompt": "long one", "max_tokens": 400, "stream": True}
        with c.stream("POST", CMPL, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks: the request is running
            assert any(g.startswith("data: ") for g in got)
            assert server.metric("fusecc_kv_cache_usage_perc") > 0
            assert server.metric("fusecc_num_requests_running") == 1
        # Leaving the block closed the connection mid-stream.
    assert server.wait_for_metric("fusecc_requests_finished_total", 'reason="abort"', lambda v: v == 1) == 1
    assert server.wait_for_metric("fusecc_kv_cache_usage_perc", "", lambda v: v == 0) == 0
    assert server.metric("fusecc_num_requests_running") == 0
    # Far fewer than 400 tokens were generated: the engine stopped at the disconnect.
    assert server.metric("fusecc_generation_tokens_total") < 200
    r = httpx.post(server.url + CMPL, json={"prompt": "next", "max_tokens": 3}, timeout=10)
    assert r.json()["choices"][0]["text"] == expected_text("next", 3)
    # logged and counted as the client's abort, not as "200 ... completion_tokens=N"
    assert re.search(r"POST /v1/completions 499 \S+ aborted \(client disconnected\) prompt_tokens=8 ", server.log())
    assert server.metric("fusecc_http_requests_total", 'method="POST",route="/v1/completions",status="499"') == 1


def test_disconnect_while_waiting_non_streaming(make_server):
    # A non-streaming request waiting for a running slot: its client leaves, the engine forgets it.
    server = make_server("--max-num-seqs", "1", env={"FUSECC_FAKE_TOKEN_DELAY": "0.01"})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("POST", CMPL, json={"prompt": "a", "max_tokens": 400, "stream": True}) as running:
            assert running.status_code == 200
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            payload = json.dumps({"prompt": "b", "max_tokens": 5}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            assert server.wait_for_metric("fusecc_num_requests_waiting", "", lambda v: v == 1) == 1
            sock.close()
            assert server.wait_for_metric("fusecc_num_requests_waiting", "", lambda v: v == 0) == 0
            assert server.wait_for_metric("fusecc_requests_finished_total", 'reason="abort"',
                                          lambda v: v == 1) == 1
    assert server.wait_for_metric("fusecc_kv_cache_usage_perc", "", lambda v: v == 0) == 0
    assert " 499 " in server.log()


async def _many(url: str, n: int) -> list:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=60, max_retries=0) as client:
        async def one(i: int):
            prompt = f"request {i}"
            if i % 2:
                r = await client.completions.create(model="fake-model", prompt=prompt, max_tokens=8)
                return r.choices[0].text == expected_text(prompt, 8)
            stream = await client.completions.create(model="fake-model", prompt=prompt, max_tokens=8, stream=True)
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            return text == expected_text(prompt, 8)
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_200_concurrent_requests_and_metrics_move(fake_server):
    before = {name: fake_server.metric(name) for name in (
        "fusecc_generation_tokens_total", "fusecc_prompt_tokens_total", "fusecc_time_to_first_token_seconds_count",
        "fusecc_e2e_request_latency_seconds_count", "fusecc_inter_token_latency_seconds_count",
        "fusecc_request_queue_time_seconds_count")}
    length_before = fake_server.metric("fusecc_requests_finished_total", 'reason="length"')
    ok = asyncio.run(asyncio.wait_for(_many(fake_server.url, 200), timeout=60))
    assert ok == [True] * 200
    after = {name: fake_server.metric(name) for name in before}
    assert after["fusecc_generation_tokens_total"] - before["fusecc_generation_tokens_total"] == 200 * 8
    prompt_tokens = sum(len(f"request {i}") for i in range(200))
    assert after["fusecc_prompt_tokens_total"] - before["fusecc_prompt_tokens_total"] == prompt_tokens
    for name in ("fusecc_time_to_first_token_seconds_count", "fusecc_e2e_request_latency_seconds_count",
                 "fusecc_request_queue_time_seconds_count"):
        assert after[name] - before[name] == 200, name
    assert after["fusecc_inter_token_latency_seconds_count"] - before["fusecc_inter_token_latency_seconds_count"] \
        == 200 * 7
    assert fake_server.metric("fusecc_requests_finished_total", 'reason="length"') - length_before == 200
    assert fake_server.metric("fusecc_num_requests_running") == 0
    assert fake_server.metric("fusecc_kv_cache_usage_perc") == 0
    assert fake_server.metric("fusecc_http_requests_total",
                              'method="POST",route="/v1/completions",status="200"') >= 200


def test_one_log_line_per_request(fake_server):
    marker = "log line probe"
    r = httpx.post(fake_server.url + CMPL, json={"prompt": marker, "max_tokens": 3}, timeout=10)
    assert r.status_code == 200
    bad = httpx.post(fake_server.url + CMPL, json={"prompt": ""}, timeout=10)
    assert bad.status_code == 400
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = fake_server.log()
        ok_lines = [ln for ln in log.splitlines() if f"prompt_tokens={len(marker)} completion_tokens=3" in ln]
        if ok_lines and "POST /v1/completions 400 " in log:
            break
        time.sleep(0.02)
    assert len(ok_lines) == 1 and "POST /v1/completions 200 " in ok_lines[0] and "ms " in ok_lines[0]
    assert "POST /v1/completions 400 " in log


def test_sigterm_lets_in_flight_stream_finish(make_server):
    server = make_server("--shutdown-timeout", "10", env={"FUSECC_FAKE_TOKEN_DELAY": "0.005"})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("POST", CMPL, json={"prompt": "bye", "max_tokens": 100, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
    assert "data: [DONE]" in rest
    # The stream ran to its end (finish_reason length), not cut off by the shutdown.
    chunks = [json.loads(ln[6:]) for ln in rest if ln.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert expected_text("bye", 100).endswith("".join(ch["choices"][0]["text"] for ch in chunks))
    assert server.proc.wait(timeout=15) == 0
    log = server.log()
    assert "engine shut down" in log
    with socket.socket() as s:  # the port is released
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


def test_sigint_with_stuck_stream_aborts_after_timeout(make_server):
    server = make_server("--shutdown-timeout", "0.5", env={"FUSECC_FAKE_TOKEN_DELAY": "0.05"})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("POST", CMPL, json={"prompt": "slow", "max_tokens": 400, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response (a client disconnect)
            next(lines)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            assert server.proc.wait(timeout=15) == 0
            assert time.monotonic() - t0 < 5
    log = server.log()
    assert "engine shut down" in log
    # The stuck stream was ended by the shutdown, well before its 400 tokens, and is logged as such.
    m = re.search(r"POST /v1/completions 503 \S+ aborted \(server shutting down\) prompt_tokens=4 "
                  r"completion_tokens=(\d+)", log)
    assert m and int(m.group(1)) < 400
