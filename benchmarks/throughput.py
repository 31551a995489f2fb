"""Offline throughput (GPU): fusecc engine vs transformers continuous batching vs static-batch generate.

Llama-shaped models (benchmarks/decode.py SHAPES) with random bf16 weights; 256 requests with
random 128-512-token prompts, 128 output tokens each, EOS ignored. One transformers model is
built per shape; the same weights are loaded into fusecc's model (no files). Reported: output
tok/s, total seconds, peak KV-pool usage and preemptions (fusecc), setup/compile seconds.

fusecc runs once per KV pool size: sized to fractions of the workload's peak demand
(--kv-pool-fractions, default 85% -- the pool binds, the scheduler fills it and preempts -- and
100%), then sized from free memory; keys fusecc_workload_pool_85_*, fusecc_workload_pool_100_*,
fusecc_free_memory_pool_*, and fusecc_* for the fastest (fusecc_note says which). Each run's
step_timings split step time into prefill-containing and decode-only steps and into host time and
time blocked on the device (no syncs added); --profile-dir adds a cProfile of each measured run.

    python benchmarks/throughput.py --configs 1b,8b --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import pstats
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.decode import SHAPES  # noqa: E402

NUM_REQUESTS, MIN_PROMPT, MAX_PROMPT, OUTPUT = 256, 128, 512, 128
# the engine settings of bench_fusecc's `args` by default (the CLI's defaults; benchmarks/moe.py uses them)
ENGINE_DEFAULTS = dict(max_num_seqs=256, max_num_batched_tokens=8192, gpu_memory_utilization=0.9, enforce_eager=False)


def make_prompts(vocab: int, n: int = NUM_REQUESTS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
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


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, width) of prompts left-padded with token 0 to the longest: one static
    batch for transformers' generate."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, width


def bench_hf_generate(model, prompts, batch: int = 64) -> dict:
    """Static batches of `batch` left-padded prompts; measured on the first batch only (time budget)."""
    sub = prompts[:batch]
    ids, mask, width = left_padded(sub, "cuda")
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


def workload_kv_blocks(prompts, output: int, block_size: int) -> int:
    """KV blocks the workload holds at its peak if every request is resident at once (max_num_seqs
    >= requests): a request's last step computes position len(prompt) + output - 2, so it then holds
    cdiv(len(prompt) + output - 1, block_size) blocks. No prefix sharing (random prompts)."""
    return sum(-(-(len(p) + output - 1) // block_size) for p in prompts)


def step_timing_summary(before, after) -> dict:
    """EngineStats.step_timings over the measured run (after - before), host vs device-wait split."""
    d = {f.name: getattr(after, f.name) - getattr(before, f.name) for f in dataclasses.fields(after)}
    wall = d["prefill_seconds"] + d["decode_seconds"]
    wait = d["prefill_wait_seconds"] + d["decode_wait_seconds"]
    return {
        "prefill_steps": d["prefill_steps"], "prefill_seconds": d["prefill_seconds"],
        "prefill_wait_seconds": d["prefill_wait_seconds"],
        "decode_steps": d["decode_steps"], "decode_seconds": d["decode_seconds"],
        "decode_wait_seconds": d["decode_wait_seconds"],
        "decode_ms_per_step": 1e3 * d["decode_seconds"] / max(d["decode_steps"], 1),
        "decode_host_ms_per_step": 1e3 * (d["decode_seconds"] - d["decode_wait_seconds"]) / max(d["decode_steps"], 1),
        "graph_replays": d["graph_replays"],
        "step_wall_seconds": wall, "host_seconds": wall - wait, "device_wait_seconds": wait,
        "schedule_seconds": d["schedule_seconds"], "execute_seconds": d["execute_seconds"],
        "postprocess_seconds": d["postprocess_seconds"],
        "note": "host = step wall time minus the time blocked reading the sampled tokens (the step's only "
                "sync); execute = input prep + kernel/graph launches + sampler launch; no syncs were added",
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def write_profile(profiler, directory: str, name: str) -> None:
    os.makedirs(directory, exist_ok=True)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for key in ("tottime", "cumulative"):
        stats.sort_stats(key).print_stats(40)
    with open(os.path.join(directory, name), "w") as f:
        f.write(out.getvalue())


def warm_up(engine, vocab: int, batch_prompts, seed: int = 1) -> None:
    """Compile and autotune, before the measurement, what the measured run will meet: the prefill
    attention kernels autotune per power-of-two bucket of the step's longest prompt chunk, so one
    prompt per bucket runs alone, up to the longest chunk a step can hold (a recompute after
    preemption: max_model_len - 1 tokens); then `batch_prompts` together (mixed prefill + decode
    steps, decode graphs). Random tokens: no prefix-cache hits for the measured prompts."""
    from fusecc.runtime.sampling_params import SamplingParams

    cfg = engine.config
    longest = min(cfg.max_model_len - 1, cfg.max_num_batched_tokens)
    lengths = [1 << k for k in range(longest.bit_length()) if 1 << k < longest] + [longest]
    g = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lengths):
        engine.add_request(f"warm-len{n}", torch.randint(0, vocab, (n,), generator=g).tolist(),
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    for i, p in enumerate(batch_prompts):
        engine.add_request(f"warm{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def transformers_backed(hf_model):
    """The engine's transformers-backed model (model_impl="transformers") over `hf_model` itself, its
    attention switched to fusecc's paged function (no second copy of the weights)."""
    from fusecc.runtime.models.transformers_attention import ATTN_IMPLEMENTATION
    from fusecc.runtime.models.transformers_backend import TransformersForCausalLM, register_attention

    register_attention()
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return TransformersForCausalLM(hf_model, type(hf_model).__name__).eval()


def bench_fusecc(hf_model, hf_config, prompts, args, num_kv_blocks: int | None, output: int = OUTPUT,
                 device: str = "cuda", warmup_prompts=None, profile_name: str = "fusecc",
                 model_impl: str = "fusecc", kv_cache_dtype: str = "auto", model_cls=None) -> dict:
    """One engine on `prompts`; keys without the fusecc_ prefix. num_kv_blocks None = the pool is
    sized from free memory (gpu_memory_utilization). model_impl "transformers": the engine runs
    transformers' modeling code with fusecc attention instead of fusecc's Llama. kv_cache_dtype:
    EngineConfig's (benchmarks/kv_cache_fp8.py compares fp8 with the model dtype). model_cls: the
    fusecc model class `hf_model`'s weights load into (default LlamaForCausalLM; benchmarks/moe.py
    passes Qwen3MoeForCausalLM)."""
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM
    from fusecc.runtime.sampling_params import SamplingParams

    dtype = next(hf_model.parameters()).dtype
    warmup_prompts = prompts[:4] if warmup_prompts is None else warmup_prompts
    max_model_len = max(len(p) for p in prompts + warmup_prompts) + output
    start = time.perf_counter()
    if model_impl == "transformers":
        model = transformers_backed(hf_model)
    else:
        model = build_model(model_cls or LlamaForCausalLM, hf_config, dtype, device, max_model_len,
                            hf_model.state_dict().items())
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=num_kv_blocks,
                          kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(model, ByteTokenizer(), config, device=torch.device(device), model_name="llama-random",
                       enforce_eager=args.enforce_eager)
    warm_up(engine, hf_config.vocab_size, warmup_prompts)
    setup = time.perf_counter() - start
    # final_only: the run reads finished outputs only (like generate_batch), so the engine builds
    # no per-step outputs and decodes each text once
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True, output_kind="final_only")
    engine.block_manager.reset_peak()
    before = engine.stats()
    profiler = cProfile.Profile() if getattr(args, "profile_dir", None) else None
    sync(device)
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    tokens = steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps += 1
    sync(device)
    seconds = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, args.profile_dir, f"{profile_name}.txt")
    after = engine.stats()
    result = {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "steps": steps,
              "setup_seconds": setup, "peak_kv_usage": after.peak_kv_cache_usage, "kv_blocks": after.num_kv_blocks,
              "kv_cache_gib": engine.runner.kv_cache_bytes / 2**30,
              "preemptions": after.num_preemptions - before.num_preemptions,
              "step_timings": step_timing_summary(before.step_timings, after.step_timings)}
    engine = model = None  # free the KV pool and graphs before the next engine
    if model_impl == "transformers":
        hf_model.set_attn_implementation("sdpa")  # hand the baseline its attention back
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return result


def bench_fusecc_pools(hf_model, hf_config, prompts, args, device: str = "cuda", output: int = OUTPUT,
                       warmup_prompts=None, shape_name: str = "") -> dict:
    """The engine once per KV pool size: pools sized to a fraction of the workload's peak demand
    (below 1 the pool binds: the scheduler fills it and preempts), then the pool sized from free
    memory (far larger than the workload needs). Each run is a fresh engine (compiled code is reused)."""
    block_size = 16  # EngineConfig's default, which bench_fusecc uses
    demand = workload_kv_blocks(prompts, output, block_size)
    max_model_len = max(len(p) for p in prompts + (warmup_prompts or [])) + output
    pools = [(f"workload_pool_{round(100 * f)}", max(-(-max_model_len // block_size), math.ceil(f * demand)))
             for f in args.kv_pool_fractions]
    if not args.no_free_memory_pool:
        pools.append(("free_memory_pool", None))
    entry = {"fusecc_workload_kv_demand_blocks": demand, "fusecc_enforce_eager": args.enforce_eager,
             "fusecc_output_kind": "final_only"}
    runs = {}
    for name, blocks in pools:
        try:
            runs[name] = bench_fusecc(hf_model, hf_config, prompts, args, blocks, output=output, device=device,
                                      warmup_prompts=warmup_prompts, profile_name=f"{shape_name}_{name}")
        except Exception as exc:  # one failing run must not lose the others
            entry[f"fusecc_{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            continue
        entry.update({f"fusecc_{name}_{k}": v for k, v in runs[name].items()})
    if runs:
        main = max(runs, key=lambda name: runs[name]["tok_s"])
        entry.update({f"fusecc_{k}": v for k, v in runs[main].items()})
        entry["fusecc_main_run"] = main
        entry["fusecc_note"] = (
            f"fusecc_* (unprefixed) = the fastest run: {main}. workload_pool_P: a KV pool of P% of the workload's "
            f"peak demand ({demand} blocks of {block_size} tokens with all {len(prompts)} requests resident at "
            f"their longest); below 100 the pool is the binding constraint, so the scheduler fills it and preempts "
            f"(by recompute, more steps). free_memory_pool: pool sized from gpu_memory_utilization="
            f"{args.gpu_memory_utilization}, far larger than the workload needs, so its peak usage is low. Same "
            f"engine, workload and warm-up in every run; greedy, EOS ignored, outputs read only when finished "
            f"(output_kind final_only). step_timings: host time includes time the device ran concurrently "
            f"(prefill launches overlap the device), so device_wait_seconds is a lower bound on device time.")
    return entry


def run_transformers_backed(entry: dict, model, config, prompts, args, shape: str) -> None:
    """entry += the transformers-backed engine's run (free-memory pool) and its ratio to the native one."""
    try:
        run = bench_fusecc(model, config, prompts, args, None, warmup_prompts=make_prompts(config.vocab_size, 4, seed=1),
                           profile_name=f"{shape}_transformers", model_impl="transformers")
    except Exception as exc:
        entry["fusecc_transformers_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return
    entry.update({f"fusecc_transformers_{k}": v for k, v in run.items()})
    native = entry.get("fusecc_free_memory_pool_tok_s")
    if native:
        entry["transformers_backed_vs_native"] = run["tok_s"] / native


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1b,8b")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS["max_num_seqs"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=ENGINE_DEFAULTS["max_num_batched_tokens"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=ENGINE_DEFAULTS["gpu_memory_utilization"])
    ap.add_argument("--kv-pool-fractions", default="0.85,1.0",
                    help="one fusecc run per fraction: a KV pool of that fraction of the workload's peak demand "
                         "(comma-separated; empty for none)")
    ap.add_argument("--no-free-memory-pool", action="store_true",
                    help="skip the fusecc run with the pool sized from free memory")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other configurations already in --out (each records its own run: "
                         "device, versions, date, command), replacing only those run now")
    ap.add_argument("--model-impl", default="fusecc",
                    help="fusecc, or fusecc,transformers: also run the transformers-backed path (transformers' "
                         "Llama code with fusecc attention) with the pool sized from free memory, and report its "
                         "throughput against the native model's free-memory run")
    ap.add_argument("--profile-dir", default=None,
                    help="cProfile each measured fusecc run (host side) into DIR/<shape>_<run>.txt")
    args = ap.parse_args()
    args.kv_pool_fractions = [float(f) for f in args.kv_pool_fractions.split(",") if f.strip()]
    import transformers
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "transformers": transformers.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "workload": {"requests": NUM_REQUESTS, "prompt_tokens": [MIN_PROMPT, MAX_PROMPT],
                                                         "output_tokens": OUTPUT, "ignore_eos": True, "dtype": "bf16"},
              "configs": {}}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            result["configs"] = json.load(f).get("configs", {})
    run = {key: result[key] for key in ("device", "torch", "triton", "transformers", "date", "command")}
    for shape in args.configs.split(","):
        # the baselines and fusecc of one configuration always come from the same run
        entry: dict = {"shape": SHAPES[shape], "run": run}
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
            entry.update(bench_fusecc_pools(model, config, prompts, args, shape_name=shape,
                                            warmup_prompts=make_prompts(config.vocab_size, 4, seed=1)))
            if "transformers" in args.model_impl.split(","):
                run_transformers_backed(entry, model, config, prompts, args, shape)
            if entry.get("hf_generate_batch_tok_s") and entry.get("fusecc_tok_s"):
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
