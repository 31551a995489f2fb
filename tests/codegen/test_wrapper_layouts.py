"""ATen results read by generated kernels are laid out as their fake values say: kernels index
them with the fake strides, and some real ops return another layout."""

import torch

from fusecc.codegen.wrapper import fit_strides
from tests.codegen.compile_helpers import compile_and_run


def test_floor_divide_of_a_transposed_operand_is_read_in_the_right_order(tmp_path):
    # floor_divide runs as ATen; on CPU it returns strides (3, 1) where the fake value says (1, 4)
    fn = lambda a, b: torch.floor_divide(a, b.t()) + 1  # noqa: E731
    a, b = torch.arange(12, dtype=torch.float32).reshape(4, 3) * 7, torch.full((3, 4), 2.0)
    got = compile_and_run(fn, a, b, tmp_path=tmp_path)
    assert torch.equal(got.outputs, fn(a, b))
    assert "fit_strides(" in got.wrapper


def test_copysign_of_expanded_bools_feeding_a_kernel(tmp_path):
    fn = lambda a, b: torch.copysign(a, b.mT).to(torch.int32)  # noqa: E731
    a = torch.tensor([[True], [False], [True], [False]]).expand(4, 3)
    b = torch.ones(3, 4, dtype=torch.bool)
    got = compile_and_run(fn, a, b, tmp_path=tmp_path)
    assert torch.equal(got.outputs, fn(a, b))


def test_matmul_results_are_not_checked(tmp_path):
    fn = lambda x, w: (x @ w).relu()  # noqa: E731
    x, w = torch.randn(4, 8), torch.randn(8, 5)
    got = compile_and_run(fn, x, w, tmp_path=tmp_path)
    torch.testing.assert_close(got.outputs, fn(x, w))
    assert "fit_strides(" not in got.wrapper  # mm's layout is the fake one by construction


def test_fit_strides_copies_only_on_a_mismatch():
    t = torch.randn(3, 4)
    assert fit_strides(t, (3, 4), (4, 1)) is t
    row = t[:1]
    assert fit_strides(row, (1, 4), (999, 1)) is row  # a size-1 dim's stride does not matter
    moved = fit_strides(t, (3, 4), (1, 3))
    assert moved.stride() == (1, 3) and torch.equal(moved, t)
