"""Differential sweep over PyTorch's OpInfo database: each op's first sample inputs (fp32, CPU),
compiled with backend="fusecc" (strict) under no_grad, must equal eager.

One test per op. Ops listed in opinfo_known_failures.txt must still fail (strict xfail): when
one starts passing, remove it from the file. The second sample usually has other shapes, so
Dynamo recompiles it with dynamic shapes (automatic dynamic): both static and symbolic graphs
go through the passes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402  (slow import, ~3 s)

KNOWN_FAILURES_FILE = Path(__file__).with_name("opinfo_known_failures.txt")
SAMPLES_PER_OP = 2
MAX_SAMPLE_NUMEL = 20_000  # elements over all tensors of one sample
TOL = dict(rtol=1e-5, atol=1e-5)

# Name fragments of ops that draw random numbers or return uninitialised memory: eager and
# compiled results differ by design.
NONDETERMINISTIC = ("dropout", "rand", "normal", "bernoulli", "multinomial", "uniform", "poisson",
                    "exponential", "geometric", "cauchy", "log_normal", "rrelu", "empty")

# Ops for which Dynamo hands the backend no graph at all (a graph break before any tensor op:
# data-dependent output shapes, Python-level control flow on values, sparse layouts, or an
# OpInfo wrapper Dynamo cannot trace). Nothing of fusecc would be tested; the same happens
# with backend="aot_eager".
DYNAMO_COMPILES_NOTHING = {
    "item", "allclose", "equal", "combinations", "corrcoef", "cov", "masked_select", "nonzero",
    "argwhere", "unique", "unique_consecutive", "tensor_split", "resize_", "resize_as_", "to_sparse",
    "sparse.sampled_addmm", "sparse.mm.reduce", "svd_lowrank", "pca_lowrank",
    "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
    "nn.functional.scaled_dot_product_attention",  # OpInfo wrapper breaks the graph; see test_backend.py
    "nn.functional.multi_head_attention_forward", "nn.functional.ctc_loss",
    "nn.functional.gaussian_nll_loss", "linalg.lstsq", "linalg.lstsq.grad_oriented",
}


def op_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def select_ops() -> list:
    selected = {}
    for op in op_db:
        name = op_id(op)
        if name in selected or name in DYNAMO_COMPILES_NOTHING:
            continue
        if "jiterator" in op.name:  # CUDA-only
            continue
        if any(fragment in op.name for fragment in NONDETERMINISTIC):
            continue
        if not op.supports_dtype(torch.float32, "cpu"):
            continue
        selected[name] = op
    return list(selected.values())


def load_known_failures() -> dict[str, str]:
    known = {}
    for line in KNOWN_FAILURES_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(":")
        assert reason.strip(), f"{KNOWN_FAILURES_FILE.name}: {name!r} needs a one-line reason"
        known[name.strip()] = reason.strip()
    return known


OPS = select_ops()
KNOWN_FAILURES = load_known_failures()


def _numel(sample) -> int:
    leaves, _ = tree_flatten([sample.input, sample.args, sample.kwargs])
    return sum(x.numel() for x in leaves if isinstance(x, torch.Tensor))


def small_samples(op) -> list:
    torch.manual_seed(0)
    samples = []
    for sample in op.sample_inputs("cpu", torch.float32, requires_grad=False):
        if _numel(sample) <= MAX_SAMPLE_NUMEL:
            samples.append(sample)
        if len(samples) == SAMPLES_PER_OP:
            break
    return samples


def _clone(tree):
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, tree)


def _tensors(tree) -> list:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def check_op(op, dump_dir: str) -> None:
    """Raises if fusecc differs from eager on any sample (outputs, or inputs the op mutates)."""
    samples = small_samples(op)
    assert samples, f"no sample of {op_id(op)} has at most {MAX_SAMPLE_NUMEL} elements"
    fn = op.op

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    compiled = torch.compile(call, backend="fusecc", options={"strict": True, "dump_dir": dump_dir})
    for sample in samples:
        eager_args = _clone([sample.input, *sample.args])
        fusecc_args = _clone(eager_args)
        with torch.no_grad():
            expected = call(*eager_args, **sample.kwargs)
            actual = compiled(*fusecc_args, **sample.kwargs)
        torch.testing.assert_close(actual, expected, equal_nan=True, **TOL)
        # inputs the op mutates must be mutated the same way
        torch.testing.assert_close(_tensors(fusecc_args), _tensors(eager_args), equal_nan=True, **TOL)


pytestmark = pytest.mark.usefixtures("plain_cpu_user")


@pytest.mark.parametrize("op", OPS, ids=[op_id(op) for op in OPS])
def test_op_matches_eager(op):
    name = op_id(op)
    with tempfile.TemporaryDirectory(prefix="fusecc-opinfo-") as dump_dir:
        try:
            check_op(op, dump_dir)
            error = None
        except Exception as exc:  # noqa: BLE001  (any failure: compile error or mismatch)
            error = exc
        reports = [json.loads(p.read_text()) for p in Path(dump_dir).glob("graph_*/report.json")]
    if name in KNOWN_FAILURES:
        if error is None:
            pytest.fail(f"{name} passes now: remove it from {KNOWN_FAILURES_FILE.name}")
        return
    if error is not None:
        raise error
    # The op really went through fusecc (not run eagerly after a graph break). Older torch (the GPU
    # machine's 2.11) breaks the graph on a few ops 2.13 captures (quantile): its result was still
    # checked above, against eager.
    if not reports and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip(f"Dynamo {torch.__version__} does not capture {name}")
    assert reports, f"fusecc compiled no graph for {name}"
    assert all(r["status"] == "compiled" for r in reports)


def test_sweep_covers_enough_ops():
    distinct = {op.name for op in OPS}
    assert len(distinct) >= 150, len(distinct)
    assert len(KNOWN_FAILURES) <= 10, "the known-failures list must stay short"


def test_known_failures_name_swept_ops():
    names = {op_id(op) for op in OPS}
    stale = sorted(set(KNOWN_FAILURES) - names)
    assert not stale, f"{KNOWN_FAILURES_FILE.name} lists ops the sweep does not run: {stale}"
