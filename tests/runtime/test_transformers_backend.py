"""Transformers-backed models (fusecc/runtime/models/transformers_backend.py): decoders without a native
fusecc model run transformers' modeling code with fusecc's paged attention, token for token equal
to transformers' greedy `generate` (fp32, CPU), through chunked prefill, preemption and prefix-cache hits."""

import pytest
import torch

from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.models.llama import LlamaForCausalLM
from fusecc.runtime.models.transformers_backend import TransformersForCausalLM
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import (WORDS, hf_greedy, prompts, run_engine, save_tiny_checkpoint,  # noqa: F401
                                          single_thread, tiny_tokenizer)
from tests.runtime.transformers_families import FAMILIES, NATIVE_FAMILIES, save_family_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
SYSTEM = " ".join(WORDS[i] for i in range(10, 22))  # 12 tokens: 3 full blocks of 4, shared by every prompt


def tight_engine(path, **kwargs) -> LLMEngine:
    # 24 blocks x 4 tokens for 6 prompts of 22-52 tokens + 12 generated: preemption; 16 tokens a step:
    # chunked prefill; a shared 12-token prefix: prefix-cache hits
    return LLMEngine.from_engine_args(str(path), enforce_eager=True, device="cpu", dtype="float32", max_model_len=96,
                                      block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=4,
                                      **kwargs)


def check_engine_matches_transformers(engine: LLMEngine, hf) -> None:
    users = prompts(6, seed=2, min_len=10, max_len=40)
    final = run_engine(engine, [(str(i), f"{SYSTEM} {u}", GREEDY) for i, u in enumerate(users)])
    assert len(final) == len(users)
    for rid, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS), rid
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    # every prompt is longer than a step's token budget: each was prefilled in chunks
    assert min(len(o.prompt_token_ids) for o in final.values()) > engine.config.max_num_batched_tokens
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_family_without_native_model_matches_transformers(tmp_path, family):
    hf = save_family_checkpoint(family, tmp_path)
    engine = tight_engine(tmp_path)  # model_impl="auto": no native class, so transformers'
    assert isinstance(engine.runner.model, TransformersForCausalLM)
    check_engine_matches_transformers(engine, hf)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_moe_family_through_transformers_matches_transformers(tmp_path, family):
    # MoE models have native classes now; model_impl="transformers" still runs transformers' own experts
    hf = save_family_checkpoint(family, tmp_path)
    engine = tight_engine(tmp_path, model_impl="transformers")
    assert isinstance(engine.runner.model, TransformersForCausalLM)
    check_engine_matches_transformers(engine, hf)


def test_auto_keeps_the_native_model_and_transformers_runs_llama_too(tmp_path):
    hf = save_tiny_checkpoint("llama", tmp_path)
    assert type(tight_engine(tmp_path).runner.model) is LlamaForCausalLM
    engine = tight_engine(tmp_path, model_impl="transformers")
    assert isinstance(engine.runner.model, TransformersForCausalLM)
    assert engine.runner.model.kv_shape == (2, 16) and engine.runner.model.num_kv_layers == 2
    check_engine_matches_transformers(engine, hf)


@pytest.mark.parametrize("family,why", [
    ("falcon", r"^FalconForCausalLM cannot run with model_impl='transformers': its attention does not go through "
               r"transformers' AttentionInterface"),
    ("mamba", r"^MambaForCausalLM cannot run with model_impl='transformers': 0 of its 2 decoder layers attend"),
    ("t5", r"^T5ForConditionalGeneration is an encoder-decoder model"),
])
def test_architectures_that_cannot_run_this_way_are_refused_in_one_line(tmp_path, family, why):
    save_family_checkpoint(family, tmp_path)
    for impl in ("auto", "transformers"):
        with pytest.raises(ValueError, match=why) as info:
            tight_engine(tmp_path, model_impl=impl)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unsupported architecture"):
        tight_engine(tmp_path, model_impl="fusecc")


@pytest.mark.gpu
@pytest.mark.parametrize("family", [f for f in FAMILIES + NATIVE_FAMILIES if f not in ("falcon", "mamba", "t5")])
def test_cuda_bf16_next_token_logprobs_within_eager_bf16_error(tmp_path, family):
    # bf16 on the GPU, compiled with CUDA graphs: the engine's top-20 next-token logprobs after each
    # prompt differ from transformers' fp32 values by no more than transformers' own bf16 eager does
    # (times 3, plus a little: two correct bf16 programs round differently)
    hf = save_family_checkpoint(family, tmp_path).cuda()
    engine = LLMEngine.from_engine_args(str(tmp_path), model_impl="transformers", device="cuda", dtype="bfloat16",
                                        max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                                        gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
    final = run_engine(engine, [(str(i), p, params) for i, p in enumerate(prompts(6, seed=5, max_len=60))])
    hf_bf16 = save_family_checkpoint(family, tmp_path / "bf16").to("cuda", torch.bfloat16)
    for rid, out in final.items():
        ids = torch.tensor([out.prompt_token_ids], device="cuda")
        with torch.inference_mode():
            ref = hf(ids).logits[0, -1].double().log_softmax(-1)
            eager = hf_bf16(ids).logits[0, -1].double().log_softmax(-1)
        top = out.outputs[0].logprobs[0]  # {token id: Logprob} of the first generated position
        ids_top = torch.tensor(list(top), device="cuda")
        got = torch.tensor([lp.logprob for lp in top.values()], device="cuda", dtype=torch.float64)
        engine_err = (got - ref[ids_top]).abs().max().item()
        eager_err = (eager[ids_top] - ref[ids_top]).abs().max().item()
        assert engine_err <= 3 * eager_err + 2e-2, f"{family} {rid}: engine {engine_err:.4f}, eager bf16 {eager_err:.4f}"


@pytest.mark.slow
@pytest.mark.filterwarnings("error:fusecc failed to compile")
def test_compiled_transformers_model_matches_transformers(tmp_path):
    # the runner's torch.compile(backend="fusecc") path over transformers' modeling code (CPU: ATen codegen)
    hf = save_family_checkpoint("olmo2", tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=False, device="cpu", dtype="float32",
                                        max_model_len=64, max_num_seqs=1, max_num_batched_tokens=16)
    final = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts(3, seed=4, max_len=30))])
    for rid, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS), rid


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_cuda_sliding_window_softcap_family_matches_transformers(tmp_path, enforce_eager):
    # Gemma 2 on CUDA: the paged kernels with sliding window (its local layers) and soft-capping,
    # compiled with decode CUDA graphs unless enforce_eager
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = save_family_checkpoint("gemma2", tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), enforce_eager=enforce_eager, device="cuda", dtype="float32",
                                        max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
                                        gpu_memory_utilization=0.3)
    assert isinstance(engine.runner.model, TransformersForCausalLM)
    assert bool(engine.runner.graphs) == (not enforce_eager)
    final = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts(8, seed=11, max_len=60))])
    hf = hf.cpu()
    matches = sum(o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, MAX_TOKENS) for o in final.values())
    assert matches == len(final), f"{matches}/{len(final)} sequences equal transformers' greedy tokens"


def test_decode_step_of_windowed_softcapped_layers_traces_into_one_graph(tmp_path):
    # what a decode CUDA graph needs: no host sync or data-dependent shape anywhere in the decode forward
    # (Gemma 2: sliding window + attention soft-capping run windowed_softcap_decode)
    from fusecc.runtime.models.attention import AttentionMetadata

    save_family_checkpoint("gemma2", tmp_path)
    runner = tight_engine(tmp_path).runner
    md = AttentionMetadata(slot_mapping=torch.tensor([-1, -1]), block_tables=torch.zeros((2, 4), dtype=torch.int32),
                           context_lens=torch.tensor([3, 5], dtype=torch.int32),
                           cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32), max_seqlen_q=1,
                           decode_only=True, num_decodes=2)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(runner.model)(torch.tensor([3, 4]), torch.tensor([2, 4]),
                                                        runner.kv_caches, md)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def save_dynamic_rope_checkpoint(path):
    """A model whose transformers code breaks the graph: dynamic RoPE reads max(position_ids) on the
    host to decide whether to grow its tables."""
    import transformers

    config = transformers.Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model  # the oracle


def test_a_forward_with_graph_breaks_is_known_to_the_runner(tmp_path):
    # on CUDA such a forward gets no CUDA graphs (a capture cannot hold the host read); the runner
    # finds out from its own warm-up compilations
    save_dynamic_rope_checkpoint(tmp_path / "dynamic")
    save_family_checkpoint("olmo2", tmp_path / "plain")
    args = dict(model_impl="transformers", enforce_eager=False, device="cpu", dtype="float32", max_model_len=64,
                max_num_seqs=2, max_num_batched_tokens=32)
    assert any("Data-dependent branching" in r
               for r in LLMEngine.from_engine_args(str(tmp_path / "dynamic"), **args).runner.graph_breaks)
    assert LLMEngine.from_engine_args(str(tmp_path / "plain"), **args).runner.graph_breaks == []


@pytest.mark.gpu
def test_cuda_forward_with_graph_breaks_runs_without_cuda_graphs_and_matches_transformers(tmp_path):
    hf = save_dynamic_rope_checkpoint(tmp_path)
    engine = LLMEngine.from_engine_args(str(tmp_path), model_impl="transformers", device="cuda", dtype="float32",
                                        max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                                        gpu_memory_utilization=0.3)
    assert not engine.runner.cuda_graphs and not engine.runner.graphs
    final = run_engine(engine, [(str(i), p, GREEDY) for i, p in enumerate(prompts(3, seed=4, max_len=30))])
    for rid, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS), rid
