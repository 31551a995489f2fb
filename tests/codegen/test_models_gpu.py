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
