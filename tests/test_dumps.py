"""Pass dumps: the folder layout README.md documents, readable graph files, `fusecc dump`,
and nothing written when dumping is off."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from fusecc.config import FuseccOptions
from fusecc.passes import build_pipeline

FUSECC_CLI = str(Path(sys.executable).parent / "fusecc")
PASS_NAMES = {p.name for p in build_pipeline(FuseccOptions())}
GRAPH_FILE = re.compile(r"^(\d\d)\.([a-z_]+)(?:\.round(\d+))?\.py$")


pytestmark = pytest.mark.usefixtures("plain_cpu_user")


def simplifiable(x, w):
    # x*1, -0 and t().t() are rewritten by algebraic simplification; the dead ops removed by DCE.
    y = (x * 1 - 0) @ w.t().t()
    return torch.relu(y).sum(-1)


def compile_and_check(fn, args, dump_dir, **kwargs):
    compiled = torch.compile(fn, backend="fusecc", options={"dump_dir": str(dump_dir), "strict": True}, **kwargs)
    with torch.no_grad():
        expected = fn(*args)
        torch.testing.assert_close(compiled(*args), expected, rtol=1e-5, atol=1e-5)


def test_layout_is_as_documented(tmp_path):
    compile_and_check(simplifiable, (torch.randn(4, 8), torch.randn(8, 8)), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["graph_000"]
    folder = tmp_path / "graph_000"
    names = sorted(p.name for p in folder.iterdir())
    report = json.loads((folder / "report.json").read_text())
    assert set(names) - {n for n in names if n.endswith(".py")} == {"report.json", "report.md"}

    graph_files = sorted(n for n in names if n.endswith(".py"))
    parsed = [GRAPH_FILE.match(n) for n in graph_files]
    assert all(parsed), graph_files
    assert [int(m.group(1)) for m in parsed] == list(range(len(graph_files)))  # 00, 01, 02, ... no gaps
    assert graph_files[0] == "00.dynamo.py" and graph_files[1] == "01.aten.py"
    assert parsed[-1].group(2) == "final"
    # One file per pass run that changed the graph, in the order they ran; none for the others.
    middle = [(m.group(2), int(m.group(3) or 0)) for m in parsed[2:-1]]
    changed = [(r["name"], r["round"]) for r in report["passes"] if r["modified"]]
    assert middle == changed
    assert {name for name, _ in middle} <= PASS_NAMES
    assert ("algebraic_simplification", 0) in middle
    unchanged = [r for r in report["passes"] if not r["modified"]]
    assert unchanged, "the last round changes nothing, yet is listed in the report"


def test_report_contents(tmp_path):
    compile_and_check(simplifiable, (torch.randn(4, 8), torch.randn(8, 8)), tmp_path)
    folder = tmp_path / "graph_000"
    report = json.loads((folder / "report.json").read_text())
    aten_text = (folder / "01.aten.py").read_text()
    final_text = next(folder.glob("*.final.py")).read_text()
    # op counts agree with the dumped graphs
    assert report["ops_aten"] == aten_text.count("torch.ops.aten.") == 7
    assert report["ops_final"] == final_text.count("torch.ops.aten.") == 3  # mm, relu, sum
    assert report["op_histogram_aten"]["aten.t"] == 2
    assert "aten.t" not in report["op_histogram_final"] or report["op_histogram_final"]["aten.t"] == 0
    passes = report["passes"]
    assert passes[0]["ops_before"] == report["ops_aten"]
    assert passes[-1]["ops_after"] == report["ops_final"]
    for before, after in zip(passes, passes[1:]):
        assert before["ops_after"] == after["ops_before"]
    for rec in passes:
        assert rec["name"] in PASS_NAMES
        assert isinstance(rec["seconds"], float) and rec["seconds"] >= 0
    simp = [r for r in passes if r["name"] == "algebraic_simplification" and r["round"] == 0][0]
    assert simp["stats"].get("rule:mul_by_one") == 1
    assert simp["stats"].get("rule:sub_zero") == 1
    assert sum(v for k, v in simp["stats"].items() if k.startswith("rule:")) >= 3
    assert report["compile_seconds"] > 0
    phases = report["phase_seconds"]
    assert set(phases) == {"freeze", "passes", "codegen", "kernel precompile", "of which dump writing"}
    assert all(s >= 0 for s in phases.values())
    assert phases["passes"] >= sum(r["seconds"] for r in passes)  # the pass records are inside it
    assert phases["freeze"] + phases["passes"] + phases["codegen"] + phases["kernel precompile"] \
        <= report["compile_seconds"] + 1e-6
    assert 0 < phases["of which dump writing"] < report["compile_seconds"]
    md = (folder / "report.md").read_text()
    assert "- compile time: " in md and "passes " in md and "of which dump writing " in md
    assert "| pass | round | time (ms) | ops before | ops after | what it did |" in md
    assert "rule:mul_by_one=1" in md and "rule:sub_zero=1" in md
    for name in {"dce", "constant_folding", "algebraic_simplification", "cse"}:
        assert f"| {name} |" in md


@pytest.mark.parametrize("dynamic", [False, True])
def test_graph_files_are_python_with_shapes_and_dtypes(tmp_path, dynamic):
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    compile_and_check(simplifiable, (x, w), tmp_path, dynamic=dynamic)
    for path in sorted((tmp_path / "graph_000").glob("*.py")):
        text = path.read_text()
        ast.parse(text)  # readable Python
        assert text.startswith(f"# {GRAPH_FILE.match(path.name).group(2)}: ")
        if dynamic:
            assert re.search(r'"f32\[s\d+, s\d+\]\[s\d+, 1\]cpu"', text), text  # symbolic shape + strides
        else:
            assert '"f32[4, 8][8, 1]cpu"' in text, text  # shape, strides, device
        assert '"f32[4][1]cpu"' in text or re.search(r'"f32\[s\d+\]\[1\]cpu"', text)


def test_half_precision_dtype_shown(tmp_path):
    fn = lambda x: (x * 2).to(torch.float32)  # noqa: E731
    compile_and_check(fn, (torch.randn(3, 5, dtype=torch.float16),), tmp_path)
    aten = (tmp_path / "graph_000" / "01.aten.py").read_text()
    assert '"f16[3, 5][5, 1]cpu"' in aten and '"f32[3, 5][5, 1]cpu"' in aten


def two_graphs(x):
    y = torch.sin(x) * 1
    torch._dynamo.graph_break()
    return torch.cos(y) - 0


def run_cli(*args):
    return subprocess.run([FUSECC_CLI, *args], capture_output=True, text=True, timeout=120)


def test_fusecc_dump_one_row_per_graph(tmp_path):
    compile_and_check(two_graphs, (torch.randn(5),), tmp_path)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["graph_000", "graph_001"]
    proc = run_cli("dump", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:2] == ["graph", "status"]
    rows = [ln for ln in lines if ln.startswith("graph_")]
    assert [r.split()[0] for r in rows] == folders
    for row, folder in zip(rows, folders):
        report = json.loads((tmp_path / folder / "report.json").read_text())
        cells = row.split()
        assert cells[1] == "compiled"
        assert cells[2:4] == [str(report["ops_aten"]), str(report["ops_final"])]
    assert "rule:mul_by_one=1" in rows[0] and "rule:sub_zero=1" in rows[1]
    assert "2 graph(s)" in proc.stdout


def test_fusecc_dump_empty_folder(tmp_path):
    proc = run_cli("dump", str(tmp_path))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"no fusecc dumps under {tmp_path} (expected <graph>/report.json folders)"


def test_fusecc_dump_missing_folder(tmp_path):
    proc = run_cli("dump", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert "is not a folder" in proc.stderr and not proc.stdout


def test_unoptimized_graph_is_reported(tmp_path):
    """A graph that falls back (here: needs autograd) still gets a report saying so."""
    w = torch.randn(8, 8, requires_grad=True)
    compiled = torch.compile(simplifiable, backend="fusecc", options={"dump_dir": str(tmp_path)})
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="needs autograd"):
        out = compiled(x, w)
    torch.testing.assert_close(out, simplifiable(x, w))
    report = json.loads((tmp_path / "graph_000" / "report.json").read_text())
    assert report["status"] == "unoptimized"
    assert any("autograd" in n for n in report["notes"])
    proc = run_cli("dump", str(tmp_path))
    assert "unoptimized" in proc.stdout


def test_nothing_written_when_dumping_is_off(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    tmp = tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    assert "FUSECC_DUMP_DIR" not in os.environ
    fn = torch.compile(simplifiable, backend="fusecc", options={"strict": True})
    with torch.no_grad():
        fn(torch.randn(4, 8), torch.randn(8, 8))
    fn2 = torch.compile(two_graphs, backend="fusecc", options={"dump_dir": ""})
    with torch.no_grad():
        fn2(torch.randn(3))
    assert list(cwd.iterdir()) == []
    assert list(tmp.iterdir()) == []


def test_dump_folders_are_numbered_per_graph_across_compiles(tmp_path):
    compile_and_check(simplifiable, (torch.randn(4, 8), torch.randn(8, 8)), tmp_path)
    torch._dynamo.reset()
    compile_and_check(simplifiable, (torch.randn(4, 8), torch.randn(8, 8)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_000", "graph_001"]


def test_fusecc_dump_reports_an_unreadable_report_and_goes_on(tmp_path):
    compile_and_check(two_graphs, (torch.randn(5),), tmp_path)
    (tmp_path / "graph_000" / "report.json").write_text('{"graph": "graph_000", "ops')  # cut short
    (tmp_path / "graph_002").mkdir()
    (tmp_path / "graph_002" / "report.json").write_text('{"graph": "graph_002"}')  # partial
    proc = run_cli("dump", str(tmp_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.startswith("graph_")}
    assert "unreadable" in rows["graph_000"] and "unreadable" in rows["graph_002"]
    assert "compiled" in rows["graph_001"]


def test_unoptimized_graph_counts_method_calls(tmp_path):
    # a graph that runs as Dynamo captured it holds call_method nodes (relu(), sin()), not only functions
    lin = torch.nn.Linear(8, 8)
    fn = lambda x: lin(x).relu().sin()  # noqa: E731
    compiled = torch.compile(fn, backend="fusecc", options={"dump_dir": str(tmp_path)})
    with pytest.warns(UserWarning, match="needs autograd"):
        compiled(torch.randn(2, 8))
    report = json.loads((tmp_path / "graph_000" / "report.json").read_text())
    assert report["status"] == "unoptimized" and report["ops_final"] == 3, report["op_histogram_final"]


def test_bad_options_are_errors_not_fallbacks(tmp_path):
    fn = lambda x: x * 2  # noqa: E731
    with pytest.raises(Exception, match="disable_passes.*csee"):
        torch.compile(fn, backend="fusecc", options={"disable_passes": ("csee",)})(torch.randn(3))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="fusion belongs to code generation"):
        torch.compile(fn, backend="fusecc", options={"disable_passes": ("fusion",)})(torch.randn(3))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="TRITON_INTERPRET=1"):  # plain_cpu_user: no interpreter
        torch.compile(fn, backend="fusecc", options={"codegen": "triton"})(torch.randn(3))
