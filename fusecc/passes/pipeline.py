"""Running the ordered pass list: fixed-point rounds of the cheap passes, verification after
each pass, timing and stats for the report, and a dump of every graph a pass changed."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from fusecc.debug.dump import NoDump
from fusecc.graph.op_counts import count_ops
from fusecc.passes.base import GraphPass
from fusecc.passes.verifier import OutputSignature, verify_graph


@dataclass
class PassRecord:
    name: str
    round: int
    seconds: float
    ops_before: int
    ops_after: int
    modified: bool
    stats: Counter = field(default_factory=Counter)
    refusals: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "round": self.round, "seconds": self.seconds, "ops_before": self.ops_before,
                "ops_after": self.ops_after, "modified": self.modified, "stats": dict(self.stats),
                "refusals": [vars(r) for r in self.refusals]}


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[GraphPass],
    *,
    max_rounds: int = 4,
    verify: bool = True,
    dump: NoDump = NoDump(),
) -> list[PassRecord]:
    """Run `passes` in order. Passes with `repeat_to_fixed_point` form rounds that repeat until
    a whole round changes nothing (at most `max_rounds`); the others run once, in place."""
    records: list[PassRecord] = []
    index = 0
    while index < len(passes):
        group = []
        while index < len(passes) and passes[index].repeat_to_fixed_point:
            group.append(passes[index])
            index += 1
        if group:
            for round_number in range(max_rounds):
                changed = [_run_one(gm, p, round_number, verify, dump, records) for p in group]
                if not any(changed):
                    break
        if index < len(passes):
            _run_one(gm, passes[index], 0, verify, dump, records)
            index += 1
    return records


def _run_one(gm, graph_pass: GraphPass, round_number: int, verify: bool, dump, records: list) -> bool:
    before_sig = OutputSignature.of(gm) if verify else None
    ops_before = count_ops(gm)
    start = time.perf_counter()
    result = graph_pass.run(gm)
    seconds = time.perf_counter() - start
    assert result.graph_module is gm, f"pass {graph_pass.name} must rewrite the graph module in place"
    if verify:
        verify_graph(gm, before_sig, graph_pass.name)
    record = PassRecord(graph_pass.name, round_number, seconds, ops_before, count_ops(gm), result.modified,
                        Counter(result.stats), list(result.refusals))
    records.append(record)
    if result.modified:
        dump.write_graph(f"{graph_pass.name}" + (f".round{round_number}" if round_number else ""), gm)
    return result.modified
