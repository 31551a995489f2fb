"""The official openai client against fusecc-serve on the fake engine: the wire format is OpenAI's."""

from __future__ import annotations

import openai
import pytest

from tests.serve.fake_engine import FakeTokenizer, expected_text

MODEL = "fake-model"


@pytest.fixture(scope="module")
def client(fake_server):
    with openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", timeout=20, max_retries=0) as c:
        yield c


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1
    assert r.choices[0].text == expected_text("Hello", 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 7, 12)


def test_completion_token_id_prompt_and_batch(client):
    r = client.completions.create(model=MODEL, prompt=[[72, 105], [1, 2, 3]], max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # Choice index = prompt * n + output index.
    assert r.choices[0].text == expected_text([72, 105], 3, choice=0)
    assert r.choices[1].text == expected_text([72, 105], 3, choice=1)
    assert r.choices[3].text == expected_text([1, 2, 3], 3, choice=1)
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12


def test_completion_stop_string_and_sampling_fields_accepted(client):
    full = expected_text("ab", 10)
    stop = full[4:6]
    r = client.completions.create(model=MODEL, prompt="ab", max_tokens=10, stop=[stop], seed=3, top_p=0.9,
                                  presence_penalty=0.5, frequency_penalty=0.1, user="u1",
                                  extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                              "ignore_eos": True, "min_tokens": 2})
    assert r.choices[0].text == full[:4]
    assert r.choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="xy", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    text = expected_text("xy", 3)
    assert lp.tokens == list(text)
    assert lp.token_logprobs == [-0.25] * 3
    assert [len(t) for t in lp.top_logprobs] == [2, 2, 2]
    assert lp.text_offset == [0, 1, 2]


def test_completion_logprobs_text_offset_with_echo_and_streaming(client):
    # offsets index the returned text: after the echoed prompt, and continuing across stream chunks
    r = client.completions.create(model=MODEL, prompt="xyz", max_tokens=4, logprobs=1, echo=True)
    assert r.choices[0].text.startswith("xyz") and r.choices[0].logprobs.text_offset == [3, 4, 5, 6]
    stream = client.completions.create(model=MODEL, prompt="xyz", max_tokens=4, logprobs=1, stream=True)
    offsets = [o for c in stream if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 1, 2, 3]


def test_completion_stream_with_usage(client):
    stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected_text("Hello", 6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_without_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected_text("Hi", 3)


def _chat_prompt(messages) -> str:
    return FakeTokenizer().apply_chat_template(messages, add_generation_prompt=True)


def test_chat(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected_text(_chat_prompt(messages), 5)
    assert r.usage.prompt_tokens == len(_chat_prompt(messages).encode())


def test_chat_default_max_tokens_fills_context(fake_server, client):
    # Chat without max_tokens generates up to the context length (max_model_len=512 in the fake).
    messages = [{"role": "user", "content": "x"}]
    r = client.chat.completions.create(model=MODEL, messages=messages)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 512
    assert r.choices[0].finish_reason == "length"


def test_chat_content_parts_and_logprobs(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, logprobs=True,
                                       top_logprobs=3)
    assert r.choices[0].message.content == expected_text(_chat_prompt([{"role": "user", "content": "ab"}]), 3)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == list(r.choices[0].message.content)
    assert all(len(c.top_logprobs) == 3 for c in content)


def test_chat_stream_with_usage(client):
    messages = [{"role": "user", "content": "stream please"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, n=2)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    prompt = _chat_prompt(messages)
    assert texts == {0: expected_text(prompt, 8, 0), 1: expected_text(prompt, 8, 1)}
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model"
    assert e.value.body["code"] == "model_not_found"


def test_bad_request_is_400_naming_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-0.5)
    assert e.value.body["param"] == "temperature"
