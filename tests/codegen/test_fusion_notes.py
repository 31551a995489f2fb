"""What the dump says about fusion: a kernel has one name (kernel_N) in the fusion notes, the
wrapper and kernels/; a fusion refused for a cycle names the producer; notes come grouped, the
ones that explain lost performance first, and sorted naturally."""

import json
import re

import torch

from tests.codegen.compile_helpers import assert_close, compile_and_run


def sin_then_matmul_then_add(x, w):
    y = torch.sin(x)
    z = y @ w        # a matmul: an extern call between y's kernel and the add
    return y + z     # fusing the add into sin's kernel would run it before the matmul it reads


def test_a_cycle_note_names_the_producer_and_comes_first(tmp_path):
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    got = compile_and_run(sin_then_matmul_then_add, x, w, tmp_path=tmp_path)
    assert_close(got.outputs, sin_then_matmul_then_add(x, w))
    by_kind = got.report["notes_by_kind"]
    (cycle,) = by_kind["cycle"]
    assert re.match(r"not fused: add: fusing with the group of its producer sin \(sin\) would create a cycle", cycle)
    kinds = list(by_kind)
    assert kinds.index("cycle") < kinds.index("info")
    assert got.report["notes"][0] == cycle  # the flat list is in the same order
    md = (next(tmp_path.glob("dump/*/report.md"))).read_text()
    assert md.index("### cycle") < md.index("### info")


def test_a_kernel_has_one_name_in_notes_wrapper_and_kernels_folder(tmp_path):
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    got = compile_and_run(sin_then_matmul_then_add, x, w, tmp_path=tmp_path)
    graph = next(tmp_path.glob("dump/*/"))
    files = sorted(p.stem for p in (graph / "kernels").glob("*.py"))
    assert files == ["kernel_0", "kernel_1"]  # sin, and the add on its own
    for name in files:
        assert re.search(rf"^\s+if .*: {name}\[", got.wrapper, re.M), got.wrapper  # launched by that name
        assert f"#   {name}: kernels/{name}.py (Triton fused_pointwise_" in got.wrapper
    final = next(graph.glob("*.final.py")).read_text()
    assert "self.kernel_0(" in final and "self.kernel_1(" in final  # the fused graph calls the same names


def test_notes_are_sorted_naturally_within_a_kind(tmp_path):
    # twelve views of a materialised tensor, each noted "not fused": view_2 before view_10
    def many_views(x, w):
        m = x @ w
        return [m.view(64)[i:i + 2] * 2 for i in range(12)]

    got = compile_and_run(many_views, torch.randn(8, 8), torch.randn(8, 8), tmp_path=tmp_path)
    names = [re.match(r"not fused: (\S+):", n).group(1) for n in got.report["notes_by_kind"]["not fused"]]
    numbered = [n for n in names if re.search(r"_\d+$", n)]
    key = [(re.sub(r"_\d+$", "", n), int(re.search(r"_(\d+)$", n).group(1))) for n in numbered]
    assert key == sorted(key), names
    assert json.loads(json.dumps(got.report))  # report.json stays plain JSON
