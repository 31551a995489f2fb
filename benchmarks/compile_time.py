"""Where compile time goes (GPU): the first decode step of benchmarks/decode.py's models, timed as

    dynamo_only    Dynamo capture alone (backend="eager": the captured graph runs as it is): the floor
                   of every torch.compile backend's first call in a fresh process
    aot_eager      Dynamo capture + AOTAutograd tracing, then the graph runs as ATen: the part of
                   any torch.compile backend's first call that the backend does not control
                   (unless it caches AOTAutograd's output, as inductor does)
    fusecc cold    fresh kernel caches (fusecc's and Triton's) in this process
    fusecc warm    after torch._dynamo.reset(): kernel caches warm, everything else redone
    inductor cold / warm   the same for mode="reduce-overhead" (fresh caches, then warm)

and, for fusecc, the seconds its own compiler took (freezing, passes, codegen, kernel precompile:
fusecc.backend.InferenceCompiler, summed over the compiled graphs). No dumps are written.

    python -m benchmarks.compile_time --configs 1b:1,8b:1 --out benchmarks/results/compile_time.json
"""

from __future__ import annotations

import benchmarks.decode as decode  # sets fresh cache directories before torch is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


_BACKEND_SECONDS = [0.0]


def _time_fusecc_compiler() -> None:
    """Accumulate the time spent in fusecc's InferenceCompiler (after AOTAutograd hands it the graph)."""
    import fusecc.backend

    original = fusecc.backend.InferenceCompiler._compile

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            _BACKEND_SECONDS[0] += time.perf_counter() - start

    fusecc.backend.InferenceCompiler._compile = timed


def bench_config(shape: str, batch: int) -> dict:
    from transformers import StaticCache

    model, config = decode.build_model(shape)
    cache = StaticCache(config=config, max_cache_len=decode.PROMPT + decode.STEPS + 8)

    def step(token, cache):
        return model(token, past_key_values=cache, use_cache=True).logits

    result: dict = {"shape": shape, "batch": batch}
    fusecc_options = {"cudagraphs": True, "freeze": True, "strict": True}  # strict: a fallback raises
    # the first compile of a model in a process also pays one-time costs (imports, Dynamo's first
    # trace of transformers' helpers): an untimed aot_eager compile takes them off the timed rows
    runs = [("untimed_warm_up", lambda: torch.compile(step, backend="aot_eager")),
            ("dynamo_only", lambda: torch.compile(step, backend="eager")),
            ("aot_eager", lambda: torch.compile(step, backend="aot_eager")),
            ("fusecc_cold", lambda: torch.compile(step, backend="fusecc", options=fusecc_options)),
            ("fusecc_warm", lambda: torch.compile(step, backend="fusecc", options=fusecc_options)),
            ("inductor_cold", lambda: torch.compile(step, mode="reduce-overhead")),
            ("inductor_warm", lambda: torch.compile(step, mode="reduce-overhead"))]
    for label, make in runs:
        torch._dynamo.reset()
        compiled = make()
        _BACKEND_SECONDS[0] = 0.0
        seconds = decode.first_call_seconds(model, config, compiled, batch, cache)
        if label == "untimed_warm_up":
            continue
        result[f"{label}_first_call_s"] = seconds
        if label.startswith("fusecc"):
            result[f"{label}_backend_s"] = _BACKEND_SECONDS[0]
    for kind in ("cold", "warm"):
        result[f"fusecc_vs_inductor_{kind}"] = result[f"fusecc_{kind}_first_call_s"] / result[f"inductor_{kind}_first_call_s"]
    del model, cache
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="1b:1,8b:1", help="shape:batch, comma separated")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()
    _time_fusecc_compiler()
    report = decode.run_configs(args.configs, args.out, bench_config)
    print(f"{'config':<8} {'dynamo':>9} {'aot_eager':>9} {'fcc cold':>9} {'(backend)':>9} {'fcc warm':>9} {'(backend)':>9} "
          f"{'ind cold':>9} {'ind warm':>9}")
    for r in report["configurations"]:
        print(f"{r['shape']}:{r['batch']:<5} {r['dynamo_only_first_call_s']:9.2f} {r['aot_eager_first_call_s']:9.2f} {r['fusecc_cold_first_call_s']:9.2f} "
              f"{r['fusecc_cold_backend_s']:9.2f} {r['fusecc_warm_first_call_s']:9.2f} {r['fusecc_warm_backend_s']:9.2f} "
              f"{r['inductor_cold_first_call_s']:9.2f} {r['inductor_warm_first_call_s']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
