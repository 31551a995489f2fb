"""Mixtral: Mistral attention, every layer's MLP a sparse MoE block (moe.py).

Router as transformers' MixtralTopKRouter: softmax over the experts in fp32, top `num_experts_per_tok`,
always renormalized to sum 1, and the fp32 weights multiply the experts' outputs.
Config: num_local_experts, num_experts_per_tok, intermediate_size (each expert's).
Checkpoint: model.layers.N.block_sparse_moe.{gate, experts.E.w1/w2/w3}.weight.
"""

from __future__ import annotations

from torch import nn

from fusecc.runtime.models.moe import MoEForCausalLM, SparseMoeBlock


class MixtralForCausalLM(MoEForCausalLM):
    def make_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        return SparseMoeBlock(c, c.num_local_experts, c.intermediate_size, renormalize=True, weights_in_fp32=True)
