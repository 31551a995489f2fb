"""Quantized MoE experts (fusecc/kernels/moe_expert_weights.py, fusecc/quantization/experts.py).

Kernels: the grouped-GEMM and decode (GEMV) paths through the interpreter, int8 / int4 / fp8 experts, fp32
and fp16 activations, against a float64 loop over (token, chosen expert) with the dequantized weights
(fp8: W8A8, each projection's input row rounded to e4m3 with its own scale first). Engine: tiny MoE
models quantized at load (quantization="int8" | "int4") generate the same greedy tokens as transformers
holding the round-to-nearest dequantized weights; fp8 experts hold e4m3 weights within one e4m3 step
of the float ones. GPU: real expert shapes in bf16."""

import pytest
import torch
import torch.nn.functional as F

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.fused_moe_quantized)
from fusecc.kernels.fused_moe import fused_moe, fused_moe_reference
from fusecc.kernels.moe_expert_weights import ExpertQuant
from fusecc.quantization.config import resolve_quantization
from fusecc.quantization.experts import QuantizedMoEExperts, quantize_expert_weights
from tests.kernels.test_fused_moe import make_moe
from tests.quantization.packers import rtn_dequantized
from tests.quantization.quantized_checkpoints import write_quantized_moe_checkpoint

E4M3_MAX = 448.0


def e4m3_rows(a: torch.Tensor) -> torch.Tensor:
    """Each row rounded to e4m3 on the grid of its own scale amax / 448 (float64 back)."""
    scale = (a.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    return (a / scale).to(torch.float8_e4m3fn).double() * scale


def dequantized_f64(w: torch.Tensor, scales: torch.Tensor, zeros, fmt: str, K: int, group: int) -> torch.Tensor:
    """[E, N, K] float64 from the module docstring of moe_expert_weights.py, one element at a time for int4."""
    if fmt == "int4":
        shifts = torch.arange(0, 32, 4)
        q = ((w.long().unsqueeze(-1) >> shifts) & 0xF).flatten(-2)[..., :K].double()
    else:
        q = w.double()
    g = torch.arange(K) // (K if group == -1 else group)
    if zeros is not None:
        q = q - zeros.double()[..., g]
    return q * scales.double()[..., g]


def quantized_loop_f64(x, d13, d2, topk_weights, topk_ids, fp8: bool):
    """sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) in float64; the intermediate rounded to x's
    dtype (the kernels store it so); fp8: both projections' inputs rounded to e4m3 per row."""
    inter = d2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        a = x[t:t + 1].double()
        a = e4m3_rows(a) if fp8 else a
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = (d13[e] @ a[0])
            act = (F.silu(h[:inter]) * h[inter:]).to(x.dtype).double()[None]
            act = e4m3_rows(act) if fp8 else act
            out[t] += float(topk_weights[t, k]) * (d2[e] @ act[0])
    return out


def quantize(w: torch.Tensor, fmt: str, group: int):
    """Float experts [E, N, K] -> (weights, ExpertQuant) with fusecc's round-to-nearest rules."""
    quant = resolve_quantization(fmt, None)
    if fmt == "int4":
        quant = type(quant)(quant.method, quant.bits, group, quant.zero_point)
    q, scales, zeros = quantize_expert_weights(w, quant)
    return q, ExpertQuant(fmt, quant.group_size, scales, zeros)


CASES = [  # (format, int4 group, tokens, experts, top_k, hidden, inter)
    ("int8", -1, 6, 4, 2, 64, 32),
    ("int4", 32, 7, 6, 2, 64, 48),      # group 32: two groups per hidden row, the K tile inside one
    ("int4", 16, 5, 4, 3, 48, 32),      # group 16 under the decode path's 32-wide K tiles: gathered scales
    ("fp8", -1, 6, 4, 2, 64, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,group,tokens,experts,top_k,hidden,inter", CASES)
@pytest.mark.parametrize("path", ["grouped", "decode"])
def test_kernels_match_float64_loop(fmt, group, tokens, experts, top_k, hidden, inter, dtype, path):
    tokens = tokens if path == "grouped" else 2
    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, hidden, inter, torch.float32)
    x = x.to(dtype)
    q13, quant13 = quantize(w13, fmt, group)
    q2, quant2 = quantize(w2, fmt, group)
    out = fused_moe(x, q13, q2, weights, ids, w13_quant=quant13, w2_quant=quant2, decode=path == "decode")
    assert out.shape == x.shape and out.dtype == dtype
    d13 = dequantized_f64(q13, quant13.scales, quant13.zeros, fmt, hidden, quant13.group_size)
    d2 = dequantized_f64(q2, quant2.scales, quant2.zeros, fmt, inter, quant2.group_size)
    ref = quantized_loop_f64(x, d13, d2, weights, ids, fp8=fmt == "fp8")
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # the CPU op (the experts' path without a GPU) computes the same
    cpu = torch.ops.fusecc.fused_moe_quantized(x, q13, quant13.scales, quant13.zeros, q2, quant2.scales,
                                               quant2.zeros, weights, ids, fmt, quant13.group_size)
    torch.testing.assert_close(cpu.double(), ref, atol=2 * tol, rtol=2 * tol)


def test_quantized_weights_are_close_to_the_float_ones():
    # the quantization itself: int8 within half a step per row, fp8 within an e4m3 half-ulp (2^-4 relative)
    _, w13, _, _, _ = make_moe(1, 3, 1, 64, 32, torch.float32)
    for fmt, rel in (("int8", None), ("fp8", 2 ** -4)):
        q, quant = quantize(w13, fmt, -1)
        deq = dequantized_f64(q, quant.scales, None, fmt, 64, -1)
        err = (deq - w13.double()).abs()
        if fmt == "int8":
            step = w13.double().abs().amax(-1, keepdim=True) / 127
            assert (err <= step / 2 + 1e-12).all()
        else:
            tiny = w13.double().abs().amax(-1, keepdim=True) / E4M3_MAX * 2 ** -9  # subnormal spacing
            assert (err <= rel * w13.double().abs() + tiny).all()


def test_bad_layouts_are_one_line_errors():
    x, w13, w2, weights, ids = make_moe(3, 4, 2, 64, 32, torch.float32)
    q13, quant13 = quantize(w13, "int4", 32)
    q2, quant2 = quantize(w2, "int4", 32)
    with pytest.raises(ValueError, match=r"int4 w13 must be torch.int32 \[4, 64, 8\]"):
        fused_moe(x, q13[:, :, :4], q2, weights, ids, w13_quant=quant13, w2_quant=quant2)
    with pytest.raises(ValueError, match="both be float or both quantized"):
        fused_moe(x, q13, w2, weights, ids, w13_quant=quant13)
    bad = ExpertQuant("int4", 32, quant2.scales.half(), quant2.zeros)
    with pytest.raises(ValueError, match=r"w2 scales must be float32 \[4, 64, 1\]"):
        fused_moe(x, q13, q2, weights, ids, w13_quant=quant13, w2_quant=bad)
    with pytest.raises(ValueError, match="unknown expert weight format 'int3'"):
        fused_moe(x, q13, q2, weights, ids, w13_quant=ExpertQuant("int3", 32, quant13.scales, None),
                  w2_quant=ExpertQuant("int3", 32, quant2.scales, None))


def test_opcheck():
    x, w13, w2, weights, ids = make_moe(3, 4, 2, 64, 32, torch.float32)
    q13, quant13 = quantize(w13, "int4", 32)
    q2, quant2 = quantize(w2, "int4", 32)
    torch.library.opcheck(torch.ops.fusecc.fused_moe_quantized,
                          (x, q13, quant13.scales, quant13.zeros, q2, quant2.scales, quant2.zeros, weights, ids,
                           "int4", 32))


# ---- the engine: MoE models quantized at load ----

from tests.quantization.test_quantized_engine import check_against_oracle, engine_greedy  # noqa: E402
from tests.runtime.hf_checkpoints import single_thread, tiny_tokenizer  # noqa: E402,F401
from tests.runtime.test_moe_models import hf_moe_model  # noqa: E402


def dequantize_like_load(oracle, method: str) -> None:
    """Every weight the engine quantizes, replaced by its round-to-nearest dequantized value: the decoder
    layers' linears and the experts' rows (per output row; int4 K <= 128 is one group), not the routers."""
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            leaf = name.rpartition(".")[2]
            owner = name.rpartition(".")[0].rpartition(".")[2]
            if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
                param.copy_(rtn_dequantized(param.reshape(-1, param.shape[-1]), method).view_as(param))
            elif leaf == "weight" and owner in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"):
                param.copy_(rtn_dequantized(param, method))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_on_the_fly_moe_matches_transformers_with_dequantized_weights(tmp_path, arch, method,
                                                                     single_thread):  # noqa: F811
    hf = hf_moe_model(arch)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    dequantize_like_load(hf, method)
    ours, llm, outs = engine_greedy(tmp_path, quantization=method)
    check_against_oracle(hf, llm, ours, outs)
    experts = llm.engine.runner.model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantizedMoEExperts)
    assert experts.weight_format == method
    assert experts.gate_up_proj.dtype == (torch.int8 if method == "int8" else torch.int32)


def test_fp8_moe_experts_load_quantized(tmp_path, single_thread):  # noqa: F811
    hf = hf_moe_model("mixtral")
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    ours, llm, outs = engine_greedy(tmp_path, quantization="fp8")
    assert all(len(tokens) == 12 for tokens in ours)
    experts = llm.engine.runner.model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedMoEExperts) and experts.gate_up_proj.dtype == torch.float8_e4m3fn
    deq = experts.gate_up_proj.double() * experts.gate_up_scales.double()
    float_w = hf.model.layers[0].mlp.experts.gate_up_proj.double()
    assert ((deq - float_w).abs() <= 2 ** -4 * float_w.abs() + float_w.abs().amax(-1, keepdim=True) * 2 ** -17).all()


@pytest.mark.parametrize("method,arch", [("gptq", "mixtral"), ("awq", "qwen3_moe")])
def test_int4_moe_checkpoint_matches_transformers_with_dequantized_weights(tmp_path, method, arch,
                                                                          single_thread):  # noqa: F811
    # per-expert qweight/qzeros/scales (Mixtral's w1/w2/w3 names too), stacked into the quantized experts
    oracle, _ = write_quantized_moe_checkpoint(tmp_path / "ckpt", arch, method)
    ours, llm, outs = engine_greedy(tmp_path / "ckpt")  # detected from config.json
    check_against_oracle(oracle, llm, ours, outs)
    experts = llm.engine.runner.model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantizedMoEExperts) and experts.weight_format == "int4"
    assert experts.group_size == 32 and experts.gate_up_zeros is not None


def test_fp8_moe_checkpoint_loads_its_dequantized_experts(tmp_path):
    from fusecc.runtime import loader

    _, expected = write_quantized_moe_checkpoint(tmp_path / "ckpt", "qwen3_moe", "fp8")
    model = loader.load_model(tmp_path / "ckpt", torch.float32, "cpu", 128)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, QuantizedMoEExperts) and experts.weight_format == "fp8"
    assert experts.group_size == 128 and experts.gate_up_proj.dtype == torch.float8_e4m3fn
    deq = experts.gate_up_proj.float() * experts.gate_up_scales  # one 128-block per tiny weight: [E, N, 1]
    prefix = "model.layers.1.mlp.experts.5"
    assert torch.equal(deq[5], torch.cat([expected[f"{prefix}.gate_proj.weight"], expected[f"{prefix}.up_proj.weight"]]))
    assert torch.equal(experts.down_proj[5].float() * experts.down_scales[5], expected[f"{prefix}.down_proj.weight"])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("tokens", [1, 2, 64, 300])
def test_gpu_real_shapes_bf16(fmt, tokens):
    # Qwen3-30B-A3B experts (hidden 2048, inter 768, 128 experts, top-8), bf16 activations
    x, w13, w2, weights, ids = make_moe(tokens, 128, 8, 2048, 768, torch.float32, device="cuda")
    q13, quant13 = quantize(w13, fmt, 128)
    q2, quant2 = quantize(w2, fmt, 128)
    xb = x.bfloat16()
    out = fused_moe(xb, q13, q2, weights, ids, w13_quant=quant13, w2_quant=quant2)
    ref = fused_moe_reference(xb.float(), q13, q2, weights, ids, w13_quant=quant13, w2_quant=quant2)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.filterwarnings("error:fusecc failed to compile")
def test_compiled_engine_keeps_the_quantized_experts_call(tmp_path, single_thread):  # noqa: F811
    # compiled with the fusecc backend: the experts stay one opaque fusecc::fused_moe_quantized call
    from fusecc.llm import LLM
    from fusecc.runtime.sampling_params import SamplingParams
    from tests.quantization.test_quantized_engine import PROMPTS

    hf = hf_moe_model("qwen3_moe")
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    eager, _, _ = engine_greedy(tmp_path, quantization="int4")
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=128, quantization="int4")
    assert llm.engine.runner.forward is not llm.engine.runner.model  # compiled
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == eager
