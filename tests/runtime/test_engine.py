"""LLMEngine greedy outputs against transformers' `generate`, token for token (fp32 tiny models)."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import (WORDS, hf_greedy, prompts, run_engine, save_tiny_checkpoint,  # noqa: F401
                                          single_thread)

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "qwen3", "mistral"):
        path = tmp_path_factory.mktemp(arch)
        out[arch] = (path, save_tiny_checkpoint(arch, path))
    return out


def assert_matches_transformers(hf, final: dict, max_tokens: int = 24):
    assert final
    for rid, out in final.items():
        expected = hf_greedy(hf, out.prompt_token_ids, max_tokens)
        assert out.outputs[0].token_ids == expected, rid
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] == 2 else "length")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers_for_mixed_length_batch(checkpoints, arch):
    path, hf = checkpoints[arch]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=256)
    final = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts(8, seed=1, max_len=60))])
    assert_matches_transformers(hf, final)
    assert engine.stats().num_running == 0 and engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_pool_forces_preemption_and_chunked_prefill(checkpoints, arch):
    path, hf = checkpoints[arch]
    # 24 blocks x 4 tokens = 96 slots for 8 sequences of up to ~84 tokens; 16 tokens per step
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=96, block_size=4,
                                        num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
    ps = prompts(8, seed=2, min_len=10, max_len=60)
    final = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(ps)])
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert engine.scheduler.stats.num_prefill_tokens > sum(len(o.prompt_token_ids) for o in final.values())
    assert_matches_transformers(hf, final)
    assert engine.block_manager.num_used_blocks == 0


def test_shared_system_prompt_hits_the_prefix_cache(checkpoints):
    path, hf = checkpoints["qwen2"]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=256, block_size=8)
    system = " ".join(WORDS[i % len(WORDS)] for i in range(7, 7 + 37))
    users = prompts(6, seed=3, max_len=20)
    engine.add_request("first", f"{system} {users[0]}", GREEDY)
    outs = [engine.step()]  # the shared blocks are computed and cached by this step
    final = run_engine(engine, [(str(i), f"{system} {u}", GREEDY) for i, u in enumerate(users[1:], 1)])
    while engine.has_unfinished_requests():
        outs.append(engine.step())
    final.update({o.request_id: o for step in outs for o in step if o.finished})
    stats = engine.stats()
    assert stats.prefix_cache_hits >= 5 * 32  # 4 full blocks of the system prompt, 5 later requests
    assert all(final[str(i)].metrics.num_cached_tokens >= 32 for i in range(1, 6))
    assert_matches_transformers(hf, final)


@pytest.mark.filterwarnings("error:fusecc failed to compile")
def test_compiled_with_fusecc_backend_matches_transformers(checkpoints):
    path, hf = checkpoints["llama"]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=False, max_model_len=128,
                                        max_num_batched_tokens=32, max_num_seqs=4)
    assert engine.runner.forward is not engine.runner.model  # torch.compile(backend="fusecc")
    final = run_engine(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=12))
                                for i, p in enumerate(prompts(5, seed=4, max_len=40))])
    assert_matches_transformers(hf, final, max_tokens=12)


def test_stop_strings_n_logprobs_and_abort(checkpoints):
    path, hf = checkpoints["llama"]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=256)
    prompt = prompts(1, seed=5)[0]
    ids = engine.tokenizer.encode(prompt)
    expected = hf_greedy(hf, ids, 24)
    words = engine.tokenizer.decode(expected).split()
    stop = words[3]
    first_stop = words.index(stop)
    final = run_engine(engine, [
        ("stop", prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop])),
        ("n", prompt, SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=5, logprobs=2)),
        ("full", prompt, SamplingParams(temperature=0, max_tokens=24))])
    out = final["stop"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == expected[:first_stop + 1]
    assert stop not in out.text and out.text.split() == words[:first_stop]
    assert final["full"].outputs[0].text.split() == words
    n = final["n"].outputs
    assert [c.index for c in n] == [0, 1, 2] and all(len(c.token_ids) == 5 for c in n)
    assert len({tuple(c.token_ids) for c in n}) > 1
    for c in n:
        assert [next(iter(lp)) for lp in c.logprobs] == c.token_ids  # the sampled token first
        assert all(len(lp) in (2, 3) and all(v.logprob <= 0 for v in lp.values()) for lp in c.logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)))

    engine.add_request("a", prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request("a")
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert engine.stats().finished_by_reason["abort"] == 1


def test_bad_requests_raise_before_anything_is_queued(checkpoints):
    from fusecc.runtime.scheduler import SchedulerFullError

    path, _ = checkpoints["mistral"]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=64, max_waiting=2)
    bad = SamplingParams()
    bad.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("x", "w5", bad)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", list(range(3, 70)), SamplingParams())
    with pytest.raises(ValueError, match="n must be <= max_waiting"):  # could never fit: not "busy"
        engine.add_request("x", "w5", SamplingParams(n=3))
    with pytest.raises(ValueError, match="logit_bias token id 100000 is outside the vocabulary"):
        engine.add_request("x", "w5", SamplingParams(logit_bias={100000: 1.0}))
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting
    engine.add_request("a", "w5", SamplingParams(n=2))
    with pytest.raises(SchedulerFullError):
        engine.add_request("b", "w5", SamplingParams())
    assert [s.request_id for s in engine.scheduler.waiting] == ["a#0", "a#1"]
    with pytest.raises(TypeError, match="unknown engine argument .max_len.; valid engine arguments: dtype, device"):
        LLMEngine.from_engine_args(str(path), max_len=3)


def _run_steps(engine, requests, abort_after: dict | None = None):
    """All outputs of every step, in order; abort_after: request id -> step index to abort it after."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        steps.append(engine.step())
        for rid, at in (abort_after or {}).items():
            if at == len(steps):
                engine.abort_request(rid)
    return steps


def _final(steps) -> dict:
    return {o.request_id: o for outs in steps for o in outs if o.finished}


@pytest.mark.parametrize("model", ["llama", "default"])
def test_final_only_reports_once_with_the_last_cumulative_output(checkpoints, model):
    import dataclasses

    if model == "default":  # byte tokenizer, sampled bytes: incomplete UTF-8 everywhere
        make = lambda: LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=256)  # noqa: E731
        ps = ["héllo wörld ✓", "abc", "\u00e9" * 7, "plain text"]
    else:
        make = lambda: LLMEngine.from_engine_args(str(checkpoints[model][0]), enforce_eager=True,  # noqa: E731
                                                  max_model_len=256)
        ps = prompts(4, seed=9, max_len=30)
    requests = [("greedy", ps[0], SamplingParams(temperature=0, max_tokens=20)),
                ("sampled", ps[1], SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)),
                ("n", ps[2], SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=12, logprobs=1)),
                ("stop", ps[3], SamplingParams(temperature=1.0, seed=5, max_tokens=40, stop=[" ", "w1"])),
                ("aborted", ps[0], SamplingParams(temperature=1.0, seed=6, max_tokens=100, ignore_eos=True))]
    if model == "default":
        # token ids ending inside a UTF-8 character ("hi " + the first byte of a 3-byte one): the
        # output's first byte may complete it, which decoding everything at once got wrong
        requests.append(("ids_mid_char", [104, 105, 32, 0xE2],
                         SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)))
    cumulative = _run_steps(make(), requests, abort_after={"aborted": 5})
    final_only_requests = [(rid, p, dataclasses.replace(sp, output_kind="final_only")) for rid, p, sp in requests]
    engine = make()
    final_only = _run_steps(engine, final_only_requests, abort_after={"aborted": 5})
    assert all(o.finished for outs in final_only for o in outs)
    assert sorted(o.request_id for outs in final_only for o in outs) == sorted(rid for rid, _, _ in requests)
    expected, got = _final(cumulative), _final(final_only)
    for rid in expected:
        e, g = expected[rid], got[rid]
        assert [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in g.outputs] == \
            [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in e.outputs], rid
        assert g.metrics.finished_time is not None and g.prompt_token_ids == e.prompt_token_ids
    assert expected["aborted"].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0


def test_stats_peak_kv_usage_and_step_timings(checkpoints):
    path, _ = checkpoints["qwen3"]
    engine = LLMEngine.from_engine_args(str(path), enforce_eager=True, max_model_len=96, block_size=4,
                                        num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
    steps = _run_steps(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts(8, seed=2, min_len=10, max_len=60))])
    stats = engine.stats()
    t = stats.step_timings
    assert stats.num_kv_blocks == 24 and stats.kv_cache_usage == 0
    assert 0.9 <= stats.peak_kv_cache_usage <= 1.0  # the pool bound: preemptions happened
    assert stats.num_preemptions > 0
    assert t.prefill_steps > 0 and t.decode_steps > 0 and t.prefill_steps + t.decode_steps == len(steps)
    assert t.prefill_seconds >= t.prefill_wait_seconds >= 0 and t.decode_seconds >= t.decode_wait_seconds >= 0
    total = t.prefill_seconds + t.decode_seconds
    assert t.schedule_seconds + t.execute_seconds + t.postprocess_seconds <= total + 1e-6
    assert t.graph_replays == 0  # CPU
    engine.block_manager.reset_peak()
    assert engine.stats().peak_kv_cache_usage == 0


def test_text_prompt_with_an_added_token_past_the_model_vocabulary_is_refused(tmp_path):
    from tests.runtime.hf_checkpoints import tiny_tokenizer

    save_tiny_checkpoint("llama", tmp_path)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])  # id 128: the tiny model has 128 embedding rows
    tok.save_pretrained(tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=True, max_model_len=64)
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        engine.add_request("x", "w5 <extra>", SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
