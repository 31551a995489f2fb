"""The runtime's forward costs one decoder layer to compile, not N: the halves of a layer around
its attention are nested compile regions (fusecc/runtime/models/llama.py), which Dynamo and
AOTAutograd trace once and fusecc inlines again before its passes (fusecc/graph/nested_regions.py);
and the KV caches' sizes are constants while a forward compiles (model_runner.static_cache_sizes)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import fusecc.backend
from tests.runtime.hf_checkpoints import hf_greedy, save_tiny_checkpoint, tiny_tokenizer


@pytest.fixture
def compiled_graphs(monkeypatch):
    """What reached fusecc's compiler for each ATen graph: its region calls, the distinct region
    graphs among them, and the shapes of its inputs."""
    seen = []
    original_inline = fusecc.backend.inline_nested_regions

    def recording_inline(gm: fx.GraphModule) -> int:
        calls = gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
        seen.append({"calls": len(calls), "regions": len({node.args[0].target for node in calls}),
                     "identifiers": {node.args[1] for node in calls}})
        inlined = original_inline(gm)
        assert not gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
        assert not [name for name, child in gm.named_children() if isinstance(child, fx.GraphModule)]
        return inlined

    original_call = fusecc.backend.InferenceCompiler.__call__

    def recording_call(self, aten_gm, fake_inputs):
        seen.append({"input_shapes": [tuple(x.shape) for x in fake_inputs if isinstance(x, torch.Tensor)]})
        return original_call(self, aten_gm, fake_inputs)

    monkeypatch.setattr(fusecc.backend, "inline_nested_regions", recording_inline)
    monkeypatch.setattr(fusecc.backend.InferenceCompiler, "__call__", recording_call)
    return seen


def torch_version() -> tuple[int, int]:
    return tuple(int(part) for part in torch.__version__.split(".")[:2])


@pytest.mark.parametrize("layers", [2, 5])
def test_each_layer_half_is_traced_once_whatever_the_depth(tmp_path, compiled_graphs, layers):
    from fusecc import LLM, SamplingParams

    oracle = save_tiny_checkpoint("llama", tmp_path, num_hidden_layers=layers)
    llm = LLM(str(tmp_path), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prompt = "w5 w9 w17 w3 w40"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    ids = tiny_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
    assert out == hf_greedy(oracle, ids, 8)

    region_reports = [r for r in compiled_graphs if "calls" in r]
    assert len(region_reports) == 2, compiled_graphs  # the decode-only and the mixed-step graph
    for report in region_reports:
        # every layer calls both halves; only two graphs were traced for all of them
        assert report["calls"] == 2 * layers, report
        # torch 2.11 (the GPU machine's) reuses a region less eagerly: one half is traced a second
        # time, 3 graphs for any depth; 2.13 traces each half once. Either way not once per layer.
        traced = 2 if torch_version() >= (2, 13) else 3
        assert report["regions"] == traced and len(report["identifiers"]) == traced, report


def test_kv_cache_sizes_are_constants_while_compiling(tmp_path, compiled_graphs):
    from fusecc import LLM, SamplingParams

    save_tiny_checkpoint("llama", tmp_path)
    llm = LLM(str(tmp_path), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    caches = [c for pair in llm.engine.runner.kv_caches for c in pair]
    for report in (r for r in compiled_graphs if "input_shapes" in r):
        cache_shapes = [s for s in report["input_shapes"] if len(s) == 4]  # the only 4-d inputs
        assert len(cache_shapes) == len(caches), report
        # CPU: all four sizes are plain ints (CUDA keeps the number of blocks symbolic)
        assert all(type(d) is int for shape in cache_shapes for d in shape), report
        token_dims = [s for s in report["input_shapes"] if len(s) == 1 and isinstance(s[0], torch.SymInt)]
        assert token_dims, f"the token dimension should stay dynamic: {report}"
    # the markings are gone once compiled: a stored function's guards would reject them
    assert not any(hasattr(c, "_dynamo_static_indices") for c in caches)
    assert llm.generate(["w3 w4"], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids


def test_layers_of_many_kinds_compile():
    """Layers that differ (here: ten MLP widths) are traced once per kind; torch refuses more kinds
    than a region's max_reuse_entries (8 by default), which must not stop a model from compiling."""
    from transformers import LlamaConfig

    from fusecc.runtime.models.llama import LlamaDecoderLayer, LlamaMLP, Rotary

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=10, max_position_embeddings=64)
    rotary = Rotary(config, 8, 64)
    layers = torch.nn.ModuleList(
        LlamaDecoderLayer(config, rotary, False, False, mlp=LlamaMLP(config, intermediate_size=16 * (i + 1)))
        for i in range(10))

    def after_attention_of_all(x, o):
        for layer in layers:
            x = layer.after_attention(x, o)
        return x

    x, o = torch.randn(3, 32), torch.randn(3, 4, 8)
    compiled = torch.compile(after_attention_of_all, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, o), after_attention_of_all(x, o))


def test_own_inliner_for_older_torch_matches_generation(tmp_path, monkeypatch):
    # torch before 2.13 (the GPU machine's 2.11) has no inline_invoke_subgraph pass: fusecc copies the
    # region nodes itself (nested_regions._inline_calls); a model compiled that way generates as transformers
    from fusecc import LLM, SamplingParams
    from fusecc.graph import nested_regions

    used = []

    def own_inliner(gm: fx.GraphModule) -> int:
        calls = len(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph))
        nested_regions._inline_calls(gm)
        used.append(calls)
        assert not gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.invoke_subgraph)
        assert not [n for n in gm.graph.find_nodes(op="get_attr") if not n.users]  # no stale region handles
        gm.graph.lint()
        gm.recompile()
        return calls

    monkeypatch.setattr(fusecc.backend, "inline_nested_regions", own_inliner)
    oracle = save_tiny_checkpoint("llama", tmp_path, num_hidden_layers=3)
    llm = LLM(str(tmp_path), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prompt = "w5 w9 w17 w3 w40"
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    assert out == hf_greedy(oracle, tiny_tokenizer()(prompt, add_special_tokens=False)["input_ids"], 8)
    assert used and all(calls == 6 for calls in used), used  # two halves of three layers per graph
