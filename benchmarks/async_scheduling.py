"""Async scheduling against synchronous steps, same model, same run (GPU).

    python benchmarks/async_scheduling.py --shapes 1b,8b --out benchmarks/results/async_scheduling.json
    python benchmarks/async_scheduling.py --smoke --out /tmp/async_smoke.json          # CPU, tiny shape

Per shape (benchmarks/tp.py's Llama shapes, random bf16 weights): the engine with and without
`async_scheduling`, each measured as tp.py measures an engine: batch-1 decode (a 128-token prompt,
128 greedy tokens; decode-only steps timed) and offline throughput on throughput.py's workload; the
ratios are async over sync. Both outputs of the batch-1 decode are compared token for token.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.throughput import make_prompts  # noqa: E402
from benchmarks.tp import hf_config, measure, measured_max_model_len, randomise  # noqa: E402


def run_shape(shape: str, args, device: str) -> dict:
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM

    config = hf_config(shape)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    prompts = make_prompts(config.vocab_size, n=args.num_requests)
    if args.smoke:
        prompts = [p[:24] for p in prompts]
    max_model_len = measured_max_model_len(prompts, args.output_len)
    model = build_model(LlamaForCausalLM, config, dtype, device, max_model_len, None)
    randomise(model, 0)
    entry = {"shape": shape, "dtype": str(dtype)}
    for mode in (False, True):
        engine = LLMEngine(model, ByteTokenizer(), EngineConfig(
            max_model_len=max_model_len, max_num_seqs=args.max_num_seqs, enforce_eager=device == "cpu",
            async_scheduling=mode, device=device), model_name=shape)
        entry["async" if mode else "sync"] = measure(engine, config.vocab_size, prompts, args.output_len, device)
        engine = None
        gc.collect()
    for key in ("decode_bs1_tok_s", "throughput_tok_s"):
        entry[f"{key}_ratio_async_vs_sync"] = entry["async"][key] / entry["sync"][key]
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shape, eager, a few requests")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.num_requests, args.output_len, args.max_num_seqs = args.num_requests or 4, args.output_len or 8, 4
    args.output_len = args.output_len or 128
    import triton

    report = {"benchmark": "async scheduling vs synchronous steps, same model, same run",
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "command": " ".join(sys.argv),
              "shapes": []}
    for shape in ["tiny"] if args.smoke else args.shapes.split(","):
        report["shapes"].append(run_shape(shape, args, device))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(json.dumps({k: v for k, v in report["shapes"][-1].items() if "ratio" in k}), flush=True)


if __name__ == "__main__":
    main()
