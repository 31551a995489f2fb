"""The runner's compiled CPU forward: what its ATen graph holds and what compiling it costs Dynamo
(fusecc/runtime/model_runner.py compile_forward)."""

import json

import pytest
import torch

from fusecc.runtime.default_model import build_default_model
from fusecc.runtime.model_runner import compile_forward, size_oblivious_compile
from fusecc.runtime.models.attention import AttentionMetadata
from tests.runtime.hf_checkpoints import single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def prompt_step(tokens: int, num_layers: int, kv_heads: int, head_dim: int):
    """forward() arguments of one prompt of `tokens` tokens in 16-slot blocks (KV written)."""
    caches = [(torch.zeros(8, 16, kv_heads, head_dim), torch.zeros(8, 16, kv_heads, head_dim))
              for _ in range(num_layers)]
    md = AttentionMetadata(slot_mapping=torch.arange(tokens), block_tables=torch.arange(2, dtype=torch.int32)[None],
                           context_lens=torch.tensor([tokens], dtype=torch.int32),
                           cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen_q=tokens,
                           decode_only=False)
    return torch.arange(40, 40 + tokens), torch.arange(tokens), caches, md


def test_cpu_forward_graph_keeps_eps_constant_silu_whole_and_compiles_in_one_trace(tmp_path):
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    torch._dynamo.reset()
    clear_compilation_metrics()  # the session's earlier compilations
    model, config = build_default_model(torch.float32, "cpu")
    assert size_oblivious_compile(torch.device("cpu"))
    forward = compile_forward(model, True, dump_dir=str(tmp_path))
    with torch.inference_mode():
        ids, pos, caches, md = prompt_step(20, config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        expected = model(ids, pos, [(k.clone(), v.clone()) for k, v in caches], md)
        torch.testing.assert_close(forward(ids, pos, caches, md), expected, rtol=1e-5, atol=1e-5)
    # dynamic=True alone makes RMSNorm's eps a float64 0-d tensor input: Dynamo traces the model
    # twice (a restart to tensorify it) and each norm converts it and adds a tensor at run time
    assert [m.restart_reasons for m in get_compilation_metrics()] == [set()]
    (report,) = tmp_path.glob("*/report.json")
    ops = json.loads(report.read_text())["op_histogram_final"]
    norms = 2 * config.num_hidden_layers + 1
    assert "prims.convert_element_type" not in ops and "aten._to_copy" not in ops, ops
    assert ops["aten.rsqrt"] == norms
    # per layer: the eps add of its 2 norms and its 2 residual adds, plus RoPE's 2 adds (q and k)
    assert ops["aten.add"] == norms + 4 * config.num_hidden_layers
    assert "f64[" not in next(tmp_path.glob("*/01.aten.py")).read_text()
    # SwiGLU's silu stays one ATen kernel on the ATen runner (not sigmoid + mul)
    assert ops["aten.silu"] == config.num_hidden_layers and "aten.sigmoid" not in ops, ops


def test_activations_decompose_only_for_generated_kernels():
    from fusecc.decompositions import decomposition_table

    aten = torch.ops.aten
    assert aten.silu.default in decomposition_table() and aten.gelu.default in decomposition_table()
    assert aten.silu.default not in decomposition_table(True) and aten.gelu.default not in decomposition_table(True)
    assert aten._softmax.default in decomposition_table(True)  # attention matching reads its parts
