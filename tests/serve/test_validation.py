"""Malformed and refused requests over raw HTTP: each gets OpenAI's error body naming the field, and
the server keeps serving afterwards."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.fake_engine import expected_text

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, raw body, field the error must name). The fake engine's context is 512 tokens.
BAD = {
    "malformed_json": (CMPL, b'{"prompt": "x", ', None),
    "not_an_object": (CMPL, b'[1, 2]', None),
    "missing_prompt": (CMPL, {"max_tokens": 3}, "prompt"),
    "prompt_wrong_type": (CMPL, {"prompt": 5}, "prompt"),
    "max_tokens_string": (CMPL, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    "temperature_string": (CMPL, {"prompt": "x", "temperature": "hot"}, "temperature"),
    "stream_not_bool": (CMPL, {"prompt": "x", "stream": "yes"}, "stream"),
    "empty_prompt": (CMPL, {"prompt": ""}, "prompt"),
    "empty_token_prompt": (CMPL, {"prompt": []}, "prompt"),
    "token_out_of_vocab": (CMPL, {"prompt": [1, 99999]}, "prompt"),
    "prompt_too_long": (CMPL, {"prompt": "x" * 600}, "prompt"),
    "prompt_fills_context": (CMPL, {"prompt": "x" * 512}, "prompt"),
    "max_tokens_too_large": (CMPL, {"prompt": "x" * 500, "max_tokens": 13}, "max_tokens"),
    "max_tokens_zero": (CMPL, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "negative_temperature": (CMPL, {"prompt": "x", "temperature": -1}, "temperature"),
    "top_p_zero": (CMPL, {"prompt": "x", "top_p": 0}, "top_p"),
    "n_zero": (CMPL, {"prompt": "x", "n": 0}, "n"),
    "too_many_stops": (CMPL, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    "empty_stop": (CMPL, {"prompt": "x", "stop": [""]}, "stop"),
    "logprobs_too_many": (CMPL, {"prompt": "x", "logprobs": 50}, "logprobs"),
    "min_tokens_above_max": (CMPL, {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    "stream_options_without_stream": (CMPL, {"prompt": "x", "stream_options": {"include_usage": True}},
                                      "stream_options"),
    "chat_missing_messages": (CHAT, {"max_tokens": 1}, "messages"),
    "chat_empty_messages": (CHAT, {"messages": []}, "messages"),
    "chat_bad_role": (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    "chat_content_wrong_type": (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages"),
    "chat_too_long": (CHAT, {"messages": [{"role": "user", "content": "y" * 600}]}, "messages"),
    "chat_max_tokens_too_large": (CHAT, {"messages": USER, "max_tokens": 600}, "max_tokens"),
    "chat_top_logprobs_without_logprobs": (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    "chat_logprobs_not_bool": (CHAT, {"messages": USER, "logprobs": 3}, "logprobs"),
    # the error names the field the client sent, not the SamplingParams field it maps to
    "chat_max_completion_tokens_zero": (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    "chat_top_logprobs_too_many": (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 25}, "top_logprobs"),
}


def _post(server, path, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"},
                      timeout=10, **kw)


def _assert_error(resp: httpx.Response, status: int, param) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["param"] == param, err
    return err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_400(fake_server, case):
    path, body, param = BAD[case]
    err = _assert_error(_post(fake_server, path, body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_server_keeps_serving_after_bad_requests(fake_server):
    with httpx.Client(base_url=fake_server.url, timeout=10, headers={"Content-Type": "application/json"}) as c:
        for path, body, _ in BAD.values():
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            assert c.post(path, content=content).status_code == 400
    r = _post(fake_server, CMPL, {"prompt": "ok", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text("ok", 4)


def test_max_tokens_exactly_filling_context_is_accepted(fake_server):
    r = _post(fake_server, CMPL, {"prompt": "x" * 500, "max_tokens": 12})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12


def test_oversized_body_is_400(fake_server):
    body = json.dumps({"prompt": "x", "user": "u" * (5 << 20)}).encode()
    err = _assert_error(_post(fake_server, CMPL, body), 400, "body")
    assert err["code"] == "request_too_large"


def test_oversized_chunked_body_is_400(fake_server):
    # No Content-Length: the limit is enforced while reading.
    def chunks():
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(fake_server.url + CMPL, content=chunks(), headers={"Content-Type": "application/json"}, timeout=10)
    _assert_error(r, 400, "body")


def test_unknown_model_is_404(fake_server):
    err = _assert_error(_post(fake_server, CHAT, {"model": "nope", "messages": USER}), 404, "model")
    assert err["code"] == "model_not_found"


def test_unknown_route_is_openai_404(fake_server):
    r = httpx.get(fake_server.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(make_server):
    server = make_server("--api-key", "sekret")
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.post(server.url + CMPL, json=body, headers=headers, timeout=5)
        err = _assert_error(r, 401, None)
        assert err["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=5).status_code == 401
    ok = httpx.post(server.url + CMPL, json=body, headers={"Authorization": "Bearer sekret"}, timeout=5)
    assert ok.status_code == 200
    # Liveness and metrics stay open for probes and scrapers.
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200


def test_full_queue_is_429_with_retry_after(make_server):
    # One running slot and one waiting slot in the engine; the server admits 3 in flight.
    server = make_server("--max-num-seqs", "1", "--max-waiting", "1", "--max-queue", "3",
                         env={"FUSECC_FAKE_TOKEN_DELAY": "0.02"})
    body = {"prompt": "x", "max_tokens": 500, "stream": True}
    with httpx.Client(base_url=server.url, timeout=10) as c, ThreadPoolExecutor(1) as pool:
        with c.stream("POST", CMPL, json=body) as running:
            assert running.status_code == 200
            assert server.wait_for_metric("fusecc_num_requests_running", "", lambda v: v == 1) == 1
            # The second waits in the engine; its response only starts once it is running.
            waiting = pool.submit(httpx.post, server.url + CMPL, json={"prompt": "y", "max_tokens": 1}, timeout=30)
            assert server.wait_for_metric("fusecc_num_requests_waiting", "", lambda v: v == 1) == 1
            # Engine queue full: the engine's SchedulerFullError becomes a 429.
            r = c.post(CMPL, json={"prompt": "z", "max_tokens": 1})
            err = _assert_error(r, 429, None)
            assert err["code"] == "queue_full" and r.headers["Retry-After"] == "1"
            assert "max_waiting" in err["message"]
        # The running stream was dropped (aborted): the waiting request runs and succeeds.
        assert waiting.result(timeout=20).status_code == 200
    # Everything drains: the server serves again.
    assert server.wait_for_metric("fusecc_num_requests_running", "", lambda v: v == 0) == 0
    assert server.wait_for_metric("fusecc_num_requests_waiting", "", lambda v: v == 0) == 0
    assert httpx.post(server.url + CMPL, json={"prompt": "z", "max_tokens": 1}, timeout=10).status_code == 200


def test_server_admission_limit_is_429(make_server):
    server = make_server("--max-queue", "1", env={"FUSECC_FAKE_TOKEN_DELAY": "0.02"})
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("POST", CMPL, json={"prompt": "x", "max_tokens": 500, "stream": True}) as running:
            assert running.status_code == 200
            r = c.post(CMPL, json={"prompt": "z", "max_tokens": 1})
            err = _assert_error(r, 429, None)
            assert "max_queue=1" in err["message"] and r.headers["Retry-After"] == "1"
    ok = None
    for _ in range(100):  # the aborted stream releases its slot right after the disconnect
        ok = httpx.post(server.url + CMPL, json={"prompt": "z", "max_tokens": 1}, timeout=10)
        if ok.status_code == 200:
            break
        time.sleep(0.02)
    assert ok.status_code == 200


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port: 70000 is outside"),
    (["--port", "-1"], "--port: -1 is outside"),
    (["--api-key", ""], "--api-key: must not be empty"),
    (["--max-queue", "0"], "--max-queue: 0 is outside"),
    (["--max-body-bytes", "-5"], "--max-body-bytes: -5 is outside"),
])
def test_serve_cli_rejects_bad_arguments_before_building_the_engine(args, message, capsys):
    from fusecc.serve.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    # EngineConfig's checks run while parsing: usage errors, before the socket or the model
    (["--dtype", "bogus"], "dtype must be one of"),
    (["--max-model-len", "0"], "max_model_len must be"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size must be >= 1"),
    (["--quantization", "q3"], "quantization must be one of int8, int4, fp8, awq, gptq or None"),
    (["--kv-cache-dtype", "fp16"], "kv_cache_dtype must be one of auto, fp8, fp8_e4m3"),
    (["--speculative-config", '{"method": "ngram"}'], "speculative_config.num_speculative_tokens is required"),
    (["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'], "speculative_config.method"),
    (["--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
    (["a", "--model", "b"], "MODEL a and --model b differ"),
])
def test_serve_cli_usage_errors_in_one_line(args, message, capsys):
    from fusecc.serve.cli import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exc.value.code == 2 and len(errors) == 1 and message in errors[0], err


def test_serve_cli_reports_a_missing_model_folder_in_one_line():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fusecc.serve.cli", "/nonexistent", "--enforce-eager", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fusecc-serve: error: cannot start the engine:"), proc.stderr
    assert "/nonexistent" in errors[0]
