"""The engine on CUDA: compiled forward, Triton paged kernels, decode CUDA graphs (fp32 tiny model)."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import hf_greedy, prompts, run_engine, save_tiny_checkpoint


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_engine_matches_transformers(tmp_path, enforce_eager):
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = save_tiny_checkpoint("qwen2", tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=enforce_eager, dtype="float32",
                                        max_model_len=256, max_num_seqs=16, max_num_batched_tokens=256,
                                        gpu_memory_utilization=0.3)
    assert engine.runner.device.type == "cuda"
    assert bool(engine.runner.graphs) == (not enforce_eager)
    final = run_engine(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=16))
                                for i, p in enumerate(prompts(12, seed=11, max_len=80))])
    matches = sum(o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, 16) for o in final.values())
    assert matches == len(final), f"{matches}/{len(final)} sequences equal transformers' greedy tokens"
    assert engine.block_manager.num_used_blocks == 0
