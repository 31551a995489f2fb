"""GPU: transformers models at realistic sizes compiled to generated kernels match eager in bf16."""

import pytest
import torch

from tests.codegen.model_zoo import FAMILIES, build

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_bf16_logits_match_eager(family, dynamic, tmp_path):
    model = build(family, hidden=1024, layers=4, heads=16, kv_heads=4, vocab=32000,
                  dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="fusecc", dynamic=dynamic,
                             options={"strict": True, "freeze": True, "dump_dir": str(tmp_path)})
    for batch, seq in ((2, 128), (1, 77)):
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        with torch.inference_mode():
            expected = model(ids).logits.float()
            actual = compiled(ids).logits.float()
        rel = ((actual - expected).norm() / expected.norm()).item()
        assert rel < 1e-2, f"{family} dynamic={dynamic} {batch}x{seq}: relative error {rel}"
    reports = list(tmp_path.glob("*/kernels/*.py"))
    assert reports, "no generated kernels in the dump"


@pytest.mark.gpu
def test_gpu_bool_add_is_logical_or():
    # the interpreter adds numpy bools as a logical or; Triton on a GPU adds int1 values in int1
    a = torch.tensor([True, False, True, False], device="cuda")
    b = torch.tensor([True, True, False, False], device="cuda")
    torch._dynamo.reset()
    fn = lambda a, b: ((a + b), (a + b).float() * 2)  # noqa: E731
    got = torch.compile(fn, backend="fusecc", options={"codegen": "triton", "strict": True})(a, b)
    assert torch.equal(got[0], a + b) and torch.equal(got[1], (a + b).float() * 2)
