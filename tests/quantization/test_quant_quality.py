"""Perplexity of the quantized engine (int8, int4, fp8 W8A8, fp8 KV cache) on a tiny fp32 Llama:
finite, equal to an independent oracle, and close to the unquantized engine's.

The oracle is transformers eager with the format's rounding applied by this file's own torch code:
weights replaced by their round trip (tests/quantization/packers.rtn_dequantized for
int8/int4; per-channel e4m3 here for fp8), fp8 activations rounded per token by a forward pre-hook,
and the fp8 KV cache as an attention function that rounds K and V (after RoPE, as the cache stores
them) through e4m3 with the layer's scales before SDPA. Engine and oracle compute the same values
in fp32, so their perplexities agree to fp32 rounding (ORACLE_RTOL).

"Close to unquantized" is a bound derived from the format, not fitted: each quantized tensor is off
by at most EPSILON[format] of its largest magnitude (half a step: int8 amax/254, int4 range/30 <=
amax/15, e4m3 2^-4 relative); to first order the final hidden state moves by at most that much per
quantized operation on the path (SERIES: per layer qkv -> o and gate_up -> down, doubled for fp8
activations; K and V for the cache), the logits by that fraction of their largest magnitude (the
unquantized run's), and |log ppl' - log ppl| <= 2 * max |logit change| (one log-softmax). A
quantizer with a wrong scale or zero point breaks it by orders of magnitude.
"""

import math

import pytest
import torch

from fusecc.eval.perplexity import engine_perplexity, transformers_perplexity
from fusecc.llm import LLM
from tests.quantization.quantized_checkpoints import LINEARS
from tests.quantization.packers import rtn_dequantized
from tests.runtime.hf_checkpoints import VOCAB, save_tiny_checkpoint, single_thread  # noqa: F401

FP8 = torch.float8_e4m3fn
ORACLE_RTOL = 1e-6  # measured agreement: 3e-8 to 7e-8
EPSILON = {"int8": 1 / 254, "int4": 1 / 15, "fp8": 2 ** -4, "fp8_kv": 2 ** -4}
LAYERS = 2  # tiny_config


def series(method: str) -> int:
    return {"int8": 4, "int4": 4, "fp8": 8, "fp8_kv": 2}[method] * LAYERS


def token_windows(n: int = 4, length: int = 48) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (n, length), generator=g).tolist()


def e4m3_round_trip(x: torch.Tensor, scale) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(FP8).to(x.dtype) * scale


def fp8_per_token(module, args):
    x = args[0]
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
    return (e4m3_round_trip(x, scale),)


def quantize_oracle(oracle, method: str, kv_scales=None):
    """Apply `method`'s rounding to the transformers model in place (see the module docstring)."""
    linears = [m for n, m in oracle.named_modules() if n.rpartition(".")[2] in LINEARS]
    with torch.no_grad():
        for lin in linears:
            if method in ("int8", "int4"):
                lin.weight.copy_(rtn_dequantized(lin.weight, method))
            elif method == "fp8":
                lin.weight.copy_(e4m3_round_trip(lin.weight, lin.weight.abs().amax(1, keepdim=True) / 448))
                lin.register_forward_pre_hook(fp8_per_token)
    if method == "fp8_kv":
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def fp8_kv_attention(module, query, key, value, *args, **kwargs):
            ks, vs = (kv_scales or {}).get(module.layer_idx, (1.0, 1.0))
            return sdpa_attention_forward(module, query, e4m3_round_trip(key, ks), e4m3_round_trip(value, vs),
                                          *args, **kwargs)

        AttentionInterface.register("fp8_kv_reference", fp8_kv_attention)
        oracle.set_attn_implementation("fp8_kv_reference")
    return oracle


def engine_ppl(path, windows, **kwargs) -> float:
    llm = LLM(str(path), enforce_eager=True, dtype="float32", device="cpu", max_model_len=64, **kwargs)
    return engine_perplexity(llm, windows).perplexity, llm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    oracle = save_tiny_checkpoint("llama", path)
    windows = token_windows()
    with torch.no_grad():
        max_logit = max(oracle(torch.tensor([w])).logits.abs().max().item() for w in windows)
    return path, windows, engine_ppl(path, windows)[0], max_logit


@pytest.mark.parametrize("method", ["int8", "int4", "fp8", "fp8_kv"])
def test_quantized_perplexity_is_close(tiny, method, single_thread):  # noqa: F811
    path, windows, reference, max_logit = tiny
    kwargs = {"kv_cache_dtype": "fp8"} if method == "fp8_kv" else {"quantization": method}
    ours, _ = engine_ppl(path, windows, **kwargs)
    oracle = quantize_oracle(save_tiny_checkpoint("llama", path.parent / f"oracle_{method}"), method)
    expected = transformers_perplexity(oracle, windows).perplexity
    assert math.isfinite(ours)
    assert ours == pytest.approx(expected, rel=ORACLE_RTOL)
    bound = 2 * series(method) * EPSILON[method] * max_logit
    assert abs(math.log(ours / reference)) <= bound, (ours, reference, bound)
    assert ours != reference  # the format's rounding did happen


def test_fp8_kv_cache_uses_checkpoint_scales(tmp_path, single_thread):  # noqa: F811
    """model.layers.N.self_attn.k_scale / v_scale (vLLM's names) in the safetensors file set the
    layer's scales; the engine then matches the oracle rounding with those scales."""
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    # small scales: values up to ~0.2 * 448 = 90 fit, and the rounding differs from scale 1's
    scales = {i: (0.002 * (i + 1), 0.003 * (i + 2)) for i in range(LAYERS)}
    for i, (ks, vs) in scales.items():
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    windows = token_windows(2)
    ours, llm = engine_ppl(tmp_path, windows, kv_cache_dtype="fp8_e4m3")
    layers = llm.engine.runner.model.model.layers
    assert [(layer.self_attn.attn.k_scale, layer.self_attn.attn.v_scale) for layer in layers] == \
        [(pytest.approx(ks), pytest.approx(vs)) for ks, vs in scales.values()]
    oracle = quantize_oracle(save_tiny_checkpoint("llama", tmp_path / "oracle"), "fp8_kv", scales)
    assert ours == pytest.approx(transformers_perplexity(oracle, windows).perplexity, rel=ORACLE_RTOL)
    # the same checkpoint with a model-dtype cache ignores the scales
    auto, _ = engine_ppl(tmp_path, windows)
    plain = transformers_perplexity(save_tiny_checkpoint("llama", tmp_path / "plain"), windows).perplexity
    assert auto == pytest.approx(plain, rel=ORACLE_RTOL)


def test_fp8_kv_cache_through_transformers_backend(tiny, single_thread):  # noqa: F811
    path, windows, _, _ = tiny
    ours, llm = engine_ppl(path, windows, kv_cache_dtype="fp8", model_impl="transformers")
    assert llm.engine.runner.kv_caches[0][0].dtype == FP8
    oracle = quantize_oracle(save_tiny_checkpoint("llama", path.parent / "oracle_hf_kv"), "fp8_kv")
    assert ours == pytest.approx(transformers_perplexity(oracle, windows).perplexity, rel=ORACLE_RTOL)


@pytest.mark.gpu
def test_gpu_fp8_kv_cache_engine(tmp_path):
    """bf16 on the GPU, compiled with CUDA graphs: the fp8 pool holds twice the blocks of the bf16
    one in the same memory, and its perplexity matches the bf16 oracle with e4m3 K/V within the bf16
    tolerance of the perplexity acceptance (2%), and the bf16 cache within the format's bound."""
    import gc

    from transformers import AutoModelForCausalLM

    save_tiny_checkpoint("llama", tmp_path)
    windows = token_windows()
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(str(tmp_path), dtype="bfloat16", device="cuda", max_model_len=64, kv_cache_dtype=kv,
                  gpu_memory_utilization=0.3)
        runner = llm.engine.runner
        runs[kv] = (engine_perplexity(llm, windows).perplexity, runner.config.num_kv_blocks, runner.kv_dtype)
        out = llm.generate([{"prompt_token_ids": windows[0][:8]}], {"max_tokens": 8, "temperature": 0.0,
                                                                       "ignore_eos": True}, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 8 and runner.num_graph_replays > 0  # decode CUDA graphs
        llm = runner = None
        gc.collect()
        torch.cuda.empty_cache()
    (ref, ref_blocks, ref_dtype), (ours, blocks, dtype) = runs["auto"], runs["fp8"]
    assert dtype == FP8 and ref_dtype == torch.bfloat16
    assert blocks == pytest.approx(2 * ref_blocks, rel=0.05)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    expected = transformers_perplexity(quantize_oracle(oracle, "fp8_kv"), windows).perplexity
    assert ours == pytest.approx(expected, rel=0.02)
    with torch.no_grad():
        max_logit = max(oracle(torch.tensor([w], device="cuda")).logits.abs().max().item() for w in windows)
    assert abs(math.log(ours / ref)) <= 2 * series("fp8_kv") * EPSILON["fp8_kv"] * max_logit


def test_fp8_kv_cache_needs_fp8_gpu(monkeypatch):
    """Refused at start-up on a GPU below compute capability 8.9, naming the GPU's."""
    from fusecc.runtime.models.attention import kv_cache_torch_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs .* 8\.9\+.*A100 has 8\.0"):
        kv_cache_torch_dtype("fp8", torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_torch_dtype("fp8_e4m3", torch.bfloat16, torch.device("cuda")) == FP8
    assert kv_cache_torch_dtype("auto", torch.bfloat16, torch.device("cuda")) == torch.bfloat16
