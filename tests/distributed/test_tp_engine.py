"""LLMEngine with tensor_parallel_size=N (spawned gloo workers) against tensor_parallel_size=1,
token for token (fp32 tiny Llama, and a tiny Qwen2-MoE), through chunked prefill, preemption and prefix-cache hits;
and the faults: a killed or hung worker fails the engine's step with a clear error within 60 s,
with every worker stopped."""

import os
import signal
import time

import pytest

from fusecc.distributed.executor import WorkerFailedError
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import WORDS, prompts, run_engine, save_tiny_checkpoint, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
# 4 processes, or a compiled model in 2 processes, cost ~75 s each on the 2-core CI machine
opt_in = pytest.mark.skipif(not os.environ.get("FUSECC_SLOW_TESTS"),
                            reason="~75 s on 2 cores: run with FUSECC_SLOW_TESTS=1")

# 24 blocks x 4 tokens for 8 sequences of up to ~80 tokens (preemption); 16 tokens a step (chunks)
ENGINE = dict(enforce_eager=True, max_model_len=96, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16,
              max_num_seqs=6)


def workload():
    system = " ".join(WORDS[i] for i in range(10, 26))  # 16 tokens = 4 shared full blocks
    ps = [f"{system} {p}" if i % 2 else p for i, p in enumerate(prompts(8, seed=2, min_len=10, max_len=50))]
    reqs = [(str(i), p, SamplingParams(temperature=0, max_tokens=24)) for i, p in enumerate(ps)]
    return reqs + [("sampled", ps[1], SamplingParams(temperature=0.8, seed=7, max_tokens=16))]


def assert_same_outputs(reference, engine):
    expected = run_engine(reference, workload())
    got = run_engine(engine, workload())
    assert set(got) == set(expected)
    for rid, out in expected.items():
        assert got[rid].outputs[0].token_ids == out.outputs[0].token_ids, rid
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0, stats
    assert engine.scheduler.stats.num_prefill_tokens > sum(len(o.prompt_token_ids) for o in got.values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_checkpoint("llama", path)
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return LLMEngine.from_engine_args(checkpoint, **ENGINE)


@pytest.mark.parametrize("model, size, message", [
    ("checkpoint", 3, "num_attention_heads=4 is not divisible by tensor_parallel_size=3"),
    ("checkpoint", 8, "num_attention_heads=4 is not divisible by tensor_parallel_size=8"),
    ("int4", 2, r"o_proj has 32 input columns per rank, not a multiple of 128"),
    (None, 2, "needs a Hugging Face checkpoint folder"),
])
def test_what_cannot_be_sharded_is_refused_before_any_worker_starts(checkpoint, model, size, message):
    quantization = "int4" if model == "int4" else None
    with pytest.raises(ValueError, match=message):
        LLMEngine.from_engine_args(checkpoint if model else None, tensor_parallel_size=size, quantization=quantization,
                                   **ENGINE)


def assert_all_stopped(executor):
    for proc in executor.procs:
        assert proc.exitcode is not None, proc
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)  # reaped: no process left behind


def test_two_ranks_match_one_rank_then_a_killed_worker_fails_the_engine(checkpoint, reference):
    engine = LLMEngine.from_engine_args(checkpoint, tensor_parallel_size=2, **ENGINE)
    assert engine.config.num_kv_blocks == 24
    assert_same_outputs(reference, engine)

    for rid, prompt, params in workload()[:3]:
        engine.add_request(rid, prompt, params)
    engine.step()
    start = time.monotonic()
    os.kill(engine.runner.procs[1].pid, signal.SIGKILL)
    cause = r"during step: rank 1 \(pid \d+\) exited with code -9;.*all workers were stopped"
    with pytest.raises(WorkerFailedError, match=cause):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 60
    assert_all_stopped(engine.runner)
    with pytest.raises(WorkerFailedError, match="stopped"):  # later steps fail at once
        engine.runner.execute(None)


def test_two_ranks_match_one_rank_for_a_moe_model(tmp_path):
    # Qwen2-MoE: a dense layer, then experts split by intermediate units plus a shared expert
    from tests.runtime.hf_checkpoints import tiny_tokenizer
    from tests.runtime.test_moe_models import hf_moe_model

    hf_moe_model("qwen2_moe").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    reference = LLMEngine.from_engine_args(str(tmp_path), **ENGINE)
    engine = LLMEngine.from_engine_args(str(tmp_path), tensor_parallel_size=2, **ENGINE)
    assert_same_outputs(reference, engine)
    engine.runner.shutdown()
    assert_all_stopped(engine.runner)


def test_two_ranks_match_one_rank_quantized_at_load(tmp_path):
    # int4 groups of 128 split whole across the ranks; the other formats: tests/distributed/test_parallel_model.py
    from tests.distributed.test_parallel_model import save_wide_llama

    save_wide_llama(tmp_path)
    reference = LLMEngine.from_engine_args(str(tmp_path), quantization="int4", **ENGINE)
    engine = LLMEngine.from_engine_args(str(tmp_path), quantization="int4", tensor_parallel_size=2, **ENGINE)
    assert_same_outputs(reference, engine)
    engine.runner.shutdown()
    assert_all_stopped(engine.runner)


@pytest.mark.slow
@opt_in
def test_four_ranks_match_one_rank_with_replicated_kv_heads(checkpoint, reference):
    # 2 KV heads over 4 ranks: each KV head is held by 2 ranks
    engine = LLMEngine.from_engine_args(checkpoint, tensor_parallel_size=4, **ENGINE)
    assert_same_outputs(reference, engine)
    engine.runner.shutdown()
    assert_all_stopped(engine.runner)


@pytest.mark.slow
@opt_in
def test_compiled_two_ranks_match_and_a_hung_worker_fails_the_engine(checkpoint):
    compiled = dict(ENGINE, enforce_eager=False)
    reference = LLMEngine.from_engine_args(checkpoint, **compiled)
    engine = LLMEngine.from_engine_args(checkpoint, tensor_parallel_size=2, **compiled)
    assert_same_outputs(reference, engine)
    engine.runner.step_timeout_s = 5.0
    engine.add_request("hang", "w3 w4 w5", SamplingParams(temperature=0, max_tokens=8))
    os.kill(engine.runner.procs[1].pid, signal.SIGSTOP)  # hung: alive, never answers
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="did not answer the step within 5 s"):
        engine.step()
    assert time.monotonic() - start < 60
    assert_all_stopped(engine.runner)
