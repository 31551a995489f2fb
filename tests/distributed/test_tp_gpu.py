"""GPU checks of tensor parallelism (skipped on CPU machines):
- world size 1 over NCCL (the distributed code path: sharded modules, functional all-reduces in
  the compiled graph, decode CUDA graphs captured around them) generates what the plain engine
  generates, token for token in bf16 (a Llama, a Qwen2-MoE, an int4-quantized Llama);
- on a machine with 2 GPUs, tensor_parallel_size=2 (spawned workers, NCCL) equals 1 in fp32."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import prompts, run_engine, save_tiny_checkpoint

pytestmark = pytest.mark.gpu
ENGINE = dict(max_model_len=128, block_size=16, num_kv_blocks=64, max_num_batched_tokens=64, max_num_seqs=8)


def workload():
    greedy = SamplingParams(temperature=0, max_tokens=32)
    return [(str(i), p, greedy) for i, p in enumerate(prompts(8, seed=11, min_len=5, max_len=60))]


def tokens(final: dict) -> dict:
    return {rid: out.outputs[0].token_ids for rid, out in final.items()}


def save_model(kind: str, path) -> None:
    if kind == "qwen2_moe":  # experts split by intermediate units, a shared expert
        from tests.runtime.hf_checkpoints import tiny_tokenizer
        from tests.runtime.test_moe_models import hf_moe_model

        hf_moe_model("qwen2_moe").save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    elif kind == "wide_int4":  # quantized at load, int4 groups of 128
        from tests.distributed.test_parallel_model import save_wide_llama

        save_wide_llama(path)
    else:
        save_tiny_checkpoint("llama", path)


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe", "wide_int4"])
def test_world_size_one_over_nccl_matches_the_plain_engine_in_bf16(tmp_path, kind):
    from fusecc.distributed.executor import DriverExecutor, _free_port
    from fusecc.distributed.state import destroy_distributed, init_distributed
    from fusecc.distributed.worker import Worker
    from fusecc.runtime.config import EngineConfig

    save_model(kind, tmp_path)
    quantization = "int4" if kind == "wide_int4" else None
    plain = LLMEngine.from_engine_args(str(tmp_path), dtype="bfloat16", quantization=quantization, **ENGINE)
    expected = tokens(run_engine(plain, workload()))
    tokenizer, eos = plain.tokenizer, plain.eos_token_ids
    plain = None
    tp = init_distributed("nccl", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{_free_port()}", device="cuda")
    try:
        config = EngineConfig(dtype="bfloat16", quantization=quantization, **ENGINE)
        worker = Worker.from_checkpoint(str(tmp_path), config, torch.bfloat16, tp)
        engine = LLMEngine(None, tokenizer, worker.config, eos_token_ids=eos,
                           runner=DriverExecutor(worker, worker.runner.vocab_size))
        got = tokens(run_engine(engine, workload()))
        assert engine.runner.num_graph_replays > 0  # decode steps replayed graphs holding the NCCL calls
        engine.runner.shutdown()
    finally:
        destroy_distributed()
    assert got == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_in_fp32(tmp_path):
    save_tiny_checkpoint("qwen2", tmp_path)  # q/k/v bias and a tied (vocab-parallel) head
    expected = tokens(run_engine(LLMEngine.from_engine_args(str(tmp_path), dtype="float32", **ENGINE), workload()))
    engine = LLMEngine.from_engine_args(str(tmp_path), dtype="float32", tensor_parallel_size=2, **ENGINE)
    assert tokens(run_engine(engine, workload())) == expected
    engine.runner.shutdown()
