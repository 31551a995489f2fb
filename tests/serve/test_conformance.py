"""Where fusecc-serve must behave as the OpenAI API and vLLM's server do, beyond the happy path:
nulls, refused parameters, requests that can never fit, failures after the stream started,
unexpected server errors, a dead engine, and clients that leave while sending their body."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fusecc.serve.app import create_app
from tests.serve.fake_engine import FAIL_PROMPT, FakeAsyncEngine, expected_text
from tests.serve.test_validation import _post

MODEL = "fake-model"
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def _sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def client(fake_server):
    with openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", timeout=20, max_retries=0) as c:
        yield c


def test_null_parameters_mean_their_defaults(client):
    # the openai SDK sends null for a parameter passed as None
    nulls = dict(temperature=None, top_p=None, n=None, presence_penalty=None, frequency_penalty=None,
                 stop=None, seed=None, logit_bias=None, user=None)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, echo=None, stream=None, **nulls)
    assert [c.text for c in r.choices] == [expected_text("Hello", 5)]
    chat = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, logprobs=None, **nulls)
    assert len(chat.choices) == 1 and chat.choices[0].finish_reason == "length"


def test_null_for_a_required_field_is_still_refused(fake_server):
    r = _post(fake_server, CMPL, {"prompt": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("path,extra,param", [
    (CMPL, {"suffix": "the end"}, "suffix"),
    (CMPL, {"best_of": 3}, "best_of"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice"),
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),
    (CMPL, {"logit_bias": {"abc": 5}}, "logit_bias"),
    (CMPL, {"logit_bias": {"5": 101}}, "logit_bias"),
])
def test_parameters_that_would_change_the_output_are_refused_not_ignored(fake_server, path, extra, param):
    base = {"prompt": "x"} if path == CMPL else {"messages": USER}
    r = _post(fake_server, path, {**base, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("extra", [{"best_of": 1}, {"suffix": ""}, {"response_format": {"type": "text"}},
                                   {"tool_choice": "none"}, {"tools": []}])
def test_neutral_values_of_unsupported_parameters_are_accepted(fake_server, extra):
    path = CHAT if set(extra) & {"response_format", "tool_choice", "tools"} else CMPL
    base = {"prompt": "x"} if path == CMPL else {"messages": USER}
    assert _post(fake_server, path, {**base, "max_tokens": 2, **extra}).status_code == 200


@pytest.mark.parametrize("body", [
    {"prompt": "x", "n": 5000},  # the fake server queues at most 4096
    {"prompt": ["ab"] * 2000, "n": 3},
])
def test_more_sequences_than_the_queue_holds_is_a_400_not_a_retryable_429(fake_server, body):
    start = time.perf_counter()
    r = _post(fake_server, CMPL, {**body, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert time.perf_counter() - start < 5  # refused up front, not after building thousands of requests
    assert _post(fake_server, CMPL, {"prompt": "x", "max_tokens": 1}).status_code == 200


def test_default_max_tokens_is_capped_per_prompt_of_a_batch(fake_server):
    # context 512: the long prompt has room for 12 tokens, the short one gets the default 16
    r = _post(fake_server, CMPL, {"prompt": ["x" * 500, "hi"]})
    assert r.status_code == 200
    texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    assert texts == [expected_text("x" * 500, 12), expected_text("hi", 16)]


def test_completion_failure_mid_stream_ends_with_an_error_event_and_done(fake_server):
    body = {"prompt": FAIL_PROMPT + " now", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", fake_server.url + CMPL, json=body, timeout=20) as r:
        assert r.status_code == 200
        events = _sse_events(r)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "internal_server_error" and "fake engine failure" in error["message"]
    assert any("choices" in e for e in events[:-2])  # it did stream before failing
    assert httpx.get(fake_server.url + "/health").status_code == 200


def test_chat_failure_mid_stream_ends_with_an_error_event_and_done():
    # the fake chat template puts "[user]" first, so the failing engine is set up in process
    with TestClient(create_app(_FailingChatEngine(), MODEL)) as tc:
        with tc.stream("POST", CHAT, json={"messages": USER, "max_tokens": 10, "stream": True}) as r:
            assert r.status_code == 200
            events = _sse_events(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "internal_server_error"
    assert any(e["choices"][0]["delta"].get("content") for e in events[1:-2])


class _FailingChatEngine(FakeAsyncEngine):
    async def generate(self, prompt, params, request_id):
        ids = self.tokenizer.encode(FAIL_PROMPT) + list(prompt)  # every request fails after two outputs
        async for out in super().generate(ids, params, request_id):
            yield out


def test_an_unexpected_server_error_is_an_openai_json_500(fake_server):
    r = _post(fake_server, CMPL, {"prompt": FAIL_PROMPT + "!", "max_tokens": 10})
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "internal_server_error" and "fake engine failure" in error["message"]
    assert httpx.get(fake_server.url + "/health").status_code == 200


def test_health_is_503_when_the_engine_cannot_serve():
    engine = FakeAsyncEngine()
    with TestClient(create_app(engine, MODEL)) as tc:
        assert tc.get("/health").status_code == 200
        engine.is_shut_down = True
        r = tc.get("/health")
        assert r.status_code == 503 and "shut down" in r.json()["error"]["message"]


def test_real_engine_health_reports_a_failed_engine_thread():
    from fusecc.runtime.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64)
    engine.check_health()
    engine._error = RuntimeError("CUDA error: an illegal memory access")  # what the engine thread records
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.check_health()
    engine._error = None
    engine._stop = True
    engine._wake.set()
    engine._thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.check_health()


def test_stream_chunks_carry_null_finish_reason_and_logprobs(fake_server):
    for path, base in ((CMPL, {"prompt": "x"}), (CHAT, {"messages": USER})):
        with httpx.stream("POST", fake_server.url + path, json={**base, "max_tokens": 3, "stream": True},
                          timeout=20) as r:
            chunks = [e for e in _sse_events(r) if e != "[DONE]"]
        for c in chunks:
            for choice in c["choices"]:
                assert "finish_reason" in choice and "logprobs" in choice, (path, choice)
        assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "length"


def test_client_leaving_while_sending_its_body_is_a_499_not_a_500(fake_server):
    before_500 = _status_count(fake_server, "500")
    before_499 = _status_count(fake_server, "499")
    with socket.create_connection(("127.0.0.1", fake_server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while _status_count(fake_server, "499") == before_499 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status_count(fake_server, "499") == before_499 + 1
    assert _status_count(fake_server, "500") == before_500


def _status_count(server, status: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fusecc_http_requests_total{") and f'status="{status}"' in line and CMPL in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
