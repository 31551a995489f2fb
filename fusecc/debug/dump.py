"""Per-graph dump folders (FUSECC_DUMP_DIR/<graph>/):

    00.dynamo.py            the graph Dynamo captured (torch IR)
    01.aten.py              after AOTAutograd capture (ATen inference graph)
    NN.<pass>[.roundR].py   after each pass that changed the graph
    NN.final.py             what runs
    report.md / report.json per-pass time, op counts before/after, rule matches, notes

Nothing is written, and no folder made, when dumping is off (callers then hold `None`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch.fx as fx


class GraphDump:
    def __init__(self, folder: Path):
        self.folder = folder
        self.step = 0
        self.notes: list[str] = []
        self.facts: dict = {}  # structured figures later stages add to report.json
        self.seconds = 0.0     # spent writing this dump (it is part of the compile's wall time)

    @staticmethod
    def create(root: str, prefix: str = "graph") -> Optional["GraphDump"]:
        """A fresh numbered folder under `root`, or None when dumping is off."""
        if not root:
            return None
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
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def write_graph(self, label: str, gm: fx.GraphModule) -> Path:
        start = time.perf_counter()
        text = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        # AOTAutograd's graph modules are named "<lambda>": make the dump parseable Python.
        text = re.sub(r"^(\s*)class <(\w*)>\(", lambda m: f"{m.group(1)}class {m.group(2) or 'Graph'}_graph(",
                      text, flags=re.M)
        self.seconds += time.perf_counter() - start
        return self.write_text(f"{label}.py", f"# {label}: {_op_count(gm)} ops\n{text}")

    def write_text(self, name: str, text: str) -> Path:
        start = time.perf_counter()
        path = self.folder / f"{self.step:02d}.{name}"
        self.step += 1
        path.write_text(text)
        self.seconds += time.perf_counter() - start
        return path

    def note(self, message: str) -> None:
        """Something a compiler engineer should know about this graph (fallbacks, skipped options)."""
        self.notes.append(message)

    def write_file(self, relative: str, text: str) -> Path:
        start = time.perf_counter()
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.seconds += time.perf_counter() - start
        return path

    def write_report(self, report: dict) -> None:
        report = dict(report, notes=list(self.notes), **self.facts)
        (self.folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (self.folder / "report.md").write_text(render_report_markdown(report))


def _op_count(gm: fx.GraphModule) -> int:
    # imported here: `fusecc dump` reads reports through this module and need not load the passes
    from fusecc.passes.pipeline import count_ops

    return count_ops(gm)


def render_report_markdown(report: dict) -> str:
    lines = [f"# {report['graph']}", ""]
    if report.get("status") == "unoptimized":
        lines.append("- **runs unoptimized** (as Dynamo captured it; see the notes below)")
    lines.append(f"- compile time: {report['compile_seconds'] * 1000:.1f} ms" + _phases_text(report.get("phase_seconds")))
    lines.append(f"- inputs: {report['num_inputs']} ({report.get('num_frozen', 0)} frozen as constants)")
    lines.append(f"- ATen ops: {report['ops_aten']} -> {report['ops_final']} after passes")
    lines.append(f"- options: `{report['options']}`")
    lines += ["", "## Passes", "", "| # | pass | round | time (ms) | ops before | ops after | what it did |",
              "|---|---|---|---|---|---|---|"]
    for i, rec in enumerate(report["passes"]):
        did = ", ".join(f"{k}={v}" for k, v in sorted(rec["stats"].items())) or "no change"
        lines.append(f"| {i} | {rec['name']} | {rec['round']} | {rec['seconds'] * 1000:.2f} | "
                     f"{rec['ops_before']} | {rec['ops_after']} | {did} |")
    lines += ["", "## Op counts (ATen graph -> final graph)", "", "| op | before | after |", "|---|---|---|"]
    before, after = report["op_histogram_aten"], report["op_histogram_final"]
    for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), o)):
        lines.append(f"| {op} | {before.get(op, 0)} | {after.get(op, 0)} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _phases_text(phases: Optional[dict]) -> str:
    if not phases:
        return ""
    return " (" + ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in phases.items()) + ")"


def _summary_row(report: dict) -> tuple:
    changed = [r for r in report["passes"] if r.get("modified", bool(r["stats"]))]
    rules: dict[str, int] = {}
    for rec in report["passes"]:
        for key, value in rec["stats"].items():
            rules[key] = rules.get(key, 0) + value
    top = ", ".join(f"{k}={v}" for k, v in sorted(rules.items(), key=lambda kv: -kv[1])[:4])
    return (report["graph"], report.get("status", "compiled"), str(report["ops_aten"]), str(report["ops_final"]),
            f"{len(changed)}/{len(report['passes'])}", f"{report['compile_seconds'] * 1000:.0f}",
            str(len(report.get("notes", []))), top or "-")


def summarize_dump_dir(root: str) -> str:
    """The table `fusecc dump DIR` prints: one row per compiled graph."""
    rows = []
    for report_path in sorted(Path(root).glob("*/report.json")):
        try:
            rows.append(_summary_row(json.loads(report_path.read_text())))
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
