"""benchmarks/throughput.py's fusecc part on CPU with a tiny fp32 Llama: both pool sizings, the
demand formula, the step-timing summary. (The GPU run itself needs CUDA and transformers' baselines.)"""

import argparse

import pytest
import torch

from benchmarks.throughput import bench_fusecc_pools, make_prompts, workload_kv_blocks
from tests.runtime.hf_checkpoints import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def test_workload_kv_blocks_counts_the_last_computed_position():
    # 16 prompt + 1 output: the output is sampled, never computed -> 16 slots, 1 block
    assert workload_kv_blocks([[1] * 16], output=1, block_size=16) == 1
    assert workload_kv_blocks([[1] * 16], output=2, block_size=16) == 2
    assert workload_kv_blocks([[1] * 5, [2] * 40], output=8, block_size=16) == 1 + 3


def test_bench_fusecc_pools_on_cpu(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    prompts = [p[:int(torch.randint(8, 40, (1,)))] for p in make_prompts(config.vocab_size, 12)]
    args = argparse.Namespace(max_num_seqs=16, max_num_batched_tokens=512, gpu_memory_utilization=0.9,
                              enforce_eager=True, kv_pool_fractions=[0.85, 1.0], no_free_memory_pool=False,
                              profile_dir=str(tmp_path))
    output = 9
    entry = bench_fusecc_pools(hf, config, prompts, args, device="cpu", output=output,
                               warmup_prompts=[p[:10] for p in make_prompts(config.vocab_size, 2, seed=1)])
    demand = workload_kv_blocks(prompts, output, 16)
    assert entry["fusecc_workload_kv_demand_blocks"] == demand
    for run in ("workload_pool_85", "workload_pool_100", "free_memory_pool"):
        assert entry[f"fusecc_{run}_tokens"] == output * len(prompts), run
        timings = entry[f"fusecc_{run}_step_timings"]
        assert timings["prefill_steps"] >= 1 and timings["decode_steps"] >= output - 2
        assert timings["prefill_steps"] + timings["decode_steps"] == entry[f"fusecc_{run}_steps"]
        assert 0 <= timings["device_wait_seconds"] <= timings["step_wall_seconds"]
    # every request resident at once (one step admits them all): the free pool's peak is the demand
    assert entry["fusecc_free_memory_pool_peak_kv_usage"] * entry["fusecc_free_memory_pool_kv_blocks"] == demand
    assert entry["fusecc_free_memory_pool_preemptions"] == 0
    assert entry["fusecc_workload_pool_85_kv_blocks"] == max(4, -(-85 * demand // 100))
    assert entry["fusecc_workload_pool_85_peak_kv_usage"] >= 0.9 and entry["fusecc_workload_pool_85_preemptions"] > 0
    assert entry["fusecc_workload_pool_100_kv_blocks"] == demand
    assert entry["fusecc_workload_pool_100_peak_kv_usage"] == 1 and entry["fusecc_workload_pool_100_preemptions"] == 0
    main = entry["fusecc_main_run"]
    assert entry["fusecc_tok_s"] == entry[f"fusecc_{main}_tok_s"] == max(
        entry[f"fusecc_{run}_tok_s"] for run in ("workload_pool_85", "workload_pool_100", "free_memory_pool"))
    assert entry["fusecc_peak_kv_usage"] == entry[f"fusecc_{main}_peak_kv_usage"]
    assert main in entry["fusecc_note"]
    assert "fusecc_step_timings" in entry and sorted(p.name for p in tmp_path.iterdir()) == [
        "_free_memory_pool.txt", "_workload_pool_100.txt", "_workload_pool_85.txt"]
