"""One process of a warm-start test: compile a tiny Llama's forward, run it once, report as JSON.

    python -m tests.compile_cache.child aot|backend OPTIONS_JSON     (CHILD_DEVICE=cuda: on the GPU)

aot: fusecc.compile_cache.aot_compile; backend: torch.compile(backend="fusecc").
The report: the first call's seconds (compile or load included), the largest difference from the
eager model, fusecc's counters and Dynamo's (torch._dynamo.utils.counters), so the parent can
tell what this process traced and generated.
"""

from __future__ import annotations

import json
import sys
import time


def step(model, input_ids):
    return model(input_ids).logits


def tiny_llama():
    import torch

    from tests.runtime.hf_checkpoints import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config("llama")).eval()


def run_compiled(how: str, options: dict) -> dict:
    import os

    import torch

    device = os.environ.get("CHILD_DEVICE", "cpu")
    model = tiny_llama().to(device)
    input_ids = torch.tensor([[5, 9, 3, 17, 42, 8, 11, 2]], device=device)
    other_ids = torch.tensor([[7, 1, 30, 4, 99, 6, 12, 13]], device=device)
    with torch.no_grad():
        start = time.perf_counter()
        if how == "aot":
            from fusecc.compile_cache import aot_compile

            compiled = aot_compile(step, (model, input_ids), options=options)
        else:
            compiled = torch.compile(step, backend="fusecc", options=options)
        logits = compiled(model, input_ids).clone()
        if device == "cuda":
            torch.cuda.synchronize()
        first_call = time.perf_counter() - start
        again = compiled(model, other_ids).clone()  # under cudagraphs: the call that records and replays
        diff = max((logits - step(model, input_ids)).abs().max().item(),
                   (again - step(model, other_ids)).abs().max().item())
    return {"first_call_s": first_call, "max_abs_diff": diff}


def main() -> None:
    how, options = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    report = run_compiled(how, options)
    from torch._dynamo.utils import counters as dynamo_counters

    from fusecc.compile_cache import counters

    report["fusecc"] = dict(counters)
    report["dynamo"] = {group: dict(values) for group, values in dynamo_counters.items() if values}
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
