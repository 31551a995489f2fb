"""A fresh process with a warm compile cache: what it traces, what it generates, how fast its first call is.

Each test runs tests/compile_cache/child.py twice (cold, then warm) in new processes sharing one
FUSECC_CACHE_DIR, and compares with the eager model the child runs itself. The generated-kernel
path and the engine are checked in one process (test_graph_cache.py), which is cheaper.
"""

import pytest

from tests.compile_cache.warm_start import run_child

pytestmark = pytest.mark.slow

def test_aot_compiled_function_traces_nothing_when_warm(tmp_path):
    cold, _ = run_child(tmp_path, "aot", {"freeze": True})
    assert cold["fusecc"].get("function_stores") == 1, cold
    assert cold["fusecc"].get("aten_traces") == 1 and cold["dynamo"]["stats"]["unique_graphs"] == 1, cold
    warm, _ = run_child(tmp_path, "aot", {"freeze": True})
    assert warm["fusecc"] == {"function_hits": 1}, warm
    # no Dynamo frame, graph or AOTAutograd trace was counted in the warm process
    assert warm["dynamo"] == {}, warm["dynamo"]
    for report in (cold, warm):
        assert report["max_abs_diff"] < 1e-5, report
    fraction = warm["first_call_s"] / cold["first_call_s"]
    if fraction > 0.3:  # a busy machine: one more warm run, the faster counts
        again, _ = run_child(tmp_path, "aot", {"freeze": True})
        fraction = min(warm["first_call_s"], again["first_call_s"]) / cold["first_call_s"]
    assert fraction <= 0.3, (f"warm first call {warm['first_call_s']:.2f} s is {fraction:.0%} of the cold "
                             f"{cold['first_call_s']:.2f} s")


def test_torch_compile_skips_aot_autograd_and_passes_when_warm(tmp_path):
    """torch.compile(backend="fusecc"): Dynamo traces (it finds the graph), fusecc loads the
    stored program instead of tracing with AOTAutograd, running its passes and lowering."""
    cold, _ = run_child(tmp_path, "backend", {"freeze": True})
    assert cold["fusecc"].get("graph_stores") == 1 and cold["fusecc"].get("codegen_runs") == 1, cold
    warm, _ = run_child(tmp_path, "backend", {"freeze": True})
    assert warm["fusecc"] == {"backend_calls": 1, "graph_hits": 1}, warm
    assert "aot_autograd" not in warm["dynamo"], warm["dynamo"]
    for report in (cold, warm):
        assert report["max_abs_diff"] < 1e-5, report


@pytest.mark.gpu
def test_gpu_warm_start_loads_generated_kernels_under_cuda_graphs(tmp_path):
    """On the GPU the stored graph is the generated wrapper and its Triton kernels, replayed from a
    CUDA graph: loaded in a fresh process, nothing traced, same logits as eager."""
    options = {"freeze": True, "cudagraphs": True, "strict": True}
    cold, _ = run_child(tmp_path, "aot", options, CHILD_DEVICE="cuda")
    assert cold["fusecc"].get("function_stores") == 1 and list((tmp_path / "kernels").glob("*.py")), cold
    warm, _ = run_child(tmp_path, "aot", options, CHILD_DEVICE="cuda")
    assert warm["fusecc"] == {"function_hits": 1} and warm["dynamo"] == {}, warm
    for report in (cold, warm):
        assert report["max_abs_diff"] < 1e-4, report
    assert warm["first_call_s"] <= 0.3 * cold["first_call_s"], (warm["first_call_s"], cold["first_call_s"])
