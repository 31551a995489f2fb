"""Compile a function with fusecc's Triton codegen (interpreter on CPU) and read back what it generated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Compiled:
    outputs: object
    kernels: dict[str, str]      # Triton kernel name (structural) -> source; groups of one structure share one
    wrapper: str
    report: dict
    dump_dir: Path


def compile_and_run(fn, *args, tmp_path: Path, dynamic=False, options=None, **kwargs) -> Compiled:
    dump = tmp_path / "dump"
    opts = {"codegen": "triton", "strict": True, "dump_dir": str(dump), **(options or {})}
    compiled = torch.compile(fn, backend="fusecc", dynamic=dynamic, options=opts)
    with torch.no_grad():
        out = compiled(*args, **kwargs)
    return Compiled(out, *read_dump(dump), dump)


def read_dump(dump: Path, graph_index: int = -1):
    graphs = sorted(p for p in dump.iterdir() if (p / "report.json").exists())
    graph = graphs[graph_index]
    kernels = {}
    for path in sorted((graph / "kernels").glob("*.py")) if (graph / "kernels").exists() else []:
        # kernels/<group>.py starts "# <group>: Triton kernel <name>", then the source
        header, source = path.read_text().split("\n", 1)
        assert header.startswith(f"# {path.stem}: Triton kernel "), header
        kernels[header.rsplit(" ", 1)[1]] = source
    wrapper = next(graph.glob("*.wrapper.py")).read_text()
    report = json.loads((graph / "report.json").read_text())
    return kernels, wrapper, report


def assert_close(actual, expected, tol=1e-5):
    if isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_close(a, e, tol)
        return
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
