"""fusecc/quantization/activation_scaling.py: AWQ-style input scales, searched on the inputs' Hessian and
folded into the modules feeding each group of linears.

The fold must leave the float layer computing what it computed (it only moves magnitude between a
weight's columns and its input); the search must never choose a scale that rounds worse than none,
and must choose one when an input channel is much larger than the rest; a norm whose output does
not scale with its weight (Gemma's 1 + weight) must be left alone.
"""

import pytest
import torch
from torch import nn

from fusecc.quantization.activation_scaling import rounding_error, scale_layer_inputs, search_input_scale


def llama_layer(kv_heads: int):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, vocab_size=32, num_hidden_layers=1)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():  # norms start at 1: make them not
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 24, 64)
    x[..., 5] *= 12  # an outlier channel in the residual stream
    positions = torch.arange(24)[None]
    rope = LlamaRotaryEmbedding(config)(x, positions)
    return layer, x, rope


def layer_hessians(layer, x, rope):
    sums = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: sums.__setitem__(
        n, 2 * args[0].reshape(-1, args[0].shape[-1]).double().t() @ args[0].reshape(-1, args[0].shape[-1]).double()
        / args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        out = layer(x, position_embeddings=rope, attention_mask=None)
    for h in hooks:
        h.remove()
    return sums, out


@pytest.mark.parametrize("kv_heads,scaled_groups", [(4, 4), (2, 3)])  # GQA: o_proj has no row to fold into
def test_folded_scales_keep_the_float_layer_and_pick_the_outlier(kv_heads, scaled_groups):
    layer, x, rope = llama_layer(kv_heads)
    hessians, before = layer_hessians(layer, x, rope)
    q_before = layer.self_attn.q_proj.weight.clone()
    chosen = scale_layer_inputs(layer, hessians, group_size=32)
    _, after = layer_hessians(layer, x, rope)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert len(chosen) == scaled_groups and ("self_attn.o_proj" in chosen) == (kv_heads == 4)
    assert all(0.0 < alpha <= 1.0 for alpha in chosen.values())
    # the outlier input channel's weight column grew the most
    growth = layer.self_attn.q_proj.weight.abs().sum(0) / q_before.abs().sum(0)
    assert int(growth.argmax()) == 5


def test_search_is_never_worse_than_no_scale():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(256, 64, generator=g).double()
    x[:, 9] *= 20
    hessian = 2 * x.t() @ x / x.shape[0]
    alpha, s = search_input_scale([w], hessian, 32)
    scaled = rounding_error((w.double() * s).float(), hessian / s[:, None] / s[None, :], 32)
    assert alpha > 0 and scaled < rounding_error(w, hessian, 32)
    _, flat = search_input_scale([w], torch.eye(64, dtype=torch.float64) * 2, 32)
    assert torch.equal(flat, torch.ones(64, dtype=torch.float64))  # equal inputs: every alpha gives s = 1


class OnePlusWeightNorm(nn.Module):  # Gemma's RMSNorm: x_hat * (1 + weight)
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_a_norm_that_does_not_scale_with_its_weight_is_left_alone():
    layer, x, rope = llama_layer(2)
    layer.input_layernorm = OnePlusWeightNorm(64)
    layer.post_attention_layernorm = OnePlusWeightNorm(64)
    hessians, before = layer_hessians(layer, x, rope)
    norm_before = layer.input_layernorm.weight.clone()
    chosen = scale_layer_inputs(layer, hessians, group_size=32)
    assert set(chosen) <= {"mlp.down_proj"}  # only the group fed by up_proj's rows
    assert torch.equal(layer.input_layernorm.weight, norm_before)
    _, after = layer_hessians(layer, x, rope)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
