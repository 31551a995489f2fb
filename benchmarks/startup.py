"""Start-up of the engine on a GPU (what `fusecc-serve` does before /health answers 200): how long
construction takes (weights, KV pool, compiling and capturing every step shape), and whether the
first requests of each kind afterwards stall. A request kind that the warm-up missed compiles on
its first occurrence (seconds on a GPU); the second occurrence of each kind (same shapes, other
token ids, so no prefix-cache hit) is the baseline of the same run. What each first occurrence
compiled is recorded: Dynamo graphs, Triton kernels (names) and autotune searches.

    python -m benchmarks.startup --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

# (kind, prompts (token ids), max_tokens, n): each kind runs twice, timed separately
KINDS = [
    ("one 1-token prompt", [[65]], 8, 1),
    ("one 24-token prompt", [list(range(40, 64))], 8, 1),
    ("one 700-token prompt (chunked)", [[60 + i % 50 for i in range(700)]], 8, 1),
    ("three prompts of 5/50/1 tokens", [[70] * 5, list(range(70, 120)), [71]], 8, 1),
    ("n=3 sampling", [[72] * 9], 8, 3),
    ("eight prompts of 16 tokens", [[80 + i] * 16 for i in range(8)], 16, 1),
]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileEvents:
    """Triton kernels compiled (not loaded from Triton's cache) and autotune searches, by name."""

    def __init__(self) -> None:
        import triton
        from triton.runtime.autotuner import Autotuner

        self.kernels: list[str] = []
        self.searches: list[str] = []
        triton.knobs.compilation.listener = self._compiled
        bench = Autotuner._bench
        events = self

        def counted_bench(tuner, *args, config, **meta):
            events.searches.append(tuner.base_fn.__name__)
            return bench(tuner, *args, config=config, **meta)

        Autotuner._bench = counted_bench

    def _compiled(self, *, src, metadata, metadata_group, times, cache_hit) -> None:
        if not cache_hit:
            self.kernels.append(getattr(src, "name", "?"))

    def take(self) -> dict:
        taken = {"triton_kernels_compiled": sorted(set(self.kernels)),
                 "autotune_configs_timed": len(self.searches), "autotuned": sorted(set(self.searches))}
        self.kernels, self.searches = [], []
        return taken


def other_tokens(prompts):
    """The same shapes with other token ids: a second run of the same prompt would hit the prefix cache."""
    return [[100 + (t * 7 + 3) % 150 for t in p] for p in prompts]


def run_kind(engine, tag: str, prompts, max_tokens: int, n: int) -> float:
    from fusecc import SamplingParams

    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}.{i}", p, SamplingParams(temperature=0.8 if n > 1 else 0.0, n=n, seed=i,
                                                          max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/startup.json")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    args = parser.parse_args()
    import logging

    import triton

    # the engine logs where construction goes (warm-up compiles, CUDA-graph capture)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")

    from fusecc.runtime.engine import LLMEngine

    start = time.perf_counter()
    engine = LLMEngine.from_engine_args(None, max_num_seqs=args.max_num_seqs, max_model_len=2048)
    construct = time.perf_counter() - start
    graphs_after_start = compiled_graphs()
    events = CompileEvents()
    rows = []
    for kind, prompts, max_tokens, n in KINDS:
        graphs = compiled_graphs()
        first = run_kind(engine, f"{kind}.first", prompts, max_tokens, n)
        compiled = {"graphs_compiled": compiled_graphs() - graphs, **events.take()}
        second = run_kind(engine, f"{kind}.second", other_tokens(prompts), max_tokens, n)
        rows.append({"kind": kind, "first_s": first, "second_s": second, "ratio": first / second,
                     "first_compiled": compiled, "second_compiled": events.take()})
    single = [run_kind(engine, f"single{i}", other_tokens([[65 + i, 66, 67]]), 16, 1) for i in range(11)]
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "command": "python -m benchmarks.startup " + " ".join(sys.argv[1:]),
        "model": "embedded default (random tiny Llama), bf16, CUDA graphs",
        "construct_seconds": construct,
        "graphs_compiled_at_start": graphs_after_start,
        "graphs_compiled_after_start": compiled_graphs() - graphs_after_start,
        "kinds": rows,
        "single_request_first_over_median_of_next_ten": single[0] / statistics.median(single[1:]),
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"construction {construct:.1f} s; graphs compiled at start {graphs_after_start}, "
          f"after start {report['graphs_compiled_after_start']}")
    print(f"{'kind':36} {'first ms':>9} {'second ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['kind']:36} {r['first_s'] * 1e3:9.1f} {r['second_s'] * 1e3:9.1f} {r['ratio']:6.2f}")
        c = r["first_compiled"]
        if c["graphs_compiled"] or c["triton_kernels_compiled"] or c["autotune_configs_timed"]:
            print(f"    first compiled: {c['graphs_compiled']} graphs, kernels {c['triton_kernels_compiled']}, "
                  f"{c['autotune_configs_timed']} autotune configs timed {c['autotuned']}")
    print(f"single request: first / median of next ten = {report['single_request_first_over_median_of_next_ten']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
