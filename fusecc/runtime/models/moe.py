"""The sparse MoE block the MoE families share, and loading their expert weights.

    router:  logits = x @ gate.weight.T                   [T, experts]
             probs = softmax(logits, fp32); weights, ids = topk(probs, top_k)
             weights /= weights.sum(-1) when renormalize   (Mixtral always; Qwen: norm_topk_prob)
             (torch.ops.fusecc.moe_route: one kernel on a GPU, these torch ops on CPU)
    experts: torch.ops.fusecc.fused_moe(x, w13, w2, weights, ids)   [T, hidden]

Expert weights are plain 3-D parameters, transformers 5's layout (so quantization can replace them):

    model.layers.N.mlp.experts.gate_up_proj  [experts, 2 * inter, hidden]   gate rows, then up rows
    model.layers.N.mlp.experts.down_proj     [experts, hidden, inter]

Checkpoints name them per expert (what the hub has and what transformers' save_pretrained writes):

    ...mlp.experts.E.gate_proj.weight / w1.weight   -> gate_up_proj[E, :inter]
    ...mlp.experts.E.up_proj.weight   / w3.weight   -> gate_up_proj[E, inter:]
    ...mlp.experts.E.down_proj.weight / w2.weight   -> down_proj[E]
    ...block_sparse_moe.*  (Mixtral)                -> ...mlp.*

or already fused under the parameter names above (loaded as they are). Quantized experts
(fusecc/quantization/experts.py) hold more parts per projection, loaded the same way from a quantized
checkpoint's tensors once converted to fusecc's layouts (fusecc/quantization/checkpoint.py):

    ...experts.E.gate_proj.qweight / .weight (fp8)  -> gate_up_proj[E, :inter]
    ...experts.E.gate_proj.scales / .weight_scale   -> gate_up_scales[E, :inter]
    ...experts.E.gate_proj.zeros                    -> gate_up_zeros[E, :inter]      (down_*: likewise)
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import nn

import fusecc.ops  # noqa: F401  (registers torch.ops.fusecc.fused_moe)
from fusecc.runtime.models.llama import LlamaForCausalLM, LlamaMLP

# checkpoint projection -> (our projection, shard): shard 0/1 = gate/up half of gate_up, None = whole expert
_EXPERT_SHARDS = {"gate_proj": ("gate_up", 0), "w1": ("gate_up", 0), "up_proj": ("gate_up", 1),
                  "w3": ("gate_up", 1), "down_proj": ("down", None), "w2": ("down", None)}
# checkpoint tensor -> our parameter's suffix: float or quantized weights, their scales, their zero points
_PARTS = {"weight": "proj", "qweight": "proj", "scales": "scales", "weight_scale": "scales", "zeros": "zeros"}
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.(weight|qweight|scales|weight_scale|zeros)$")


def expert_tensor_target(name: str) -> tuple[str, int, int | None] | None:
    """A per-expert checkpoint tensor's (our stacked parameter, expert, shard: 0/1 = gate/up half,
    None = whole), or None for any other tensor. `name` is already renamed (block_sparse_moe -> mlp)."""
    match = _PER_EXPERT.match(name)
    if match is None or match.group(3) not in _EXPERT_SHARDS:
        return None
    prefix, expert, kind, part = match.group(1), int(match.group(2)), match.group(3), match.group(4)
    ours, shard = _EXPERT_SHARDS[kind]
    return f"{prefix}.{ours}_{_PARTS[part]}", expert, shard


def expert_shards_expected(target: str, num_experts: int) -> int:
    """How many per-expert tensors fill the stacked parameter `target`."""
    return num_experts * (2 if ".gate_up_" in target else 1)


def _copy_expert(param: nn.Parameter, expert: int, shard: int | None, tensor: torch.Tensor, name: str) -> None:
    dest = param.data[expert]
    if shard is not None:
        half = param.shape[1] // 2
        dest = dest.narrow(0, shard * half, half)
    if tuple(tensor.shape) != tuple(dest.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; the model's config "
                         f"expects {tuple(dest.shape)}")
    dest.copy_(tensor)


class MoEExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.fusecc.fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class SparseMoeBlock(nn.Module):
    """Router + experts, plus Qwen2-MoE's shared expert: sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    def __init__(self, config, num_experts: int, intermediate: int, renormalize: bool, weights_in_fp32: bool,
                 shared_intermediate: int = 0) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (only silu / SwiGLU)")
        self.top_k = config.num_experts_per_tok
        if not 0 < self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, num_experts={num_experts}]")
        self.renormalize = renormalize
        # Mixtral multiplies by the fp32 weights; Qwen rounds them to the activations' dtype first
        self.weights_in_fp32 = weights_in_fp32
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.experts = MoEExperts(num_experts, config.hidden_size, intermediate)
        self.shared_expert = LlamaMLP(config, shared_intermediate) if shared_intermediate else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared_intermediate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden]
        # softmax in fp32, top k, renormalized if asked: one kernel on a GPU (kernels/moe_routing.py)
        weights, ids = torch.ops.fusecc.moe_route(self.gate(x), self.top_k, self.renormalize)  # [T, top_k]
        if not self.weights_in_fp32:
            weights = weights.to(x.dtype)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoEForCausalLM(LlamaForCausalLM):
    """Llama attention and decoder layers whose MLPs `make_mlp` may replace by SparseMoeBlocks; loads
    per-expert checkpoint tensors into the stacked expert parameters."""

    _experts_complete: frozenset | set = frozenset()  # stacked expert parameters filled by per-expert tensors

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded_experts: set[str] = set()
        loaded = super().load_weights(self._load_experts(weights, loaded_experts))
        return loaded | loaded_experts

    def _is_loaded(self, name: str, loaded: set[str]) -> bool:
        # per-expert shards are checked by _load_experts when the checkpoint is exhausted; fused ones are in `loaded`
        return ".mlp.experts." in name and name in self._experts_complete or super()._is_loaded(name, loaded)

    def _load_experts(self, weights, loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Copy per-expert tensors into the stacked parameters; pass every other tensor on (renamed)."""
        params = dict(self.named_parameters())
        shards: dict[str, set] = {}
        self._experts_complete: set[str] = set()
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            found = expert_tensor_target(name)
            if found is None:
                yield name, tensor
                continue
            target, expert, shard = found
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no counterpart in {type(self).__name__}")
            param = params[target]
            if expert >= param.shape[0]:
                raise ValueError(f"checkpoint tensor {name!r}: expert {expert} but the config has {param.shape[0]}")
            # a tensor-parallel rank's experts keep their slice (fusecc/distributed/moe.py)
            getattr(param, "expert_loader", _copy_expert)(param, expert, shard, tensor, name)
            shards.setdefault(target, set()).add((expert, shard))
            loaded.add(name)
        for target, got in shards.items():
            want = expert_shards_expected(target, params[target].shape[0])
            if len(got) != want:
                raise ValueError(f"checkpoint has {len(got)} of the {want} per-expert tensors of {target!r}")
            self._experts_complete.add(target)
