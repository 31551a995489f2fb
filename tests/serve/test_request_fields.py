"""Request fields: vLLM's extras that would change the output are refused by name, other unknown
fields are accepted and logged once, non-text content is refused as such, 400s name the field the
client sent, chat needs a real chat template, and logprob bytes are the token's own."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from fusecc.serve.app import create_app
from tests.serve.fake_engine import FakeAsyncEngine, expected_text
from tests.serve.test_validation import _post

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,extra,param", [
    (CMPL, {"use_beam_search": True}, "use_beam_search"),
    (CMPL, {"guided_json": {"type": "object"}}, "guided_json"),
    (CHAT, {"guided_regex": "[a-z]+"}, "guided_regex"),
    (CHAT, {"guided_choice": ["yes", "no"]}, "guided_choice"),
    (CMPL, {"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    (CHAT, {"structured_outputs": {"json": {"type": "object"}}}, "structured_outputs"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format"),
    (CMPL, {"response_format": {"type": "json_object"}}, "response_format"),
    (CMPL, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"continue_final_message": True}, "continue_final_message"),
    (CHAT, {"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
    (CMPL, {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
])
def test_vllm_fields_that_would_change_the_output_are_refused_by_name(fake_server, path, extra, param):
    base = {"prompt": "x"} if path == CMPL else {"messages": USER}
    r = _post(fake_server, path, {**base, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param.split(".")[0] in r.json()["error"]["message"]


def test_implemented_vllm_fields_are_applied(fake_server):
    full = expected_text("ab", 10)
    stop = full[4:6]
    r = _post(fake_server, CMPL, {"prompt": "ab", "max_tokens": 10, "stop": [stop], "include_stop_str_in_output": True,
                                  "skip_special_tokens": True, "bad_words": None, "allowed_token_ids": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_unknown_fields_are_accepted_and_logged_once(fake_server):
    body = {"prompt": "x", "max_tokens": 1, "frobnicate_level": 3, "service_tier": "auto"}
    for _ in range(3):
        assert _post(fake_server, CMPL, body).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi", "frobnicate_note": 1}], "max_tokens": 1}
    assert _post(fake_server, CHAT, chat).status_code == 200
    deadline = time.monotonic() + 5
    while "messages[].frobnicate_note" not in fake_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = fake_server.log()
    assert log.count("frobnicate_level") == 1 and "service_tier" in log, log
    assert log.count("messages[].frobnicate_note") == 1


def test_non_text_content_is_refused_as_such(fake_server):
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    r = _post(fake_server, CHAT, {"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "image_url" in err["message"] and "text only" in err["message"]


@pytest.mark.parametrize("path,body,param,says", [
    (CMPL, {"prompt": ["ab"] * 5000}, "prompt", "5000 prompts"),  # the fake server queues 4096
    (CMPL, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens", "5000 digits"),
    (CHAT, {"messages": USER, "max_completion_tokens": 5000}, "max_completion_tokens", "max_completion_tokens=5000"),
])
def test_errors_name_the_field_the_client_sent(fake_server, path, body, param, says):
    r = _post(fake_server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and says in err["message"], err
    assert "max_tokens=" not in err["message"] or param == "max_tokens"


class _NoTemplateTokenizer:
    """An HF-like tokenizer whose checkpoint has no chat template."""

    chat_template = None
    vocab_size = 257
    eos_token_id = 256
    bos_token_id = None

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, chat_template=None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if chat_template is None:
            raise ValueError("no chat template")
        return ImmutableSandboxedEnvironment().from_string(chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)


def _engine_without_template() -> FakeAsyncEngine:
    engine = FakeAsyncEngine()
    engine.tokenizer = _NoTemplateTokenizer()
    return engine


def test_a_model_without_chat_template_refuses_chat_instead_of_inventing_one():
    with TestClient(create_app(_engine_without_template(), "m")) as tc:
        r = tc.post(CHAT, json={"messages": USER, "max_tokens": 2})
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"], r.text
        assert tc.post(CMPL, json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_chat_template_option_renders_chat():
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    with TestClient(create_app(_engine_without_template(), "m", chat_template=template)) as tc:
        r = tc.post(CHAT, json={"messages": USER, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected_text("<user>hi>", 3)
        r = tc.post(CHAT, json={"messages": USER, "max_tokens": 3, "add_generation_prompt": False})
        assert r.json()["choices"][0]["message"]["content"] == expected_text("<user>hi", 3)


def test_logprob_bytes_are_the_tokens_own_bytes():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.serve.logprobs import TokenNames

    names = TokenNames(ByteTokenizer())
    assert names.text(0xC3) == "\ufffd" and names.bytes(0xC3) == [0xC3]  # half of "é"
    assert names.bytes(ord("a")) == [ord("a")]

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["plain ascii words only"], vocab_size=300, min_frequency=1, show_progress=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    names = TokenNames(hf)
    ids = hf.encode("é", add_special_tokens=False)  # two byte tokens: no merge covers it
    assert [names.bytes(i) for i in ids] == [[0xC3], [0xA9]]
    assert all(names.text(i) == "\ufffd" for i in ids)
