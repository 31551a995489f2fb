"""The engine on quantized tiny fp32 models, against transformers with the same dequantized weights:
greedy tokens must be identical (the CPU path computes x @ dequant(W).T in fp32, as transformers does).

On the fly (quantization="int8" | "int4") the test quantizes the float weights by the documented rules
itself; AWQ and GPTQ checkpoints are written by tests/quantization/quantized_checkpoints.py."""

import pytest
import torch

from fusecc.llm import LLM
from fusecc.quantization.linear import WeightOnlyLinear
from fusecc.runtime.sampling_params import SamplingParams
from tests.quantization.packers import rtn_dequantized
from tests.quantization.quantized_checkpoints import LINEARS, write_fp8_checkpoint, write_int4_checkpoint
from tests.runtime.hf_checkpoints import hf_greedy, prompts, save_tiny_checkpoint, single_thread  # noqa: F401

PROMPTS = prompts(3, seed=5, max_len=12)


def engine_greedy(model_dir, **kwargs) -> list[list[int]]:
    llm = LLM(str(model_dir), enforce_eager=True, dtype="float32", max_model_len=128, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, logprobs=0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm, outs


def check_against_oracle(oracle, llm, ours, outs) -> None:
    """Same greedy tokens, and each sampled token's logprob equal to the oracle's (fp32 rounding only)."""
    tokenizer = llm.get_tokenizer()
    assert ours == [hf_greedy(oracle, tokenizer(p)["input_ids"], 12) for p in PROMPTS]
    for prompt, out in zip(PROMPTS, outs):
        ids = tokenizer(prompt)["input_ids"]
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = oracle(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].double()
        expected = logits.log_softmax(-1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        got = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_on_the_fly_matches_transformers_with_dequantized_weights(tmp_path, method, single_thread):  # noqa: F811
    oracle = save_tiny_checkpoint("llama", tmp_path)
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if name.rpartition(".")[0].rpartition(".")[2] in LINEARS:
                param.copy_(rtn_dequantized(param, method))
    ours, llm, outs = engine_greedy(tmp_path, quantization=method)
    check_against_oracle(oracle, llm, ours, outs)
    layer = llm.engine.runner.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, WeightOnlyLinear)
    assert layer.mlp.down_proj.bits == (8 if method == "int8" else 4)


@pytest.mark.parametrize("method,arch", [("awq", "llama"), ("gptq", "llama"), ("gptq", "qwen2")])
def test_int4_checkpoint_matches_transformers_with_dequantized_weights(tmp_path, method, arch,
                                                                       single_thread):  # noqa: F811
    # qwen2: q/k/v biases stacked next to quantized weights, tied embeddings
    oracle = write_int4_checkpoint(tmp_path, method, arch=arch)
    ours, llm, outs = engine_greedy(tmp_path)  # detected from config.json
    check_against_oracle(oracle, llm, ours, outs)


@pytest.mark.parametrize("block", [True, False])
def test_fp8_checkpoint_loads_its_dequantized_weights(tmp_path, block):
    from fusecc.quantization.linear import Fp8Linear
    from fusecc.runtime import loader

    expected = write_fp8_checkpoint(tmp_path, block)
    model = loader.load_model(tmp_path, torch.float32, "cpu", 128)
    attn = model.model.layers[1].self_attn
    # q, k and v each have their own per-tensor scale: stacked, they become per-channel
    assert isinstance(attn.qkv_proj, Fp8Linear) and attn.qkv_proj.group_size == (128 if block else -1)
    stacked = torch.cat([expected[f"model.layers.1.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_proj.weight.float() * attn.qkv_proj.weight_scale, stacked)
    # the op quantizes activations per token: close to, not equal to, the float product
    x = torch.randn(5, stacked.shape[1])
    exact = x @ stacked.t()
    torch.testing.assert_close(attn.qkv_proj(x), exact, rtol=0.1, atol=0.1 * exact.abs().max().item())


def test_compiled_model_keeps_one_call_per_quantized_linear(tmp_path, monkeypatch, plain_cpu_user):
    """torch.compile(backend="fusecc") sees each quantized linear as one custom-op call (counted from the
    dump) and generates what the eager model generates."""
    import json

    save_tiny_checkpoint("llama", tmp_path / "model")
    eager, _, _ = engine_greedy(tmp_path / "model", quantization="int4")
    monkeypatch.setenv("FUSECC_DUMP_DIR", str(tmp_path / "dump"))
    llm = LLM(str(tmp_path / "model"), enforce_eager=False, dtype="float32", max_model_len=128, quantization="int4")
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == eager
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "dump").glob("*/report.json"))]
    assert reports
    layers = llm.engine.runner.model.config.num_hidden_layers
    for report in reports:
        assert report["op_histogram_final"].get("fusecc.weight_only_linear") == 4 * layers
        assert "aten.mm" not in report["op_histogram_final"] and "aten.addmm" not in report["op_histogram_final"]


def test_gguf_and_default_models_quantize_on_the_fly(tmp_path, single_thread):  # noqa: F811
    """The engine's other loaders: a GGUF file (dequantized at load, then quantized) and the default model."""
    from tests.runtime.gguf_files import tiny_hf_llama, write_llama_gguf
    from tests.runtime.hf_checkpoints import tiny_tokenizer

    oracle = tiny_hf_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", oracle)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if name.rpartition(".")[0].rpartition(".")[2] in LINEARS:
                param.copy_(rtn_dequantized(param, "int8"))
    ours, llm, outs = engine_greedy(path, quantization="int8", tokenizer=str(tmp_path / "tok"))
    check_against_oracle(oracle, llm, ours, outs)
    default = LLM(quantization="int4", enforce_eager=True, max_model_len=64)
    assert isinstance(default.engine.runner.model.model.layers[0].self_attn.o_proj, WeightOnlyLinear)
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized with awq"):
        LLM(quantization="awq", enforce_eager=True, max_model_len=64)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_gguf_q8_0_and_q4_0_load_quantized_and_exact(tmp_path, kind, single_thread):  # noqa: F811
    """A GGUF whose decoder linears are all Q8_0 (or Q4_0) keeps them quantized, and the model computes
    what transformers computes with gguf's own dequantization of the same blocks."""
    from gguf import GGMLQuantizationType, dequantize, quantize

    from tests.runtime.gguf_files import tiny_hf_llama, write_llama_gguf
    from tests.runtime.hf_checkpoints import tiny_tokenizer

    qtype = GGMLQuantizationType[kind]
    oracle = tiny_hf_llama()
    gguf_names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}
    path = write_llama_gguf(tmp_path / "q.gguf", oracle, quantize={
        f"blk.{i}.{g}.weight": qtype for i in range(2) for g in gguf_names.values()})
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    with torch.no_grad():  # blocks run along K, so llama.cpp's q/k row permutation does not change them
        for name, param in oracle.named_parameters():
            if name.rpartition(".")[0].rpartition(".")[2] in LINEARS:
                blocks = quantize(param.numpy(), qtype)
                param.copy_(torch.from_numpy(dequantize(blocks, qtype).reshape(param.shape)))
    ours, llm, outs = engine_greedy(path, tokenizer=str(tmp_path / "tok"))
    down = llm.engine.runner.model.model.layers[1].mlp.down_proj
    assert isinstance(down, WeightOnlyLinear)
    assert (down.bits, down.group_size) == ((8, 32) if kind == "Q8_0" else (4, 32))
    check_against_oracle(oracle, llm, ours, outs)
