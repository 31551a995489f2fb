"""Async scheduling (fusecc/runtime/async_scheduling.py): a decode step launched before the previous
step's tokens are read back gives the same tokens, texts and finish reasons as the synchronous
engine, across stop tokens, stop strings, max_tokens, preemption, prefix hits and aborts, and
leaks no KV block. CPU, eager tiny Llama (the device copy of the pending tokens is an index_copy_
on CPU tensors here; the same code on CUDA copies device to device)."""

import pytest
import torch
import transformers

from fusecc.runtime import async_scheduling
from fusecc.runtime.byte_tokenizer import ByteTokenizer
from fusecc.runtime.config import EngineConfig
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.loader import build_model
from fusecc.runtime.models.llama import LlamaForCausalLM
from fusecc.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    hf = transformers.LlamaForCausalLM(cfg)
    return build_model(LlamaForCausalLM, cfg, torch.float32, "cpu", 512, hf.state_dict().items())


@pytest.fixture
def launches(monkeypatch):
    """How many steps were launched ahead (the async path really ran)."""
    count = [0]
    launch = async_scheduling.LaunchedStep.launch.__func__

    def counted(cls, output, token_ids):
        count[0] += 1
        return launch(cls, output, token_ids)

    monkeypatch.setattr(async_scheduling.LaunchedStep, "launch", classmethod(counted))
    return count


def prompts(n: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 250, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(3, 250, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def generate(model, async_scheduling: bool, requests: list, num_kv_blocks: int = 64, abort_at: dict | None = None):
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(
        max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, block_size=8, num_kv_blocks=num_kv_blocks,
        enforce_eager=True, device="cpu", async_scheduling=async_scheduling))
    for rid, (prompt, params) in enumerate(requests):
        engine.add_request(str(rid), prompt, params)
    finished, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                finished[out.request_id] = (c.token_ids, c.text, c.finish_reason, c.stop_reason)
        step += 1
        for rid in (abort_at or {}).get(step, []):
            engine.abort_request(rid)
        live = engine.scheduler.running + engine.scheduler.waiting
        engine.block_manager.check_invariants([s for s in live if s.block_table])
    engine.step()  # reads back a step launched for sequences that had finished meanwhile
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return finished, engine.stats()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def test_same_tokens_as_synchronous_steps_with_stops_and_lengths(model, launches):
    ps = prompts(6, seed=1)
    sync, _ = generate(model, False, [(p, greedy(12 + 9 * i)) for i, p in enumerate(ps)])
    # stop on tokens and on a text that the synchronous outputs hold, mid-generation
    stop_token = sync["2"][0][5]
    stop_text = sync["3"][1][8:10]
    requests = [(p, greedy(1 + 9 * i, stop_token_ids=[stop_token], stop=[stop_text])) for i, p in enumerate(ps)]
    base, _ = generate(model, False, requests)
    got, _ = generate(model, True, requests)
    assert got == base
    assert {r[2] for r in base.values()} == {"stop", "length"}  # both kinds of finish happened
    assert launches[0] > 20


def test_preemption_and_prefix_hits(model, launches):
    ps = prompts(6, seed=2, shared_prefix=17)
    requests = [(p, greedy(20 + 6 * i)) for i, p in enumerate(ps)]
    base, base_stats = generate(model, False, requests, num_kv_blocks=13)
    got, stats = generate(model, True, requests, num_kv_blocks=13)
    assert got == base
    assert base_stats.num_preemptions > 0 and stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert launches[0] > 20


def test_aborts_between_steps(model, launches):
    ps = prompts(4, seed=3)
    requests = [(p, greedy(40)) for p in ps]
    base, _ = generate(model, False, requests, abort_at={5: ["1"], 9: ["2"]})
    got, _ = generate(model, True, requests, abort_at={5: ["1"], 9: ["2"]})
    # an abort lands one step later in the async engine's outputs (its tokens are read a step late):
    # the requests that ran to the end are the same, the aborted ones stop early in both
    for rid in ("0", "3"):
        assert got[rid] == base[rid]
    for rid in ("1", "2"):
        assert got[rid][2] == base[rid][2] == "abort"
        assert got[rid][0] == base[rid][0][:len(got[rid][0])] or base[rid][0] == got[rid][0][:len(base[rid][0])]
    assert launches[0] > 0


def test_sampling_that_reads_outputs_runs_synchronously(model, launches):
    """Penalties and seeded sampling are not launched ahead: the same outputs, nothing launched."""
    ps = prompts(3, seed=4)
    requests = [(p, SamplingParams(temperature=0.8, seed=7 + i, max_tokens=15, repetition_penalty=1.2,
                                   ignore_eos=True)) for i, p in enumerate(ps)]
    base, _ = generate(model, False, requests)
    got, _ = generate(model, True, requests)
    assert got == base
    assert launches[0] == 0


def test_off_with_speculative_decoding(model):
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(
        max_model_len=96, max_num_seqs=4, num_kv_blocks=64, enforce_eager=True, device="cpu", async_scheduling=True,
        speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}))
    assert not engine._async_scheduling


@pytest.mark.gpu
def test_cuda_graph_decode_steps_launched_ahead_give_the_same_tokens(model, launches):
    """On CUDA the pending tokens go device to device into the decode graphs' static inputs, and the
    read-back is a pinned copy behind an event. fp32 (no TF32): the same tokens as synchronous steps."""
    ps = prompts(6, seed=5)
    requests = [(p, greedy(10 + 7 * i)) for i, p in enumerate(ps)]
    results = {}
    for mode in (False, True):
        engine = LLMEngine(model.cuda(), ByteTokenizer(), EngineConfig(
            max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, block_size=8, num_kv_blocks=64,
            device="cuda", async_scheduling=mode))
        for rid, (prompt, params) in enumerate(requests):
            engine.add_request(str(rid), prompt, params)
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].token_ids
        engine.step()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert engine.stats().step_timings.graph_replays > 0
        results[mode] = finished
    assert results[True] == results[False]
    assert launches[0] > 20
