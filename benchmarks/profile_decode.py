"""Where decode time goes (GPU): top CUDA kernels per decode step for fusecc and inductor.

    python benchmarks/profile_decode.py --shape 1b --batch 32
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.decode import PROMPT, build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from transformers import StaticCache

    model, config = build_model(args.shape)
    cache = StaticCache(config=config, max_cache_len=PROMPT + 64)

    def step(token, cache):
        return model(token, past_key_values=cache, use_cache=True).logits

    for name, compiled in (("fusecc", torch.compile(step, backend="fusecc", options={"freeze": True})),
                           ("inductor", torch.compile(step))):
        torch._dynamo.reset()
        with torch.inference_mode():
            cache.reset()
            model(torch.zeros((args.batch, PROMPT), dtype=torch.long, device="cuda"), past_key_values=cache)
            token = torch.zeros((args.batch, 1), dtype=torch.long, device="cuda")
            for _ in range(3):
                compiled(token, cache)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    compiled(token, cache)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
        total = sum(e.self_device_time_total for e in events) / args.steps
        print(f"== {name} {args.shape} batch {args.batch}: {total:.0f} us of kernels per step, "
              f"{sum(e.count for e in events) / args.steps:.0f} kernels per step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
            print(f"  {e.self_device_time_total / args.steps:8.1f} us  x{e.count / args.steps:5.1f}  {e.key[:90]}")


if __name__ == "__main__":
    main()
