"""What every pass is: `run(gm) -> PassResult(gm, modified, stats)`.

Modelled on torch.fx's `PassBase`: a pass is an object with a `name`, configured in its
constructor, and `run` is called with the graph module to rewrite in place. `stats` holds
counters a compiler engineer wants in the report ("rule:mul_by_one": 3, "folded": 12).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: Counter = field(default_factory=Counter)
    # rewrites a pass found but refused as unsafe (rewrite_engine.Refusal), listed in the report
    refusals: list = field(default_factory=list)


class GraphPass:
    """Base class: subclasses set `name` and implement `run`."""

    name: str = "unnamed"
    # Cheap passes are repeated in the fixed-point loop; expensive ones run once.
    repeat_to_fixed_point: bool = True

    def run(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
