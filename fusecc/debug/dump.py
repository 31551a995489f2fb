"""Per-graph dump folders (FUSECC_DUMP_DIR/<graph>/):

    00.dynamo.py            the graph Dynamo captured (torch IR)
    01.aten.py              after AOTAutograd capture (ATen inference graph)
    NN.<pass>[.roundR].py   after each pass that changed the graph
    NN.final.py             what runs
    NN.wrapper.py           the generated call function; kernels/<kernel_N>.py its Triton kernels
    report.md / report.json per-pass time, op counts before/after, rule matches, notes

`GraphDump.create(root)` returns a `NoDump` when dumping is off: every stage calls the same
methods either way, and nothing is written, no folder made, when they go to a NoDump.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch.fx as fx

from fusecc.debug.report import CompileReport, render_report_markdown, sorted_notes, summary_row
from fusecc.graph.op_counts import count_ops


class NoDump:
    """Dumping is off: every write is dropped."""

    enabled = False
    seconds = 0.0  # time spent writing: none

    def write_graph(self, label: str, gm: fx.GraphModule) -> None:
        pass

    def write_text(self, name: str, text: str) -> None:
        pass

    def write_file(self, relative: str, text: str) -> None:
        pass

    def note(self, message: str, kind: str = "info") -> None:
        pass

    def write_report(self, report: CompileReport) -> None:
        pass

    def discard(self) -> None:
        pass


class GraphDump(NoDump):
    enabled = True

    def __init__(self, folder: Path):
        self.folder = folder
        self.step = 0
        self.notes: list[tuple[str, str]] = []  # (kind, message); kinds in report.NOTE_KINDS
        self.seconds = 0.0  # spent writing this dump (it is part of the compile's wall time)

    @staticmethod
    def create(root: str, prefix: str = "graph") -> NoDump:
        """A fresh numbered folder under `root`, or a NoDump when dumping is off."""
        if not root:
            return NoDump()
        base = Path(root)
        base.mkdir(parents=True, exist_ok=True)
        index = 0
        while True:
            folder = base / f"{prefix}_{index:03d}"
            try:
                folder.mkdir()  # exclusive: concurrent compilations get distinct folders
                return GraphDump(folder)
            except FileExistsError:
                index += 1

    def discard(self) -> None:
        """Remove this graph's folder: Dynamo restarted the trace, and the graph it
        compiles next gets a folder of its own."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def write_graph(self, label: str, gm: fx.GraphModule) -> None:
        start = time.perf_counter()
        text = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        # AOTAutograd's graph modules are named "<lambda>": make the dump parseable Python.
        text = re.sub(r"^(\s*)class <(\w*)>\(", lambda m: f"{m.group(1)}class {m.group(2) or 'Graph'}_graph(",
                      text, flags=re.M)
        self.seconds += time.perf_counter() - start
        self.write_text(f"{label}.py", f"# {label}: {count_ops(gm)} ops\n{text}")

    def write_text(self, name: str, text: str) -> None:
        """A numbered file: NN.<name>, in the order the stages wrote them."""
        self.write_file(f"{self.step:02d}.{name}", text)
        self.step += 1

    def write_file(self, relative: str, text: str) -> None:
        start = time.perf_counter()
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.seconds += time.perf_counter() - start

    def note(self, message: str, kind: str = "info") -> None:
        """Something a compiler engineer should know about this graph (fallbacks, skipped options)."""
        self.notes.append((kind, message))

    def write_report(self, report: CompileReport) -> None:
        report.notes = sorted_notes(self.notes)
        data = report.to_json()
        (self.folder / "report.json").write_text(json.dumps(data, indent=2, default=str))
        (self.folder / "report.md").write_text(render_report_markdown(data))


def summarize_dump_dir(root: str) -> str:
    """The table `fusecc dump DIR` prints: one row per compiled graph."""
    rows = []
    for report_path in sorted(Path(root).glob("*/report.json")):
        try:
            rows.append(summary_row(json.loads(report_path.read_text())))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a report cut short or hand-edited
            rows.append((report_path.parent.name, "unreadable", "-", "-", "-", "-", "-",
                         f"report.json: {type(exc).__name__}: {exc}"[:80]))
    if not rows:
        return f"no fusecc dumps under {root} (expected <graph>/report.json folders)"
    header = ("graph", "status", "aten ops", "final ops", "passes changed", "compile ms", "notes", "top matches")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    out.append("")
    out.append(f"{len(rows)} graph(s); details in {os.path.join(root, '<graph>', 'report.md')}")
    return "\n".join(out)
