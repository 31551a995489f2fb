"""ModelRunner's decode-graph input path on CPU: the CUDA graphs replaced by eager stand-ins that
run the forward on the same static buffers, so the packing and padding of a bucket are checked
against transformers' greedy tokens without a GPU."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.model_runner import graph_buckets
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import (hf_greedy, prompts, run_engine, save_tiny_checkpoint,  # noqa: F401
                                          single_thread)

pytestmark = pytest.mark.usefixtures("single_thread")


class EagerGraph:
    """CapturedCall's replay() for bucket b: the forward on the static inputs, into one output buffer
    that every replay overwrites (as a CUDA graph's static output)."""

    def __init__(self, runner, b: int) -> None:
        self.runner, self.b = runner, b
        self.out = torch.full((b, runner.model.config.hidden_size), float("nan"))

    def replay(self) -> torch.Tensor:
        return self.out.copy_(self.runner.forward(*self.runner._graph_args(self.b)))


def fake_graphs(runner) -> None:
    n = runner.config.max_num_seqs
    buckets = graph_buckets(n)
    runner._static = runner._static_inputs()
    runner.graphs = {b: EagerGraph(runner, b) for b in buckets}
    runner._bucket_of = {size: next(b for b in buckets if b >= size) for size in range(1, n + 1)}


def test_decode_steps_through_padded_graph_buckets_match_transformers(tmp_path):
    hf = save_tiny_checkpoint("llama", tmp_path)
    # max_num_seqs 6: buckets 1, 2, 4, 6, so 3 and 5 running sequences are padded
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=True, max_model_len=128, max_num_seqs=6,
                                        max_num_batched_tokens=32, block_size=4, num_kv_blocks=40)
    fake_graphs(engine.runner)
    sizes = []
    execute = engine.runner.execute

    def spy(out, eos=()):
        if all(e.num_new_tokens == 1 for e in out.scheduled):
            sizes.append(len(out.scheduled))
        return execute(out, eos)

    engine.runner.execute = spy
    ps = prompts(9, seed=21, max_len=40)
    params = [SamplingParams(temperature=0, max_tokens=8 + 2 * i) for i in range(len(ps))]
    final = run_engine(engine, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(ps, params))])
    assert engine.runner.num_graph_replays == len(sizes) > 0
    assert {3, 5} & set(sizes), sizes  # some replays padded
    for i, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 8 + 2 * int(i)), i
    assert engine.stats().step_timings.graph_replays == engine.runner.num_graph_replays


def test_kv_pool_too_small_says_where_the_memory_went():
    # the numbers of a real failure: a 79 GiB H100 with 68 GiB held by another process and
    # gpu_memory_utilization=0.3: the line names each share and the remedies, no negative count
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.model_runner import GPU_RESERVE_BYTES, kv_pool_too_small

    config = EngineConfig(max_model_len=128, gpu_memory_utilization=0.3)
    total, peak, non_torch = int(79.18 * 2**30), 3 * 2**30, 69 * 2**30
    budget = total * 0.3 - peak - non_torch - GPU_RESERVE_BYTES  # as _profile_num_blocks computes it
    line = kv_pool_too_small(config, total=total, peak=peak, non_torch=non_torch, budget=budget,
                             per_block=2 * 2**20, blocks_needed=8)
    assert "\n" not in line
    for part in ("gpu_memory_utilization=0.3 allows 23.75 GiB", "GPU's 79.18 GiB", "take 3.00 GiB",
                 "other processes, the CUDA context) 69.00 GiB", "leaving 0.00 GiB: 0 KV blocks of 2.00 MiB",
                 "max_model_len=128 needs 8", "free the GPU memory other processes hold"):
        assert part in line, (part, line)
