"""Tests for fusecc/passes/moe_matching.py: transformers' MoE blocks compiled with fusecc run one
`fusecc::fused_moe` call per block, equal to eager transformers; the dump says what matched or why not.

Through the real backend (Dynamo + capture), as a user compiles them: fp32 graphs hold transformers'
`grouped_mm_fallback` op, bf16 ones `aten._grouped_mm`. On CPU the fused op runs its torch path.
"""

import copy
import glob
import os

import pytest
import torch

from fusecc.backend import fusecc_backend  # the callable: works without the installed entry point

pytestmark = pytest.mark.filterwarnings("error:fusecc failed to compile")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def moe_block(arch: str, dtype, experts_implementation="grouped_mm", hidden_act="silu"):
    import transformers

    common = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  hidden_act=hidden_act)
    if arch == "mixtral":  # fp32 routing weights, output cast back to the activations' dtype
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    elif arch == "qwen2_moe":  # shared expert with its sigmoid gate stays in the graph, around the op
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
        config = transformers.Qwen2MoeConfig(**common, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=48)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        config = transformers.Qwen3MoeConfig(**common, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=32, norm_topk_prob=True)
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    block = Block(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.to(dtype)


def compile_and_run(module, *inputs, dump_dir):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=fusecc_backend, options={"dump_dir": str(dump_dir)})
    with torch.no_grad():
        return compiled(*inputs)


def dumped(dump_dir, pattern: str) -> str:
    return "\n".join(open(f).read() for f in sorted(glob.glob(os.path.join(dump_dir, "*", pattern))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_grouped_mm_experts_become_one_fused_moe_call(arch, dtype, tmp_path):
    block = moe_block(arch, dtype)
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.no_grad():
        expected = block(x)
    out = compile_and_run(block, x, dump_dir=tmp_path)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    final = dumped(tmp_path, "*final.py")
    assert final.count("torch.ops.fusecc.fused_moe.default(") == 1
    assert "grouped_mm" not in final and "aten.sort" not in final and "histc" not in final
    report = dumped(tmp_path, "report.md")
    assert "rewritten:transformers_grouped_mm_experts=1" in report
    grouped = "aten._grouped_mm.default(" if dtype == torch.bfloat16 else "transformers.grouped_mm_fallback.default("
    assert dumped(tmp_path, "*aten.py").count(grouped) == 2  # what was matched: gate_up and down


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_batched_mm_experts_become_one_fused_moe_call(arch, dtype, tmp_path):
    # experts_implementation="batched_mm": a copy of the expert weights per (token, expert) pair, two bmm's
    block = moe_block(arch, dtype, experts_implementation="batched_mm")
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.no_grad():
        expected = block(x)
    out = compile_and_run(block, x, dump_dir=tmp_path)
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert dumped(tmp_path, "*aten.py").count("aten.bmm.default(") == 2  # what was matched: gate_up and down
    final = dumped(tmp_path, "*final.py")
    assert final.count("torch.ops.fusecc.fused_moe.default(") == 1
    assert "bmm" not in final and "aten.index.Tensor" not in final  # no per-pair weight copies left
    assert "rewritten:transformers_batched_mm_experts=1" in dumped(tmp_path, "report.md")


def test_compiled_transformers_moe_model_matches_eager(tmp_path):
    import transformers

    config = transformers.Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)  # decisive routing
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    out = compile_and_run(model, ids, dump_dir=tmp_path).logits
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert dumped(tmp_path, "*final.py").count("torch.ops.fusecc.fused_moe.default(") == 2  # one per layer


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_other_experts_stay_and_the_report_says_why(implementation, tmp_path):
    # not SwiGLU: the kernel's epilogue would be wrong
    reason = "skipped:activation_not_silu_times_up=1"
    block = moe_block("qwen3_moe", torch.float32, experts_implementation=implementation, hidden_act="gelu")
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        expected = block(x)
    torch.testing.assert_close(compile_and_run(block, x, dump_dir=tmp_path), expected, atol=1e-5, rtol=1e-5)
    assert "fused_moe" not in dumped(tmp_path, "*final.py")
    assert reason in dumped(tmp_path, "report.md")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gpu_compiled_block_runs_the_triton_kernel(arch, tmp_path):
    block = moe_block(arch, torch.bfloat16).cuda()
    x = torch.randn(3, 40, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = block(x).double()
        exact = copy.deepcopy(block).float()(x.float()).double()
    out = compile_and_run(block, x, dump_dir=tmp_path).double()
    # the kernel keeps gate/up/down products in fp32 where eager rounds each to bf16: the two round
    # differently, so the compiled block is held to eager bf16's own distance from the fp32 block
    eager_err, compiled_err = (eager - exact).abs().max().item(), (out - exact).abs().max().item()
    assert compiled_err <= 2 * eager_err + 1e-2, (compiled_err, eager_err)
    assert dumped(tmp_path, "*final.py").count("torch.ops.fusecc.fused_moe.default(") == 1
