"""transformers tiny models compile to generated Triton kernels (interpreter on CPU) and match eager."""

import pytest
import torch

from tests.codegen.compile_helpers import read_dump
from tests.codegen.model_zoo import FAMILIES, build

# Kernels per decoder layer at prefill with a DynamicCache, unfrozen weights:
#   Llama/Qwen2/Mistral (7): RoPE q | RoPE k + append to the (empty) cache | append v |
#     attention output transposed to [B, S, H*D] | residual add + post-attention RMSNorm |
#     SwiGLU | residual add + next RMSNorm.
#   GPT-2 (6): cache append of k | of v | attention output transpose | residual add + LayerNorm |
#     bias add + GELU (tanh approximation) | residual add + next LayerNorm.
KERNELS_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gpt2": 6}


def _compile(model, tmp_path, name, dynamic=False):
    dump = tmp_path / name
    compiled = torch.compile(model, backend="fusecc", dynamic=dynamic,
                             options={"codegen": "triton", "strict": True, "dump_dir": str(dump)})
    return compiled, dump


@pytest.mark.parametrize("family", FAMILIES)
def test_model_matches_eager_and_kernel_count_per_layer(family, tmp_path):
    launches = {}
    for layers in (2, 3):
        torch._dynamo.reset()
        model = build(family, layers=layers)
        compiled, dump = _compile(model, tmp_path, f"l{layers}")
        shapes = ((2, 8), (1, 5)) if layers == 2 else ((2, 8),)  # a new static shape is a new compile
        for batch, seq in shapes:
            ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seq))
            with torch.no_grad():
                torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
        kernels, wrapper, report = read_dump(dump, 0)
        assert report["codegen"]["codegen_fallbacks"] == 0, report["notes"]
        assert kernels, "no generated kernels"
        launches[layers] = report["codegen"]["kernel_launches"]
    assert launches[3] - launches[2] == KERNELS_PER_LAYER[family]


def test_identical_layers_share_kernels(tmp_path):
    model = build("llama", layers=3)
    compiled, dump = _compile(model, tmp_path, "d")
    with torch.no_grad():
        compiled(torch.randint(0, 128, (1, 6)))
    kernels, wrapper, report = read_dump(dump)
    # 3 layers launch 7 kernels each, but identical layers produce identical source.
    assert report["codegen"]["kernel_launches"] > 2 * len(kernels)


def test_dynamic_sequence_length_reuses_the_compiled_graph(tmp_path):
    model = build("llama", layers=2)
    compiled, dump = _compile(model, tmp_path, "dyn", dynamic=True)
    for seq in (6, 11, 3):
        ids = torch.randint(0, 128, (2, seq))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    graphs = [p for p in dump.iterdir() if (p / "report.json").exists()]
    assert len(graphs) == 1, "a new sequence length recompiled"
    kernels, wrapper, report = read_dump(dump)
    # sizes are kernel arguments: some kernel takes a shape symbol besides xnumel
    assert any("xnumel" in src and ", s" in src.split("def ", 1)[1].split(")")[0] for src in kernels.values())
