"""fusecc/quantization/gptq.py: GPTQ rounding to fp8 and the `fusecc quantize` checkpoint it writes.

The rounding: without a Hessian it is round-to-nearest (quantize_fp8's values); with one, the scales
are round-to-nearest's and the layer's output error on inputs with that Hessian is smaller. The checkpoint: a tiny Llama
written by `fusecc quantize` loads as an fp8 checkpoint holding exactly the GPTQ weights, and generates.
"""

import json

import torch

from fusecc.quantization.gptq import gptq_fp8
from fusecc.quantization.packing import quantize_fp8
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
