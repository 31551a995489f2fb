"""The CPU path with a real model (issue 16, item 5), against transformers in the same run:

- construction time of `LLM(model)` (weights, KV pool, compiling every step shape) and how many
  graphs it compiled; graphs compiled afterwards by a workload of other batch sizes and prompt
  lengths (should be 0);
- time from `LLM()` returning to the first token of one prompt;
- output tok/s of batch 1 and batch 16 (greedy, `max_tokens` each, EOS ignored; prefill included)
  against transformers `generate` at batch 1 on the same prompt;
- the compiled forward (the runner's own mixed-step graph) vs the same model eager over one
  20-token prompt, median of `--reps` calls.

    python -m benchmarks.cpu --model /path/to/SmolLM2-135M-Instruct --out benchmarks/results/cpu.json

The machine is shared: the load average is recorded before and after, figures are one run each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

PROMPT = "What is the capital of France? Answer in one sentence, then name three rivers of France."


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def forward_ms(llm, tokens: int, reps: int) -> dict:
    """The runner's compiled forward vs the eager model over one prompt of `tokens` tokens."""
    from fusecc.runtime.models.attention import AttentionMetadata

    runner = llm.engine.runner
    with torch.inference_mode():
        ids, pos = torch.arange(100, 100 + tokens), torch.arange(tokens)
        bs = runner.config.block_size
        md = AttentionMetadata(
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64),  # writes no KV
            block_tables=torch.arange(-(-tokens // bs), dtype=torch.int32)[None],
            context_lens=torch.tensor([tokens], dtype=torch.int32),
            cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen_q=tokens, decode_only=False)
        args = (ids, pos, runner.kv_caches, md)
        torch.testing.assert_close(runner.forward(*args), runner.model(*args), rtol=1e-4, atol=1e-4)
        # alternating calls, so that drift in the machine's load affects both sides alike
        times = {"compiled": [], "eager": []}
        for rep in range(reps + 2):
            for name, fn in (("compiled", runner.forward), ("eager", runner.model)):
                start = time.perf_counter()
                fn(*args)
                if rep >= 2:  # the first two rounds warm up
                    times[name].append(time.perf_counter() - start)
        return {f"{name}_ms": statistics.median(ts) * 1e3 for name, ts in times.items()}


def engine_tok_s(llm, prompts: list, max_tokens: int) -> float:
    from fusecc import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def transformers_tok_s(model_dir: str, prompt_ids: list[int], max_tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def time_fusecc_compiler() -> dict:
    """Accumulates the seconds fusecc's own stages (freeze, passes, lowering) take, per graph."""
    import fusecc.backend

    spent = {"seconds": 0.0, "graphs": 0}
    compile_graph = fusecc.backend.InferenceCompiler.__call__

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return compile_graph(self, *args)
        finally:
            spent["seconds"] += time.perf_counter() - start
            spent["graphs"] += 1

    fusecc.backend.InferenceCompiler.__call__ = timed
    return spent


def construction_breakdown(construct: float, fusecc_seconds: float) -> dict:
    """Where construction went: Dynamo's timers (seconds summed over graphs) and fusecc's."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    def total(name):
        return round(sum(metrics.get(name, [])), 2)

    # torch.compile's frames time as _compile.compile_inner, the ahead-of-time compile the
    # runtime uses with a compile cache as fullgraph_capture
    compile_total = total("_compile.compile_inner") or total("fullgraph_capture")
    return {
        "dynamo_compile_total": compile_total,
        "dynamo_bytecode_tracing": total("bytecode_tracing"),
        "of which nested compile regions traced": total("invoke_subgraph_trace"),
        "aot_autograd_including_fusecc": total("create_aot_dispatcher_function"),
        "fusecc_freeze_passes_lowering": round(fusecc_seconds, 2),
        "dynamo_restarts": len(metrics.get("compile_attempt_1", [])),
        "rest (weights, KV pool, warm-up runs, guards)": round(construct - compile_total, 2),
    }


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint folder (safetensors)")
    parser.add_argument("--out", default="benchmarks/results/cpu.json")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from fusecc import LLM, SamplingParams

    load_before = os.getloadavg()
    fusecc_time = time_fusecc_compiler()
    start = time.perf_counter()
    llm = LLM(args.model, dtype="float32", device="cpu", max_model_len=args.max_model_len)
    construct = time.perf_counter() - start
    graphs_at_start = compiled_graphs()
    start = time.perf_counter()
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    first_token = time.perf_counter() - start

    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    batch16 = [f"{PROMPT} ({i})" + " Please." * (i % 5) for i in range(16)]  # prompt lengths vary
    b1 = engine_tok_s(llm, [PROMPT], args.max_tokens)
    b16 = engine_tok_s(llm, batch16, args.max_tokens)
    fwd = forward_ms(llm, 20, args.reps)
    graphs_after = compiled_graphs() - graphs_at_start
    hf_b1 = transformers_tok_s(args.model, prompt_ids, args.max_tokens)

    report = {
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
        "command": "python -m benchmarks.cpu " + " ".join(sys.argv[1:]),
        "model": f"{os.path.basename(os.path.normpath(args.model))}, float32, max_model_len {args.max_model_len}",
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
        "construct_seconds": construct,
        "construct_breakdown_seconds": construction_breakdown(construct, fusecc_time["seconds"]),
        "graphs_compiled_at_start": graphs_at_start,
        "graphs_compiled_after_start": graphs_after,
        "first_token_seconds_after_llm_returns": first_token,
        "engine_batch1_tok_s": b1,
        "engine_batch16_tok_s": b16,
        "transformers_generate_batch1_tok_s": hf_b1,
        "batch16_over_transformers_batch1": b16 / hf_b1,
        "forward_20_tokens": fwd,
        "max_tokens": args.max_tokens,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
