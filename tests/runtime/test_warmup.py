"""Start-up compiles every graph a step can hit: a varied workload afterwards compiles nothing."""

import pytest
import torch
import triton

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_a_varied_workload_after_warmup_compiles_nothing():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = LLMEngine.from_engine_args(None, enforce_eager=False, max_model_len=128, block_size=8,
                                        max_num_batched_tokens=48, max_num_seqs=4, num_kv_blocks=40)
    after_warmup = compiled_graphs()
    # on CPU sizes 0/1 are not specialised (backed_size_oblivious): one graph for decode-only
    # steps, one for mixed steps, whatever the batch size, prompt length or block-table width
    assert after_warmup == 2 if engine.runner.size_oblivious else after_warmup > 0
    # the warm-up allocated no blocks, wrote no KV and drew nothing from the sampler's generator
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(not (k != 0).any() for k, _ in engine.runner.kv_caches)
    assert engine.runner.sampler._generators == {}
    workload = [
        [[65]],                                   # a 1-token prompt, alone: 1 token, 1 sequence, decodes of 1
        [list(range(60, 90))],                    # one long prompt (chunked: budget 48 with decodes)
        [[66, 67], [68] * 3],                     # two short prompts: decode batches of 2
        [[70] * 5, list(range(70, 120)), [71]],   # short + long (2 chunks) + 1-token: decode batches of 1..3
        [list(range(60, 90)) + [5]],              # prefix-cache hit: context wider than the new tokens
        [[73] * 2, [74] * 7, [75] * 19, [76]],    # four at once: decode batches of 4
        [[60 + i % 50 for i in range(120)]],      # block tables 16 wide, chunks of 48 and 24 tokens
    ]
    # a recompile raises (a graph count alone would miss a shape that ran eagerly past Dynamo's limit);
    # on the GPU no Triton kernel compiles either (a size newly divisible by 16 would, where
    # specialised: kernels/launch.py)
    triton_compiles = []
    listener = lambda *, src, cache_hit, **_: triton_compiles.append(getattr(src, "name", "?"))  # noqa: E731

    with torch._dynamo.config.patch(error_on_recompile=True), triton.knobs.compilation.scope():
        triton.knobs.compilation.listener = listener
        for i, prompts in enumerate(workload):
            for j, p in enumerate(prompts):
                engine.add_request(f"{i}.{j}", p, SamplingParams(temperature=0, max_tokens=6 + 2 * j, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
        engine.add_request("s", [72] * 9, SamplingParams(temperature=1.0, seed=1, max_tokens=4, n=3))
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.stats().step_timings.decode_steps > 0 and engine.block_manager.stats.prefix_cache_hits > 0
    assert compiled_graphs() == after_warmup, "a step compiled a graph the warm-up did not"
    assert triton_compiles == [], f"Triton kernels compiled after the warm-up: {sorted(set(triton_compiles))}"


def test_warmup_keeps_seeded_and_unseeded_sampling():
    # seeded and unseeded sampling give what an engine without the warm-up (eager) gives
    def run(enforce_eager):
        engine = LLMEngine.from_engine_args(None, enforce_eager=enforce_eager, max_model_len=64, seed=3)
        for rid, seed in (("a", 11), ("b", None)):
            engine.add_request(rid, "Hi", SamplingParams(temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True))
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return outs

    assert run(False) == run(True)


@pytest.mark.parametrize("budget,max_len", [(8192, 2048), (512, 4096), (64, 64), (20000, 32768)])
def test_warmup_prefills_reach_every_attention_tuning_class_a_step_can(budget, max_len):
    # a tuning class first met by a request costs it an autotuning run (seconds on a GPU)
    from fusecc.kernels.attention_tile import tuning_class
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.warmup import warmup_shapes

    config = EngineConfig(max_num_batched_tokens=budget, max_model_len=max_len, max_num_seqs=32)
    shapes = warmup_shapes(config, -(-max_len // config.block_size))
    longest = min(budget, max_len - 1)  # most new tokens one sequence can bring to a step
    reachable = {tuning_class(n) for n in range(1, longest + 1)}
    assert {tuning_class(max(q)) for q, _ in shapes} == reachable
    assert all(sum(q) <= budget and max(c) <= max_len for q, c in shapes)
