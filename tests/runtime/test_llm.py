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


def test_a_rejected_prompt_takes_the_batch_out_again():
    # the valid prompts queued before the rejected one must not stay in the engine
    from fusecc import LLM, SamplingParams

    llm = LLM(enforce_eager=True, max_model_len=64, num_kv_blocks=16)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(["good prompt", "x" * 200], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert len(llm.generate("next", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)) == 1


def test_engine_reports_an_abort_pending_when_another_request_is_rejected():
    from fusecc import SamplingParams
    from fusecc.runtime.engine import LLMEngine

    engine = LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64, num_kv_blocks=16)
    engine.add_request("a", "hello", SamplingParams(max_tokens=8))
    engine.abort_request("a")
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("b", list(range(100)), SamplingParams(max_tokens=8))
    reported = [(o.request_id, o.outputs[0].finish_reason) for _ in range(3) for o in engine.step()]
    assert reported == [("a", "abort")] and not engine.has_unfinished_requests()


def _run_one(engine, prompt, params):
    engine.add_request("r", prompt, params)
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            if out.finished:
                return out.outputs[0], texts


def test_stop_strings_finish_as_stop_and_never_stream_a_retracted_tail():
    from fusecc import SamplingParams
    from fusecc.runtime.engine import LLMEngine

    engine = LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=128, num_kv_blocks=32)
    prompt, base = list(b"The quick brown fox"), dict(temperature=1.0, seed=5, ignore_eos=True)
    full, _ = _run_one(engine, prompt, SamplingParams(max_tokens=40, **base))
    # a stop string completed by the last allowed token: "stop", not "length"
    eighth, _ = _run_one(engine, prompt, SamplingParams(max_tokens=8, **base))
    last = eighth.text[-1]
    assert eighth.text.find(last) == len(eighth.text) - 1 and last.isprintable(), eighth.text  # seeded
    out, _ = _run_one(engine, prompt, SamplingParams(max_tokens=8, stop=[last], **base))
    assert (out.text, out.finish_reason, out.stop_reason) == (eighth.text[:-1], "stop", last)
    # a two-character stop string: streamed (cumulative) texts are prefixes of the final text
    start = next(i for i in range(1, len(full.text) - 1) if full.text[i:i + 2].isascii()
                 and full.text[i:i + 2].isprintable() and full.text.find(full.text[i:i + 2]) == i)
    stop = full.text[start:start + 2]
    out, texts = _run_one(engine, prompt, SamplingParams(max_tokens=40, stop=[stop], **base))
    assert out.text == full.text[:start] and out.finish_reason == "stop"
    assert all(out.text.startswith(t) for t in texts), (texts, out.text)


def test_min_tokens_holds_stop_strings_and_prompt_ids_must_be_integers():
    from fusecc import SamplingParams
    from fusecc.runtime.engine import LLMEngine

    engine = LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=128, num_kv_blocks=32)
    prompt, base = list(b"The quick brown fox"), dict(temperature=1.0, seed=5, ignore_eos=True, max_tokens=30)
    full, _ = _run_one(engine, prompt, SamplingParams(**base))
    stop = full.text[1]  # appears in the second character: a stop string before min_tokens
    out, _ = _run_one(engine, prompt, SamplingParams(stop=[stop], min_tokens=20, **base))
    # the early occurrence did not end it (before min_tokens), and the seeded tokens are the same
    assert len(out.token_ids) >= 20 and stop in out.text and full.text.startswith(out.text)
    for bad in ([1.7, 2], [True, 3]):
        with pytest.raises(ValueError, match="integers"):
            engine.add_request("bad", bad, SamplingParams())
    import numpy as np

    engine.add_request("np", [np.int64(65), np.int32(66)], SamplingParams(max_tokens=1))
    engine.add_request("iter", iter([67, 68]), SamplingParams(max_tokens=1))  # read once, not twice
    outs = {o.request_id: o for _ in range(5) for o in engine.step()}
    assert outs["np"].finished and outs["np"].prompt_token_ids == [65, 66]
    assert outs["iter"].finished and outs["iter"].prompt_token_ids == [67, 68]


def test_one_token_id_prompt_in_any_integer_container():
    import numpy as np
    import torch

    from fusecc import LLM, SamplingParams

    llm = LLM(enforce_eager=True, max_model_len=64)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    (expected,) = llm.generate([72, 105], params, use_tqdm=False)
    for prompt in ((72, 105), np.array([72, 105]), torch.tensor([72, 105]), [np.int64(72), np.int64(105)]):
        outs = llm.generate(prompt, params, use_tqdm=False)
        assert len(outs) == 1 and outs[0].outputs[0].token_ids == expected.outputs[0].token_ids, type(prompt)
