"""The Python API as vLLM users know it: chat, prompt dicts, dict params, logprobs, new SamplingParams fields."""

import pytest

from fusecc import LLM, Logprob, SamplingParams
from tests.runtime.hf_checkpoints import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # on the CPU everywhere: the tests below pick text out of the CPU generator's seeded stream
    return LLM(enforce_eager=True, max_model_len=128, device="cpu")


def text_of(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**{**GREEDY, **params}), use_tqdm=False)[0].outputs[0]


def test_prompt_dicts_and_dict_params(llm):
    tok = llm.get_tokenizer()
    ref = text_of(llm, "Hello")
    outs = llm.generate([{"prompt": "Hello"}, {"prompt_token_ids": tok.encode("Hello")}], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [ref.token_ids] * 2
    assert outs[0].prompt == "Hello" and outs[1].prompt is None
    with pytest.raises(TypeError, match=r"unknown SamplingParams field\(s\) \['max_new_tokens'\]"):
        llm.generate("Hello", {"max_new_tokens": 3})
    with pytest.raises(ValueError, match="'prompt' \\(text\\) or 'prompt_token_ids'"):
        llm.generate({"text": "Hello"})
    llm.engine.add_request("d", {"prompt_token_ids": [256, 72]}, SamplingParams(max_tokens=2, ignore_eos=True))
    while llm.engine.has_unfinished_requests():
        outs = llm.engine.step()
    assert outs[0].prompt_token_ids == [256, 72] and len(outs[0].outputs[0].token_ids) == 2


def test_chat_uses_the_tokenizers_template_or_the_given_one(llm, tmp_path):
    msgs = [{"role": "user", "content": "Hi"}]
    (out,) = llm.chat(msgs, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    assert out.prompt == "<|user|>\nHi\n<|assistant|>\n" and out.prompt_token_ids == tok.encode(out.prompt)
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    two = llm.chat([msgs, msgs + [{"role": "assistant", "content": "Yo"}]], GREEDY, use_tqdm=False,
                   chat_template=template)
    assert [o.prompt for o in two] == ["[user] Hi\n", "[user] Hi\n[assistant] Yo\n"]
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert llm.chat(msgs, GREEDY, use_tqdm=False, chat_template=str(path))[0].prompt == "[user] Hi\n"


def test_chat_without_a_template_is_refused(tmp_path):
    from fusecc.runtime.chat import render_chat
    from tests.runtime.hf_checkpoints import tiny_tokenizer

    tok = tiny_tokenizer()
    assert getattr(tok, "chat_template", None) is None
    with pytest.raises(ValueError, match="the tokenizer has no chat template; pass chat_template="):
        render_chat(tok, [{"role": "user", "content": "w1"}])
    text = render_chat(tok, [{"role": "user", "content": "w1"}], chat_template="{{ messages[0].content }}!")
    assert text == "w1!"
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        render_chat(tok, [{"content": "w1"}], chat_template="x{{ 1 }}")


def test_logprobs_in_vllms_shape(llm):
    out = text_of(llm, "Hello", logprobs=3, max_tokens=6)
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == token and all(isinstance(v, Logprob) for v in entry.values())
        assert entry[token].rank == 1  # greedy: the sampled token is the most likely
        others = sorted((v.rank, v.logprob) for t, v in entry.items())
        assert [r for r, _ in others] == [1, 2, 3] and others == sorted(others, key=lambda x: -x[1])
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token], skip_special_tokens=False)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
    assert text_of(llm, "Hello").cumulative_logprob is None
    sampled = text_of(llm, "Hello", temperature=1.0, seed=3, logprobs=0, max_tokens=16)
    ranks = [e[t].rank for t, e in zip(sampled.token_ids, sampled.logprobs)]
    assert all(len(e) == 1 for e in sampled.logprobs) and max(ranks) > 1  # computed over the distribution


# the default model's greedy output is noise bytes; seeded sampling among a few letters gives text
LETTERS = dict(temperature=1.0, seed=0, allowed_token_ids=list(range(97, 100)), max_tokens=40)


def test_include_stop_str_in_output(llm):
    full = text_of(llm, "Hello", **LETTERS).text
    stop = full[5:7]
    cut = text_of(llm, "Hello", **LETTERS, stop=[stop])
    kept = text_of(llm, "Hello", **LETTERS, stop=[stop], include_stop_str_in_output=True)
    assert cut.stop_reason == kept.stop_reason == stop
    assert kept.text == cut.text + stop and full.startswith(kept.text) and stop not in cut.text


def test_allowed_token_ids_and_bad_words(llm):
    out = text_of(llm, "Hello", **LETTERS)
    assert set(out.token_ids) <= set(LETTERS["allowed_token_ids"]) and len(set(out.token_ids)) == 3
    banned = text_of(llm, "Hello", **LETTERS, bad_words=["ab", "c"])
    assert "ab" in out.text and "c" in out.text
    assert "ab" not in banned.text and "c" not in banned.text and "a" in banned.text and "b" in banned.text
    with pytest.raises(ValueError, match="allowed_token_ids token id 999 is outside the vocabulary"):
        text_of(llm, "Hello", allowed_token_ids=[999])


def test_truncate_prompt_tokens(llm):
    tok = llm.get_tokenizer()
    out = llm.generate("a longer prompt here", SamplingParams(**GREEDY, truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode("a longer prompt here")[-5:]
    assert out.outputs[0].token_ids == text_of(llm, {"prompt_token_ids": out.prompt_token_ids}).token_ids


def test_delta_outputs_carry_only_what_is_new(llm):
    engine = llm.engine
    for rid, kind in (("c", "cumulative"), ("d", "delta")):
        engine.add_request(rid, "Hello", SamplingParams(**{**LETTERS, "seed": 5, "max_tokens": 12}, n=2, logprobs=1,
                                                         output_kind=kind, stop=["ba"]))
    got = {"c": [], "d": []}
    while engine.has_unfinished_requests():
        for o in engine.step():
            got[o.request_id].append(o)
    final = got["c"][-1]
    for i in range(2):
        parts = [c for o in got["d"] for c in o.outputs if c.index == i]
        assert "".join(c.text for c in parts) == final.outputs[i].text
        assert [t for c in parts for t in c.token_ids] == final.outputs[i].token_ids
        assert [e for c in parts for e in c.logprobs] == final.outputs[i].logprobs
        assert parts[-1].finish_reason == final.outputs[i].finish_reason
        assert parts[-1].cumulative_logprob == final.outputs[i].cumulative_logprob
    assert all(len(c.token_ids) <= 1 for o in got["d"] for c in o.outputs)  # one token a step
    assert {c.finish_reason for c in final.outputs} == {"stop", "length"}  # seeds 5 and 6: both paths


def test_sampling_params_types_and_docstrings():
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature must be a number, got '0\.5'"):
        SamplingParams(temperature="0.5")
    with pytest.raises(ValueError, match=r"SamplingParams\.prompt_logprobs must be None or an integer"):
        SamplingParams(prompt_logprobs="1")
    for cls in (LLM, SamplingParams):
        assert "temperature" in SamplingParams.__doc__ and "engine_args" in LLM.__doc__, cls


def test_generation_config_gives_the_default_sampling_params(tmp_path):
    import json

    from tests.runtime.hf_checkpoints import save_tiny_checkpoint

    save_tiny_checkpoint("llama", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9,
                                                                 "max_new_tokens": 5, "do_sample": True}))
    llm = LLM(str(tmp_path), enforce_eager=True, max_model_len=64)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_p, p.max_tokens) == (0.6, 0.9, 5)
    assert len(llm.generate("w1 w2", use_tqdm=False)[0].outputs[0].token_ids) <= 5
    plain = LLM(str(tmp_path), enforce_eager=True, max_model_len=64, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    none = LLM(str(tmp_path), enforce_eager=True, max_model_len=64, generation_config="none")  # the name
    assert none.get_default_sampling_params() == SamplingParams()
