"""Native MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers: greedy generation through the
compiled engine token for token (fp32, CPU), and loading both checkpoint layouts of the expert weights."""

import pytest
import torch

from fusecc.runtime import loader
from fusecc.runtime.engine import LLMEngine
from fusecc.runtime.models.llama import LlamaMLP
from fusecc.runtime.models.moe import SparseMoeBlock
from fusecc.runtime.models.registry import MODELS, model_class
from fusecc.runtime.sampling_params import SamplingParams
from tests.runtime.hf_checkpoints import (VOCAB, hf_greedy, prompts, run_engine, single_thread,  # noqa: F401
                                          tiny_tokenizer)
from tests.runtime.test_models import prefill_metadata

pytestmark = pytest.mark.usefixtures("single_thread")
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
              initializer_range=0.1)


def moe_config(arch: str):
    import transformers as t

    if arch == "mixtral":  # 8 experts top-2, always renormalized
        return t.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # shared expert + sigmoid gate, q/k/v bias, layer 0 dense (mlp_only_layers), no renorm
        return t.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                shared_expert_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=False)
    if arch == "qwen3_moe":  # q/k norm, layer 0 dense by decoder_sparse_step=2, renormalized top-k
        return t.Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                decoder_sparse_step=2, norm_topk_prob=True)
    raise KeyError(arch)


def hf_moe_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():  # zero biases / unit norms / small router logits would hide mistakes (ties, no-ops)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        hf = hf_moe_model(arch)
        hf.save_pretrained(path)  # per-expert names, as on the hub
        tiny_tokenizer().save_pretrained(path)
        out[arch] = (path, hf)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.filterwarnings("error:fusecc failed to compile")
def test_compiled_engine_matches_transformers_generate(checkpoints, arch):
    path, hf = checkpoints[arch]
    engine = LLMEngine.from_engine_args(str(path), max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4)
    model = engine.runner.model
    assert type(model) is MODELS[hf.config.architectures[0]]  # model_impl="auto" picks the native class
    assert engine.runner.forward is not model  # compiled with the fusecc backend
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in model.model.layers]
    assert sparse == ([True, True] if arch == "mixtral" else [False, True])
    final = run_engine(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=12))
                                for i, p in enumerate(prompts(5, seed=4, max_len=40))])
    assert len(final) == 5
    for rid, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 12), rid


def check_prefill_logits(path, hf, device: str, tol: float) -> None:
    model = loader.load_model(path, torch.float32, device)
    lengths = [7, 19, 1]
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    kv_heads, head_dim = model.kv_shape
    caches = [tuple(torch.zeros(8, 8, kv_heads, head_dim, device=device) for _ in "kv") for _ in range(2)]
    md = prefill_metadata(lengths, 8, 8)
    md = type(md)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(md).items()})
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        logits = model.compute_logits(model(torch.cat(ids).to(device), positions.to(device), caches, md)).cpu()
        for p, start in zip(ids, md.cu_seqlens_q.tolist()):
            torch.testing.assert_close(logits[start:start + len(p)], hf(p[None]).logits[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(checkpoints, arch):
    # tighter than greedy tokens: a wrong routing normalisation or a missing shared-expert gate moves logits
    path, hf = checkpoints[arch]
    check_prefill_logits(path, hf, "cpu", 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_prefill_logits_match_transformers(checkpoints, arch):
    # CUDA: the fused MoE Triton kernels (fp32 dots in IEEE precision) and the paged attention kernels
    path, hf = checkpoints[arch]
    check_prefill_logits(path, hf, "cuda", 2e-3)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_expert_tensors_load_like_per_expert_ones(checkpoints, arch):
    # transformers' in-memory state dict holds the stacked 3-D experts.gate_up_proj / down_proj
    path, hf = checkpoints[arch]
    state = hf.state_dict()
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in state)
    fused = loader.build_model(model_class(hf.config), hf.config, torch.float32, "cpu", None, state.items())
    from_disk = loader.load_model(path, torch.float32, "cpu")
    for (name, a), (_, b) in zip(sorted(fused.state_dict().items()), sorted(from_disk.state_dict().items())):
        assert torch.equal(a, b), name
    layer = fused.model.layers[1].mlp
    torch.testing.assert_close(layer.experts.down_proj[3], hf.model.layers[1].mlp.experts.down_proj[3])


def test_missing_expert_tensor_is_a_clear_error(checkpoints):
    path, hf = checkpoints["qwen3_moe"]
    weights = [(n, t) for n, t in loader.iter_weights(path) if n != "model.layers.1.mlp.experts.5.up_proj.weight"]
    with pytest.raises(ValueError, match=r"15 of the 16 per-expert tensors of 'model.layers.1.mlp.experts.gate_up"):
        loader.build_model(model_class(hf.config), hf.config, torch.float32, "cpu", None, weights)


def test_dense_layers_of_qwen2_moe_are_llama_mlps(checkpoints):
    _, hf = checkpoints["qwen2_moe"]
    model = loader.build_model(model_class(hf.config), hf.config, torch.float32, "cpu", None, None)
    assert type(model.model.layers[0].mlp) is LlamaMLP and model.model.layers[0].mlp.intermediate == 96
    assert model.model.layers[1].mlp.shared_expert.intermediate == 48
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.slow
@pytest.mark.filterwarnings("error:fusecc failed to compile")
def test_transformers_backed_mixtral_runs_the_fused_op(checkpoints, tmp_path, monkeypatch):
    # model_impl="transformers": transformers' own Mixtral, compiled by the runner (frozen weights, dynamic
    # token count); the moe_matching pass turns its grouped_mm experts into fusecc::fused_moe
    import glob

    from fusecc.runtime.models.transformers_backend import TransformersForCausalLM

    monkeypatch.setenv("FUSECC_DUMP_DIR", str(tmp_path))
    path, hf = checkpoints["mixtral"]
    engine = LLMEngine.from_engine_args(str(path), model_impl="transformers", max_model_len=64,
                                        max_num_batched_tokens=32, max_num_seqs=2)
    assert isinstance(engine.runner.model, TransformersForCausalLM)
    final = run_engine(engine, [(str(i), p, SamplingParams(temperature=0, max_tokens=8))
                                for i, p in enumerate(prompts(2, seed=5, max_len=30))])
    for rid, out in final.items():
        assert out.outputs[0].token_ids == hf_greedy(hf, out.prompt_token_ids, 8), rid
    graphs = glob.glob(str(tmp_path / "*" / "*final.py"))
    assert graphs and all(open(g).read().count("torch.ops.fusecc.fused_moe.default(") == 2 for g in graphs)
