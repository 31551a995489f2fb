"""AsyncLLMEngine: streaming cumulative outputs, abort on consumer exit, validation before queueing."""

import asyncio

import pytest

from fusecc.runtime.async_engine import AsyncLLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import hf_greedy, save_tiny_checkpoint, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


async def wait_until(cond, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_streams_cumulative_outputs_matching_transformers(tmp_path):
    hf = save_tiny_checkpoint("llama", tmp_path)

    async def main():
        engine = AsyncLLMEngine.from_engine_args(str(tmp_path), enforce_eager=True, max_model_len=128)
        assert engine.max_model_len == 128 and engine.model_name == str(tmp_path)

        async def consume(rid, prompt):
            seen = []
            async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10), rid):
                seen.append(out)
            return seen

        streams = await asyncio.gather(consume("a", "w5 w6 w7"), consume("b", [1, 9, 8, 7, 6, 5, 4]))
        for seen in streams:
            assert seen[-1].finished and not any(o.finished for o in seen[:-1])
            ids = [o.outputs[0].token_ids for o in seen]
            assert all(ids[i] == ids[i + 1][:len(ids[i])] for i in range(len(ids) - 1))  # cumulative
            assert ids[-1] == hf_greedy(hf, seen[-1].prompt_token_ids, 10)
        assert engine.stats().generation_tokens_total == sum(len(s[-1].outputs[0].token_ids) for s in streams)
        await engine.shutdown()

    asyncio.run(main())


def test_consumer_break_and_cancel_abort_and_free_blocks():
    async def main():
        engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=512)
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        async for out in engine.generate("x" * 40, params, "brk"):
            if len(out.outputs[0].token_ids) >= 3:
                break
        await wait_until(lambda: engine.engine.block_manager.num_used_blocks == 0
                         and not engine.engine.has_unfinished_requests())

        async def consume():
            async for _ in engine.generate("y" * 40, params, "cancel"):
                pass
        task = asyncio.create_task(consume())
        await wait_until(lambda: engine.stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.engine.block_manager.num_used_blocks == 0)
        assert engine.stats().finished_by_reason["abort"] == 2

        gen = engine.generate("z", params, "explicit")
        first = await gen.__anext__()
        await engine.abort("explicit")
        rest = [o async for o in gen]
        assert (rest or [first])[-1].outputs[0].finish_reason == "abort"
        await engine.shutdown()

    asyncio.run(main())


def test_bad_params_and_full_queue_raise_before_queueing():
    async def main():
        engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64, max_waiting=1)
        bad = SamplingParams()
        bad.temperature = -1.0
        with pytest.raises(ValueError, match="temperature"):
            await engine.generate("hi", bad, "r").__anext__()
        with pytest.raises(ValueError, match="n must be <= max_waiting"):  # can never fit the queue
            await engine.generate("hi", SamplingParams(n=2), "r").__anext__()
        assert engine.stats().num_waiting == 0 and engine.stats().num_running == 0
        out = [o async for o in engine.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True), "r")]
        assert out[-1].finished and len(out[-1].outputs[0].token_ids) == 3
        await engine.shutdown()

    asyncio.run(main())


def test_shutdown_ends_open_streams_and_reused_ids_get_their_own_outputs():
    from fusecc.runtime.async_engine import EngineShutDown

    async def main():
        engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, num_kv_blocks=40, max_model_len=256)
        # an id reused as soon as its first consumer left: the new consumer sees only its own request
        first = engine.generate("abc", SamplingParams(max_tokens=50, ignore_eos=True), "same")
        await anext(first)
        await first.aclose()
        outs = [o async for o in engine.generate("abc", SamplingParams(max_tokens=5, ignore_eos=True), "same")]
        assert outs[-1].request_id == "same" and outs[-1].outputs[0].finish_reason == "length"
        assert len(outs[-1].outputs[0].token_ids) == 5
        # shutdown with a request in flight: its consumer is told, instead of waiting forever
        # (outputs the engine produced before the shutdown may come first: drained here)
        gen = engine.generate("abc", SamplingParams(max_tokens=240, ignore_eos=True), "x")
        await anext(gen)
        await engine.shutdown()
        with pytest.raises(EngineShutDown):
            while True:
                out = await asyncio.wait_for(anext(gen), 10)
                assert out.outputs[0].finish_reason is None, "the request finished before the shutdown"

    asyncio.run(main())


def test_a_failed_step_reaches_every_consumer_even_past_a_closed_loop():
    engine = AsyncLLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=128)
    # a consumer whose event loop was closed while its stream was open
    other = asyncio.new_event_loop()
    stale = engine.generate("abc", SamplingParams(max_tokens=100, ignore_eos=True), "stale")
    other.run_until_complete(stale.__anext__())
    other.close()

    def failing_step():
        raise RuntimeError("CUDA error: device-side assert triggered")

    async def main():
        engine.engine.step = failing_step
        victim = engine.generate("xyz", SamplingParams(max_tokens=100, ignore_eos=True), "victim")
        with pytest.raises(RuntimeError, match="engine thread failed"):
            await asyncio.wait_for(anext(victim), 10)

    asyncio.run(main())


def test_the_engine_thread_binds_the_models_device(monkeypatch):
    # the current CUDA device is per thread and Triton launches on it: the thread that steps the
    # engine makes the model's device current (a model on cuda:1 must not run its kernels on cuda:0)
    import threading

    import torch

    import fusecc.runtime.async_engine as async_engine
    from fusecc.runtime import model_runner
    from fusecc.runtime.engine import LLMEngine

    set_calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: set_calls.append(torch.device(device)))
    model_runner.bind_device(torch.device("cuda", 1))
    model_runner.bind_device(torch.device("cpu"))
    assert set_calls == [torch.device("cuda", 1)]

    bound = []
    monkeypatch.setattr(async_engine, "bind_device", lambda device: bound.append((threading.current_thread().name, device)))
    engine = AsyncLLMEngine(LLMEngine.from_engine_args(None, enforce_eager=True, max_model_len=64, max_num_seqs=2))

    async def main():
        try:
            await wait_until(lambda: bool(bound))
        finally:
            await engine.shutdown()

    asyncio.run(main())
    assert bound == [("fusecc-engine", engine.engine.runner.device)]
