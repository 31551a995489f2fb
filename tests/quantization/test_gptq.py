"""fusecc/quantization/gptq.py: GPTQ rounding to fp8 and int4 and the `fusecc quantize` checkpoints it writes.

The rounding: without a Hessian it is round-to-nearest (quantize_fp8's / quantize_int4's values); with
one, the layer's output error on inputs with that Hessian is smaller. The order: true-sequential, each
linear's Hessian taken from inputs that went through the already-rounded linears. The checkpoints: a
tiny Llama written by `fusecc quantize` loads as an fp8 or a GPTQ int4 checkpoint holding exactly the
GPTQ weights, and generates.
"""

import json

import pytest
import torch

from fusecc.quantization.gptq import gptq_fp8, gptq_int4, int4_group_grid, quantize_sequentially
from fusecc.quantization.packing import (_unpack_cols, fusecc_to_gptq_int4, gptq_to_fusecc, pack_int4, quantize_fp8,
                                         quantize_int4)
from tests.runtime.hf_checkpoints import save_tiny_checkpoint, single_thread  # noqa: F401


def correlated_inputs(tokens: int, K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    return (torch.randn(tokens, K, generator=g) @ mix).double()


def test_without_a_hessian_it_is_round_to_nearest():
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))
    q, scale = gptq_fp8(w, None)
    rtn_q, rtn_scale = quantize_fp8(w)
    assert torch.equal(q.float(), rtn_q.float()) and torch.equal(scale, rtn_scale[:, 0])


def test_gptq_moves_the_outputs_less_than_round_to_nearest():
    K = 96
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(512, K)
    q, scale = gptq_fp8(w, 2 * x.t() @ x / x.shape[0], block=32)
    rtn_q, rtn_scale = gptq_fp8(w, None)
    assert torch.equal(scale, rtn_scale)  # the grid is round-to-nearest's; which points the weights take changes
    assert not torch.equal(q.float(), rtn_q.float())
    exact = x @ w.double().t()

    def output_error(qw):
        return (x @ (qw.double() * scale[:, None].double()).t() - exact).pow(2).mean().item()

    assert output_error(q) < 0.7 * output_error(rtn_q)



def test_act_order_rounds_the_largest_inputs_first_and_helps_where_they_come_last():
    # inputs whose last columns are 20x larger (activation outliers): in column order GPTQ meets
    # them when no columns are left to take up their error; act order meets them first
    K = 96
    x = correlated_inputs(512, K, seed=3)
    x[:, -8:] *= 20
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(4))
    hessian = 2 * x.t() @ x / x.shape[0]
    exact = x @ w.double().t()
    errors = {}
    for act_order in (False, True):
        q, scale = gptq_fp8(w, hessian, block=32, act_order=act_order)
        assert torch.equal(scale, quantize_fp8(w)[1][:, 0])  # the order changes no scale
        errors[act_order] = (x @ (q.double() * scale[:, None].double()).t() - exact).pow(2).mean().item()
    assert errors[True] < 0.8 * errors[False], errors


def int4_dequantized(q, scales, zeros, group_size):
    g = torch.arange(q.shape[1]) // group_size
    return (q.double() - zeros[:, g].double()) * scales[:, g].double()


@pytest.mark.parametrize("K,group_size", [(96, 32), (80, 32)])  # 80: a short last group
def test_int4_without_a_hessian_is_quantize_int4(K, group_size):
    w = torch.randn(16, K, generator=torch.Generator().manual_seed(5))
    q, scales, zeros = gptq_int4(w, None, group_size, scale_dtype=torch.float32)
    qweight, rtn_scales, rtn_zeros = quantize_int4(w, group_size)
    assert torch.equal(q.int(), _unpack_cols(qweight, 4)[:, :K])
    assert torch.equal(scales, rtn_scales) and torch.equal(zeros, rtn_zeros)


def test_int4_grid_search_never_rounds_a_group_worse_than_the_full_range():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    w[0, 3] = 8.0  # an outlier: its group's range is mostly empty
    importance = torch.rand(96, generator=torch.Generator().manual_seed(7)) + 0.1
    full = int4_group_grid(w, 32, importance, shrinks=(1.0,))
    searched = int4_group_grid(w, 32, importance)

    def group_errors(scales, zeros):
        g = torch.arange(96) // 32
        q = (w.double() / scales[:, g] + zeros[:, g]).round().clamp(0, 15)
        return (((q - zeros[:, g]) * scales[:, g] - w.double()) ** 2 * importance.double()).view(16, 3, 32).sum(-1)

    assert (group_errors(*searched) <= group_errors(*full)).all()
    assert (group_errors(*searched) < group_errors(*full)).any()  # some group shrank its range


def test_int4_gptq_moves_the_outputs_less_than_round_to_nearest():
    K, G = 128, 32
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(8))
    x = correlated_inputs(512, K, seed=9)
    q, scales, zeros = gptq_int4(w, 2 * x.t() @ x / x.shape[0], G, block=32)
    rtn = gptq_int4(w, None, G)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    exact = x @ w.double().t()

    def output_error(quantized):
        return (x @ int4_dequantized(*quantized, G).t() - exact).pow(2).mean().item()

    assert output_error((q, scales, zeros)) < 0.7 * output_error(rtn)


def test_gptq_int4_packing_reads_back_through_the_gptq_loader():
    g = torch.Generator().manual_seed(10)
    q = torch.randint(0, 16, (24, 64), generator=g)
    scales, zeros = torch.rand(24, 2, generator=g) + 0.01, torch.randint(0, 16, (24, 2), generator=g).float()
    zeros[0, 0] = 0.0  # v1's "z - 1" could not hold it; gptq_v2 stores z
    qweight, qzeros, scales16 = fusecc_to_gptq_int4(q, scales, zeros)
    assert qweight.shape == (8, 24) and qzeros.shape == (2, 3) and scales16.dtype == torch.float16
    ours, back_scales, back_zeros = gptq_to_fusecc(qweight, qzeros, scales16, 4, v1_zeros=False)
    assert torch.equal(ours, pack_int4(q))
    assert torch.equal(back_zeros, zeros) and torch.equal(back_scales, scales.half().float())
    with pytest.raises(ValueError, match="divisible by 8, not 60 and 24"):
        fusecc_to_gptq_int4(q[:, :60], scales, zeros)


def test_sequential_order_takes_each_hessian_after_the_linears_before_it_are_rounded(tmp_path):
    # a rounding that zeroes every weight: v_proj zeroed before o_proj is measured leaves o_proj only
    # zero inputs, gate/up zeroed leave down_proj zero inputs; in one pass of the float model neither is zero
    model = save_tiny_checkpoint("llama", tmp_path / "m")
    seen = []

    def zero_it(name, weight, hessian):
        seen.append((name, hessian.abs().max().item()))
        return torch.zeros_like(weight)

    quantize_sequentially(model, [[3, 4, 5, 6, 7, 8], [9, 10, 11]], zero_it)
    names = [name for name, _ in seen]
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert [n.rpartition(".")[2] for n in names] == kinds * 2
    assert [n.split(".")[2] for n in names] == ["0"] * 7 + ["1"] * 7
    largest = dict(seen)
    for layer in (0, 1):
        assert largest[f"model.layers.{layer}.self_attn.o_proj"] == 0.0
        assert largest[f"model.layers.{layer}.mlp.down_proj"] == 0.0
        assert largest[f"model.layers.{layer}.self_attn.q_proj"] > 0.0


def test_each_layer_type_is_calibrated_with_its_own_mask_and_rotary_embedding():
    # Gemma3 gives sliding and full layers their own mask and rope base: with a rounding that changes
    # nothing, every linear's Hessian must be the one a plain float forward gives it
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fusecc.quantization.gptq import _accumulate_hessians

    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    windows = [list(range(3, 19)), list(range(20, 32))]  # longer than the window: the masks differ
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name}

    def forward():
        for window in windows:
            model(torch.tensor([window]), use_cache=False)

    with torch.no_grad():
        expected = _accumulate_hessians(linears, forward)
    seen = {}

    def keep(name, weight, hessian):
        seen[name] = hessian
        return weight

    quantize_sequentially(model, windows, keep)
    assert sorted(seen) == sorted(expected)
    for name, hessian in seen.items():
        torch.testing.assert_close(hessian, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_quantize_writes_an_fp8_checkpoint_fusecc_loads(tmp_path, single_thread):  # noqa: F811
    from fusecc.cli import main
    from fusecc.llm import LLM
    from fusecc.quantization.linear import Fp8Linear
    from fusecc.runtime.sampling_params import SamplingParams

    save_tiny_checkpoint("llama", tmp_path / "float")
    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(tmp_path / "float"), "--out", str(out),
                 "--calibration-windows", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    llm = LLM(str(out), enforce_eager=True, dtype="float32", max_model_len=64)
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert isinstance(down, Fp8Linear) and down.group_size == -1
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert torch.equal(down.weight.float(), stored["model.layers.0.mlp.down_proj.weight"].float())
    assert torch.equal(down.weight_scale[:, 0], stored["model.layers.0.mlp.down_proj.weight_scale"])
    out_tokens = llm.generate(["w1 w2 w3"], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].token_ids
    assert len(out_tokens) == 5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # untied head; q/k/v bias + tied; q/k norms
def test_quantize_writes_a_gptq_int4_checkpoint_fusecc_loads(arch, tmp_path, single_thread):  # noqa: F811
    from safetensors.torch import load_file

    from fusecc.cli import main
    from fusecc.llm import LLM
    from fusecc.quantization.linear import WeightOnlyLinear
    from fusecc.runtime.sampling_params import SamplingParams

    save_tiny_checkpoint(arch, tmp_path / "float")
    out = tmp_path / "int4"
    assert main(["quantize", "--model", str(tmp_path / "float"), "--out", str(out), "--method", "int4",
                 "--group-size", "32", "--calibration-windows", "2"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                      "checkpoint_format": "gptq_v2"}
    stored = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight" not in stored
    llm = LLM(str(out), enforce_eager=True, dtype="float32", max_model_len=64)
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert isinstance(down, WeightOnlyLinear) and (down.bits, down.group_size) == (4, 32)
    prefix = "model.layers.0.mlp.down_proj"
    qweight, scales, zeros = gptq_to_fusecc(stored[f"{prefix}.qweight"], stored[f"{prefix}.qzeros"],
                                            stored[f"{prefix}.scales"], 4, v1_zeros=False)
    assert torch.equal(down.qweight, qweight) and torch.equal(down.scales.float(), scales)
    assert torch.equal(down.zeros.float(), zeros)
    out_tokens = llm.generate(["w1 w2 w3"], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].token_ids
    assert len(out_tokens) == 5
