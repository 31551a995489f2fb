"""Offline throughput (GPU): fusecc engine vs transformers continuous batching vs static-batch generate.

Llama-shaped models (benchmarks/decode.py SHAPES) with random bf16 weights; 256 requests with
random 128-512-token prompts, 128 output tokens each, EOS ignored. One transformers model is
built per shape; the same weights are loaded into fusecc's model (no files). Reported: output
tok/s, total seconds, peak KV-pool usage and preemptions (fusecc), setup/compile seconds.

    python benchmarks/throughput.py --configs 1b,8b --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.decode import SHAPES  # noqa: E402

NUM_REQUESTS, MIN_PROMPT, MAX_PROMPT, OUTPUT = 256, 128, 512, 128


def make_prompts(vocab: int, n: int = NUM_REQUESTS) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


def build_hf(shape: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model, config


def bench_hf_generate_batch(model, prompts) -> dict:
    from transformers import GenerationConfig

    # EOS: random weights rarely produce it; counted tokens are what was really generated
    gen = GenerationConfig(max_new_tokens=OUTPUT, do_sample=False)
    # not under torch.inference_mode(): generate_batch's worker thread runs outside it and then
    # fails with "Inplace update to inference tensor outside InferenceMode" (H100 run, 2026-11-22)
    warm = model.generate_batch(inputs=prompts[:8], generation_config=gen)  # warm-up (graphs, kernels)
    errors = [o.error for o in warm.values() if o.error]
    if errors:
        raise RuntimeError(f"generate_batch failed: {errors[0]}")
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    errors = [o.error for o in outs.values() if o.error]
    if errors or not tokens:
        raise RuntimeError(f"generate_batch: {len(errors)} requests failed, {tokens} tokens: {errors[:1]}")
    return {"hf_generate_batch_tok_s": tokens / seconds, "hf_generate_batch_seconds": seconds,
            "hf_generate_batch_tokens": tokens}


def bench_hf_generate(model, prompts, batch: int = 64) -> dict:
    """Static batches of `batch` left-padded prompts; measured on the first batch only (time budget)."""
    sub = prompts[:batch]
    width = max(len(p) for p in sub)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in sub], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in sub], device="cuda")
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=OUTPUT, min_new_tokens=OUTPUT,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(sub)
    return {"hf_generate_tok_s": tokens / seconds, "hf_generate_seconds": seconds,
            "hf_generate_note": f"static batch of {batch} left-padded prompts (first {batch} of the requests)"}


def bench_fusecc(hf_model, hf_config, prompts, args) -> dict:
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM
    from fusecc.runtime.sampling_params import SamplingParams

    start = time.perf_counter()
    model = build_model(LlamaForCausalLM, hf_config, torch.bfloat16, "cuda", MAX_PROMPT + OUTPUT,
                        hf_model.state_dict().items())
    config = EngineConfig(max_model_len=MAX_PROMPT + OUTPUT, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    engine = LLMEngine(model, ByteTokenizer(), config, device=torch.device("cuda"), model_name="llama-random",
                       enforce_eager=args.enforce_eager)
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True)
    for i, p in enumerate(prompts[:4]):  # warm-up: the remaining graph variants
        engine.add_request(f"w{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    setup = time.perf_counter() - start
    engine.block_manager.stats.peak_used_blocks = 0
    preempt0 = engine.scheduler.stats.num_preemptions
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens = steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    bm = engine.block_manager
    return {"fusecc_tok_s": tokens / seconds, "fusecc_seconds": seconds, "fusecc_tokens": tokens,
            "fusecc_steps": steps, "fusecc_setup_seconds": setup,
            "fusecc_peak_kv_usage": bm.stats.peak_used_blocks / bm.num_blocks,
            "fusecc_kv_blocks": bm.num_blocks, "fusecc_kv_cache_gib": engine.runner.kv_cache_bytes / 2**30,
            "fusecc_preemptions": engine.scheduler.stats.num_preemptions - preempt0,
            "fusecc_cuda_graph_buckets": sorted(engine.runner.graphs), "fusecc_enforce_eager": args.enforce_eager}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1b,8b")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()
    import transformers
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "workload": {"requests": NUM_REQUESTS, "prompt_tokens": [MIN_PROMPT, MAX_PROMPT],
                                                         "output_tokens": OUTPUT, "ignore_eos": True, "dtype": "bf16"},
              "configs": {}}
    for shape in args.configs.split(","):
        entry: dict = {"shape": SHAPES[shape]}
        result["configs"][shape] = entry
        try:
            model, config = build_hf(shape)
            prompts = make_prompts(config.vocab_size)
            if not args.skip_hf:
                for bench in (bench_hf_generate_batch, bench_hf_generate):
                    try:
                        entry.update(bench(model, prompts))
                    except Exception as exc:  # one failing baseline must not lose the others
                        entry[f"{bench.__name__}_error"] = f"{type(exc).__name__}: {exc}"
                        traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()
            entry.update(bench_fusecc(model, config, prompts, args))
            if entry.get("hf_generate_batch_tok_s"):
                entry["speedup_vs_generate_batch"] = entry["fusecc_tok_s"] / entry["hf_generate_batch_tok_s"]
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            model = None
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps({shape: entry}, indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
