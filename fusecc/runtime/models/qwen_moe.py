"""Qwen2-MoE and Qwen3-MoE: Qwen2 / Qwen3 attention, sparse MoE blocks (moe.py) in some or all layers.

A layer is sparse unless listed in `mlp_only_layers`, and when (layer + 1) % `decoder_sparse_step` == 0
(transformers' rule); the others have a dense MLP of `intermediate_size`. Router as transformers':
softmax in fp32, top `num_experts_per_tok`, renormalized only with `norm_topk_prob`, then rounded to
the activations' dtype. Each expert has `moe_intermediate_size`. Qwen2-MoE adds a shared expert
(`shared_expert_intermediate_size`) scaled by sigmoid(shared_expert_gate(x)); q/k/v bias follows
config.qkv_bias. Qwen3-MoE: RMSNorm on q and k per head, no shared expert, bias from attention_bias.
Checkpoint: model.layers.N.mlp.{gate, experts.E.{gate,up,down}_proj, shared_expert.*, shared_expert_gate}.
"""

from __future__ import annotations

from torch import nn

from fusecc.runtime.models.moe import MoEForCausalLM, SparseMoeBlock


def is_sparse_layer(config, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_idx + 1) % config.decoder_sparse_step == 0)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    shared_expert = True

    @property
    def qkv_bias(self) -> bool:  # read by LlamaForCausalLM.__init__ (after self.config is set)
        return bool(getattr(self.config, "qkv_bias", True))

    def make_mlp(self, layer_idx: int) -> nn.Module | None:
        c = self.config
        if not is_sparse_layer(c, layer_idx):
            return None  # the dense LlamaMLP of intermediate_size
        shared = c.shared_expert_intermediate_size if self.shared_expert else 0
        return SparseMoeBlock(c, c.num_experts, c.moe_intermediate_size, renormalize=bool(c.norm_topk_prob),
                              weights_in_fp32=False, shared_intermediate=shared)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    shared_expert = False
    qk_norm = True
    qkv_bias = None  # from config.attention_bias, as Qwen3
