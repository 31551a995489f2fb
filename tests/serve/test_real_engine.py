"""fusecc-serve on the REAL AsyncLLMEngine with the embedded default model (CPU, enforce_eager).

The default model has random weights, so texts are noise: these tests check counts, finish
reasons, greedy determinism, the wire format, and that aborted requests give back their KV blocks.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.serve.conftest import start_server

pytest.importorskip("fusecc.runtime.async_engine")

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("real"), "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
                          "--num-kv-blocks", "64", "--max-num-seqs", "32", engine_factory=None, start_timeout=90)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(real_server):
    with openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", timeout=60, max_retries=0) as c:
        yield c


def _model(client) -> str:
    return client.models.list().data[0].id


def test_completion_greedy_is_deterministic_and_streams_the_same(client):
    model = _model(client)
    kw = dict(model=model, prompt="The cache", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 12
    assert a.choices[0].text == b.choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == a.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == a.usage.prompt_tokens


def test_chat_and_chat_stream(client):
    model = _model(client)
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True}, logprobs=True, top_logprobs=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert len(r.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in r.choices[0].logprobs.content)
    # The byte tokenizer's documented template, plus BOS.
    assert r.usage.prompt_tokens == 1 + len("<|system|>\nterse\n<|user|>\nhello\n<|assistant|>\n")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                 extra_body={"ignore_eos": True}, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_context_limits_are_400(real_server):
    r = httpx.post(real_server.url + "/v1/completions", json={"prompt": "x" * 300}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(real_server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 300}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_disconnect_frees_kv_blocks(real_server):
    aborts = real_server.metric("fusecc_requests_finished_total", 'reason="abort"')
    body = {"prompt": "a long one", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=real_server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
            assert real_server.metric("fusecc_kv_cache_usage_perc") > 0
    assert real_server.wait_for_metric("fusecc_requests_finished_total", 'reason="abort"',
                                       lambda v: v == aborts + 1, timeout=20) == aborts + 1
    assert real_server.wait_for_metric("fusecc_kv_cache_usage_perc", "", lambda v: v == 0, timeout=20) == 0
    assert real_server.metric("fusecc_num_requests_running") == 0


def test_200_concurrent_requests(real_server):
    async def run():
        async with openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key="x", timeout=60,
                                      max_retries=0) as c:
            rs = await asyncio.gather(*(c.completions.create(model="fusecc-default-tiny-llama", prompt=f"p{i}",
                                                             max_tokens=8, extra_body={"ignore_eos": True})
                                        for i in range(200)))
            return [r.usage.completion_tokens for r in rs]

    before = real_server.metric("fusecc_generation_tokens_total")
    assert asyncio.run(asyncio.wait_for(run(), timeout=90)) == [8] * 200
    assert real_server.metric("fusecc_generation_tokens_total") - before == 1600
    assert real_server.metric("fusecc_time_to_first_token_seconds_count") >= 200
