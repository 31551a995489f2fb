"""Speculative decoding on CUDA (fp32 tiny model): compiled forward, verification CUDA graphs,
compiled draft forwards; greedy outputs identical to the same engine without speculation."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from fusecc.runtime.spec_decode import speculator
from tests.runtime.hf_checkpoints import prompts, run_engine, save_tiny_checkpoint


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ngram", "layer_skip", "self_draft", "int4_self_draft"])
def test_cuda_speculation_is_greedy_identical_and_replays_verification_graphs(tmp_path, method, monkeypatch):
    monkeypatch.setattr(speculator, "PAUSE_STEPS", 0)
    torch.backends.cuda.matmul.allow_tf32 = False
    save_tiny_checkpoint("llama", tmp_path)
    spec = {"ngram": {"method": "ngram", "num_speculative_tokens": 4},
            "layer_skip": {"method": "layer_skip", "num_layers": 1, "num_speculative_tokens": 3},
            "self_draft": {"model": str(tmp_path), "num_speculative_tokens": 3},
            "int4_self_draft": {"quantization": "int4", "num_speculative_tokens": 3}}[method]
    kw = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, num_kv_blocks=128)
    requests = [(str(i), p + " " + p, SamplingParams(temperature=0, max_tokens=24))
                for i, p in enumerate(prompts(6, seed=12, max_len=40))]
    base = run_engine(LLMEngine.from_engine_args(str(tmp_path), **kw), requests)
    engine = LLMEngine.from_engine_args(str(tmp_path), speculative_config=spec, **kw)
    got = run_engine(engine, requests)
    for rid in base:
        assert got[rid].outputs[0].token_ids == base[rid].outputs[0].token_ids, rid
    assert engine.runner.verify_graphs.num_replays > 0
    if method != "ngram":  # the draft's decode-shaped steps replay their graphs too
        assert engine.speculator.proposer.graphs.num_replays > 0
    assert engine.stats().spec_decode.num_accepted_tokens > 0
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.gpu
def test_cuda_pool_sizing_leaves_room_for_the_draft(tmp_path):
    # no num_kv_blocks: the target sizes its pool from gpu_memory_utilization, counting the draft's
    # weights and its equally long pool, so all of it fits the fraction asked for
    save_tiny_checkpoint("llama", tmp_path)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = LLMEngine.from_engine_args(str(tmp_path), dtype="bfloat16", max_model_len=256, max_num_seqs=8,
                                        gpu_memory_utilization=0.3,
                                        speculative_config={"quantization": "int4", "num_speculative_tokens": 3})
    draft_pool = sum(k.numel() * k.element_size() * 2 for k, _ in engine.speculator.proposer.kv_caches)
    target_pool = engine.runner.kv_cache_bytes
    assert draft_pool == target_pool  # the int4 copy has the target's layers and KV shapes
    _, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_allocated() - before
    assert used <= 0.3 * total, (used / 2**30, total / 2**30)
    assert used >= 0.2 * total  # and the pool still takes most of it
