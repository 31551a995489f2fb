"""fusecc-serve on the REAL AsyncLLMEngine with the embedded default model (CPU, enforce_eager).

The default model has random weights, so texts are noise: these tests check counts, finish
reasons, greedy determinism, the wire format, and that aborted requests give back their KV blocks.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from fusecc import LLM, SamplingParams
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


def test_logprobs_with_sampling_filters_are_finite_json(real_server):
    # top_k cuts tokens; logprobs are the model's (raw, as vLLM), and the body is strict JSON
    import json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))

    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0.7, "top_k": 2, "logprobs": 5, "seed": 1}
    r = httpx.post(real_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    lp = strict(r.text)["choices"][0]["logprobs"]
    assert all(v > -9999 for top in lp["top_logprobs"] for v in top.values())
    r = httpx.post(real_server.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            strict(line[6:])
    r = httpx.post(real_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0.5, "top_k": 2,
        "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    strict(r.text)


def test_a_server_error_is_counted_as_500_not_client_closed():
    from fusecc.runtime.async_engine import AsyncLLMEngine
    from fusecc.serve.app import create_app

    async def main():
        engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, num_kv_blocks=64, max_model_len=256)
        app = create_app(engine)

        async def boom(*args, **kwargs):
            raise RuntimeError("internal failure")

        app.state.serving.completions = boom
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            r = await c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
            metrics = (await c.get("/metrics")).text
        await engine.shutdown()
        return r.status_code, [line for line in metrics.splitlines()
                               if line.startswith("fusecc_http_requests_total") and "completions" in line]

    status, lines = asyncio.run(main())
    assert status == 500 and any('status="500"' in line for line in lines), lines
    assert not any('status="499"' in line for line in lines), lines


def test_logit_bias_forces_and_bans_tokens(client):
    model = _model(client)
    kw = dict(model=model, prompt="The cache", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    forced = client.completions.create(**kw, logit_bias={str(ord("Q")): 100})
    assert forced.choices[0].text == "Q" * 6  # byte tokenizer: token id = byte value
    plain = client.completions.create(**kw).choices[0].text
    banned = client.completions.create(**kw, logit_bias={str(b): -100 for b in set(plain.encode())})
    assert not set(banned.choices[0].text.encode()) & set(plain.encode())
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(**kw, logit_bias={"999999": 1})


# ---- vLLM's prompt_logprobs (extra_body): the engine's prompt logprobs in each choice ------------

PLP_PROMPT = "The paged cache"


@pytest.fixture(scope="module")
def offline_prompt_logprobs():
    """The same embedded model offline: its prompt logprobs are checked against transformers in
    tests/runtime/test_prompt_logprobs.py; here the server must return exactly them."""
    llm = LLM(enforce_eager=True, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64, max_num_seqs=32)
    return llm.generate(PLP_PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]


def assert_same_as_offline(got: list, offline) -> None:
    want = offline.prompt_logprobs
    assert got[0] is None and len(got) == len(want) == len(offline.prompt_token_ids)
    for entry, ref in zip(got[1:], want[1:]):
        assert set(entry) == {str(t) for t in ref}  # JSON object keys: token ids as strings
        for t, e in ref.items():
            assert entry[str(t)] == {"logprob": pytest.approx(e.logprob, abs=1e-5), "rank": e.rank,
                                     "decoded_token": e.decoded_token}


def test_prompt_logprobs_in_completions_choices(client, offline_prompt_logprobs):
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=PLP_PROMPT, max_tokens=2, temperature=0, n=2,
                                  extra_body={"prompt_logprobs": 2})
    assert len(r.choices) == 2
    for choice in r.choices:
        assert_same_as_offline(choice.prompt_logprobs, offline_prompt_logprobs)
    plain = client.completions.create(model=model, prompt=PLP_PROMPT, max_tokens=1)
    assert getattr(plain.choices[0], "prompt_logprobs", None) is None


def test_prompt_logprobs_in_the_chat_response(client):
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"prompt_logprobs": 0})
    plp = r.prompt_logprobs
    assert plp[0] is None and len(plp) == r.usage.prompt_tokens
    assert all(len(e) == 1 and next(iter(e.values()))["logprob"] <= 0 for e in plp[1:])


@pytest.mark.parametrize("extra,message", [
    ({"prompt_logprobs": -1}, "SamplingParams.prompt_logprobs must be None or an integer in [0, 20], got -1"),
    ({"prompt_logprobs": 21}, "SamplingParams.prompt_logprobs must be None or an integer in [0, 20], got 21"),
    ({"prompt_logprobs": 1, "stream": True}, "`prompt_logprobs` are not available when `stream=True`"),
])
def test_bad_prompt_logprobs_is_a_400_naming_the_field(client, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=client.models.list().data[0].id, prompt=PLP_PROMPT, max_tokens=1,
                                  extra_body=extra)
    assert info.value.body["param"] == "prompt_logprobs" and info.value.body["message"] == message
