"""Offline throughput with the FP8 KV cache against the bf16 cache (issue 17: at least 1.2x), one run.

throughput.py's workload (256 requests, 128-512-token random prompts, 128 output tokens, EOS
ignored, random-weight Llama shape) on a KV pool small enough to limit concurrency: the bf16 pool
holds --pool-fraction of the workload's peak KV demand, and the fp8 pool gets the SAME BYTES, so
twice the blocks (an e4m3 element is 1 byte). More sequences fit at once, so decode steps run
larger batches and fewer requests wait or are preempted. Reported per dtype: output tok/s, blocks,
GiB, peak usage, preemptions, step timings; and fp8/bf16 throughput.

    python benchmarks/kv_cache_fp8.py --out benchmarks/results/kv_cache_fp8.json           # 8b shape, H100
    python benchmarks/kv_cache_fp8.py --configs 1b --pool-fraction 0.25 --out /tmp/kv1b.json
    python benchmarks/kv_cache_fp8.py --smoke --out /tmp/kv_smoke.json                       # CPU, tiny shape
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.throughput import OUTPUT, bench_fusecc, build_hf, make_prompts, workload_kv_blocks  # noqa: E402

SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, head_dim=16)
BLOCK_SIZE = 16  # EngineConfig's default, which bench_fusecc uses


def build_smoke():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOKE_SHAPE, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), config


def compare(model, config, prompts, warmup, args, device: str, output: int) -> dict:
    demand = workload_kv_blocks(prompts, output, BLOCK_SIZE)
    longest = -(-(max(len(p) for p in prompts + warmup) + output) // BLOCK_SIZE)
    bf16_blocks = max(longest, math.ceil(args.pool_fraction * demand))
    entry = {"workload_kv_demand_blocks": demand, "pool_fraction_of_demand_bf16": args.pool_fraction}
    for name, kv_dtype, blocks in (("bf16", "auto", bf16_blocks), ("fp8", "fp8", 2 * bf16_blocks)):
        try:
            run = bench_fusecc(model, config, prompts, args, blocks, output=output, device=device,
                               warmup_prompts=warmup, profile_name=name, kv_cache_dtype=kv_dtype)
        except Exception as exc:  # one failing run must not lose the other
            entry[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        entry[name] = run
        print(f"{name}: {run['tok_s']:.1f} tok/s, {run['kv_blocks']} blocks ({run['kv_cache_gib']:.2f} GiB), "
              f"{run['preemptions']} preemptions", flush=True)
    if "bf16" in entry and "fp8" in entry:
        entry["fp8_over_bf16_tok_s"] = entry["fp8"]["tok_s"] / entry["bf16"]["tok_s"]
        entry["target"] = 1.2
        entry["meets_target"] = entry["fp8_over_bf16_tok_s"] >= 1.2
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="8b", help="benchmarks/decode.py SHAPES, comma-separated")
    ap.add_argument("--pool-fraction", type=float, default=0.25,
                    help="the bf16 pool as a fraction of the workload's peak KV demand (fp8: the same bytes)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on CPU, 8 short requests")
    ap.add_argument("--out", default="benchmarks/results/kv_cache_fp8.json")
    args = ap.parse_args()
    import transformers
    import triton

    device = "cpu" if args.smoke else "cuda"
    result = {"device": "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "transformers": transformers.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "configs": {}}
    for shape in (["smoke"] if args.smoke else args.configs.split(",")):
        if args.smoke:
            model, config = build_smoke()
            prompts = [p[:24] for p in make_prompts(config.vocab_size, 8)]
            warmup, output = prompts[:2], 8
            args.enforce_eager = True
        else:
            model, config = build_hf(shape)
            prompts, output = make_prompts(config.vocab_size), OUTPUT
            warmup = make_prompts(config.vocab_size, 4, seed=1)
        result["configs"][shape] = compare(model, config, prompts, warmup, args, device, output)
        model = None
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("bf16", "fp8")}
                      for k, v in result["configs"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
