"""The per-graph compile report (report.json / report.md): one schema for compiled graphs and
for graphs that run unoptimized, built by the backend and rendered here.

Notes are grouped by kind, the ones that explain lost performance first (fallbacks to ATen,
fusions blocked by cycles), and sorted naturally inside a group (`_unsafe_view_3` before
`_unsafe_view_10`), so "why is this op not fused?" is answered near the top.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

# Note kinds in the order report.md lists them.
NOTE_KINDS = ("fallback", "cycle", "not fused", "freeze", "info")


@dataclass
class CompileReport:
    graph: str
    status: str                      # "compiled" | "unoptimized"
    compile_seconds: float
    num_inputs: int
    options: str
    ops_aten: int | str              # "-" when the graph never reached ATen
    ops_final: int
    num_frozen: int = 0
    num_sdpa_kept_whole: int = 0
    # where the time went, in ms in report.md; every phase includes writing its part of the dump
    phase_seconds: dict = field(default_factory=dict)
    passes: list = field(default_factory=list)       # PassRecord dicts, in the order they ran
    op_histogram_aten: dict = field(default_factory=dict)
    op_histogram_final: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)        # [kind, message] pairs, grouped and sorted
    codegen: dict = field(default_factory=dict)      # kernel launches, extern calls, fallbacks per call

    def to_json(self) -> dict:
        data = asdict(self)
        data["notes"] = [message for _, message in self.notes]
        data["notes_by_kind"] = {kind: [m for k, m in self.notes if k == kind]
                                 for kind in NOTE_KINDS if any(k == kind for k, _ in self.notes)}
        return data


def natural_key(text: str) -> list:
    """Sort key that orders the numbers inside names by value: view_3 < view_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def sorted_notes(notes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rank = {kind: i for i, kind in enumerate(NOTE_KINDS)}
    return sorted(notes, key=lambda kn: (rank.get(kn[0], len(NOTE_KINDS)), natural_key(kn[1])))


def render_report_markdown(report: dict) -> str:
    lines = [f"# {report['graph']}", ""]
    if report.get("status") == "unoptimized":
        lines.append("- **runs unoptimized** (as Dynamo captured it; see the notes below)")
    lines.append(f"- compile time: {report['compile_seconds'] * 1000:.1f} ms" + _phases_text(report.get("phase_seconds")))
    lines.append(f"- inputs: {report['num_inputs']} ({report.get('num_frozen', 0)} frozen as constants)")
    lines.append(f"- ATen ops: {report['ops_aten']} -> {report['ops_final']} after passes")
    lines.append(f"- options: `{report['options']}`")
    codegen = report.get("codegen") or {}
    if codegen:
        lines.append("- per call: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in codegen.items()))
    lines += ["", "## Passes", "", "| # | pass | round | time (ms) | ops before | ops after | what it did |",
              "|---|---|---|---|---|---|---|"]
    for i, rec in enumerate(report["passes"]):
        did = ", ".join(f"{k}={v}" for k, v in sorted(rec["stats"].items())) or "no change"
        lines.append(f"| {i} | {rec['name']} | {rec['round']} | {rec['seconds'] * 1000:.2f} | "
                     f"{rec['ops_before']} | {rec['ops_after']} | {did} |")
    refusals = [(rec["name"], r) for rec in report["passes"] for r in rec.get("refusals", [])]
    if refusals:
        lines += ["", "## Rewrites refused as unsafe", "", "| pass | rule | node | why |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['rule']} | {r['node']} | {r['why']} |" for name, r in refusals]
    lines += ["", "## Op counts (ATen graph -> final graph)", "", "| op | before | after |", "|---|---|---|"]
    before, after = report["op_histogram_aten"], report["op_histogram_final"]
    for op in sorted(set(before) | set(after), key=lambda o: (-before.get(o, 0), o)):
        lines.append(f"| {op} | {before.get(op, 0)} | {after.get(op, 0)} |")
    by_kind = report.get("notes_by_kind") or ({"info": report["notes"]} if report.get("notes") else {})
    if by_kind:
        lines += ["", "## Notes"]
        for kind, messages in by_kind.items():
            lines += ["", f"### {kind} ({len(messages)})", ""] + [f"- {m}" for m in messages]
    return "\n".join(lines) + "\n"


def _phases_text(phases: Optional[dict]) -> str:
    if not phases:
        return ""
    return " (" + ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in phases.items()) + ")"


def summary_row(report: dict) -> tuple:
    """One row of `fusecc dump DIR`."""
    changed = [r for r in report["passes"] if r.get("modified", bool(r["stats"]))]
    rules: dict[str, int] = {}
    for rec in report["passes"]:
        for key, value in rec["stats"].items():
            rules[key] = rules.get(key, 0) + value
    top = ", ".join(f"{k}={v}" for k, v in sorted(rules.items(), key=lambda kv: -kv[1])[:4])
    return (report["graph"], report.get("status", "compiled"), str(report["ops_aten"]), str(report["ops_final"]),
            f"{len(changed)}/{len(report['passes'])}", f"{report['compile_seconds'] * 1000:.0f}",
            str(len(report.get("notes", []))), top or "-")
