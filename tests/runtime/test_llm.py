"""The offline API: `from fusecc import LLM, SamplingParams`."""

import subprocess
import sys

import pytest

from tests.runtime.hf_checkpoints import hf_greedy, prompts, save_tiny_checkpoint, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def test_import_fusecc_is_lazy():
    code = "import sys, fusecc; print(sorted(m for m in ('triton', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_default_model_runs_with_no_files():
    from fusecc import LLM, SamplingParams

    llm = LLM(enforce_eager=True, max_model_len=128)
    outs = llm.generate(["Hello", "a longer prompt, with more bytes"], SamplingParams(max_tokens=8, ignore_eos=True,
                                                                                     seed=1), use_tqdm=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
    assert outs[0].prompt == "Hello" and outs[0].prompt_token_ids == [256, *b"Hello"]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    m = outs[0].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    tok = llm.get_tokenizer()
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "<|user|>\nHi\n<|assistant|>\n"
    again = LLM(enforce_eager=True, max_model_len=128).generate("Hello", SamplingParams(max_tokens=8, ignore_eos=True,
                                                                                         seed=1), use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids  # seeded weights and sampling


def test_llm_on_a_checkpoint_matches_transformers(tmp_path):
    from fusecc import LLM, SamplingParams

    hf = save_tiny_checkpoint("qwen3", tmp_path)
    llm = LLM(str(tmp_path), enforce_eager=True, max_model_len=128)
    ps = prompts(4, seed=9)
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=n) for n in (4, 8, 12, 16)], use_tqdm=False)
    for o, n in zip(outs, (4, 8, 12, 16)):
        assert o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, n)
    with pytest.raises(ValueError, match="2 sampling_params for 4 prompts"):
        llm.generate(ps, [SamplingParams()] * 2)
