"""Mixture of experts (GPU): the fused MoE kernel vs torch baselines, and MoE decode vs its roofline; one run.

1. Kernel (bf16, random weights and routing): fusecc's fused MoE (fusecc/kernels/fused_moe.py, autotuned
   before timing; up to 2 tokens it runs fused_moe_decode.py's kernels, and fused_grouped_ms times the
   grouped GEMMs there too) vs a per-expert torch loop (transformers' eager experts: gather the expert's tokens, two
   linears, weighted index_add) and vs torch._grouped_mm where it exists (transformers' "grouped_mm"
   experts: sort by expert, two grouped GEMMs over offsets, weighted unsort-and-sum), at Mixtral-8x7B
   (8 experts, top-2, 4096 -> 14336) and Qwen3-30B-A3B (128 experts, top-8, 2048 -> 768) expert shapes,
   for 64 tokens (the acceptance figure) and --tokens more. Median of triton.testing.do_bench; outputs
   checked against each other.
2. Decode: a Qwen3-30B-A3B-shaped model (random bf16 weights) through fusecc's engine (compiled, CUDA
   graphs), batch 1, a 128-token prompt, `--decode-steps` greedy tokens; tok/s over the decode steps vs
   the roofline of the bytes one step reads: the top-k experts and the router of every layer, the
   attention weights and the KV cache read, the final norm and the LM head (the input embedding row is
   noise), at the device-to-device copy bandwidth measured in the same run. The 48 layers (~61 GB of
   weights) are cut to what fits in 80% of free memory; `decode.layers` says how many ran.
3. Quantized experts (`quantized`): the fused MoE kernels with int8, int4 (group 128) and fp8 (W8A8)
   expert weights quantized from the same bf16 weights, against the bf16 fused kernels in the same run,
   at the Qwen3-30B-A3B expert shape and --quant-tokens tokens; each output's error against the
   torch loop over the dequantized weights.
4. Offline throughput (`throughput`): benchmarks/throughput.py's workload (256 requests, 128-512-token
   random prompts, 128 greedy tokens each, EOS ignored) on one transformers Qwen3MoeForCausalLM of the
   Qwen3-30B-A3B shape cut to --throughput-layers layers (random bf16 weights), and the same weights
   loaded into fusecc's engine. Baseline: that transformers model's own compiled generation
   (`generate(cache_implementation="static")` with a CompileConfig: the decode forward through
   torch.compile / inductor, CUDA graphs) on a static batch of the first 64 requests, left-padded, after
   one identical warm-up generate (compile time excluded), per transformers experts implementation of
   --hf-experts; hf_inductor_* is the fastest. fusecc: throughput.py's bench_fusecc, KV pool sized to the
   workload's peak demand (every request resident, no preemption). fusecc_vs_hf_inductor = the ratio of
   output tok/s.

    python benchmarks/moe.py --out benchmarks/results/moe.json
    python benchmarks/moe.py --smoke --out /tmp/moe_smoke.json     # CPU, tiny shapes, Triton interpreter

On --smoke (CPU) the throughput baseline is transformers' eager generate (inductor would need a C++
compiler and minutes) over 6 requests of 8 tokens: the smoke checks the plumbing, not the figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when fusecc's kernels are defined (imported)
sys.path.insert(0, __file__.rsplit("/", 2)[0])
# decode.py points Triton's and fusecc's caches at fresh directories when imported: import it first, so
# every kernel of this run compiles (and autotunes) into the same cold caches
from benchmarks.decode import copy_bandwidth as measure_copy_bandwidth  # noqa: E402

KERNEL_SHAPES = {  # experts, top_k, hidden, expert intermediate
    "mixtral_8x7b": (8, 2, 4096, 14336),
    "qwen3_30b_a3b": (128, 8, 2048, 768),
}
SMOKE_KERNEL_SHAPES = {"tiny": (8, 2, 64, 32)}
QWEN3_30B_A3B = dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                     num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=4096,
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
SMOKE_MODEL = dict(QWEN3_30B_A3B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                   vocab_size=256)
PROMPT = 128


# ---- 1. the kernel against torch ----

def per_expert_loop(x, w13, w2, topk_weights, topk_ids):
    from fusecc.kernels.fused_moe import fused_moe_reference

    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)  # transformers' eager experts loop


def grouped_mm_experts(x, w13, w2, topk_weights, topk_ids):
    """transformers' grouped_mm experts (integrations/moe.py), without the expert-parallel sentinels."""
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    expert_of, order = torch.sort(topk_ids.reshape(-1))
    rows = x[order // top_k]
    counts = torch.histc(expert_of.int() if x.is_cuda else expert_of.float(), bins=num_experts, min=0,
                         max=num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gate_up = torch._grouped_mm(rows, w13.transpose(-2, -1), offs=offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    down = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1), offs=offsets)
    down = down * topk_weights.reshape(-1)[order, None].to(down.dtype)
    out = torch.empty_like(down)
    out[order] = down
    return out.view(x.shape[0], top_k, -1).sum(dim=1)


def time_ms(fn, smoke: bool) -> float:
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def random_moe(shape, tokens: int, device: str, dtype: torch.dtype) -> tuple:
    """(x, w13, w2, routing weights, expert ids) for `tokens` tokens, weights scaled like a trained layer's."""
    experts, top_k, hidden, inter = shape
    g = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device, generator=g) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device, generator=g) / inter ** 0.5).to(dtype)
    weights, ids = torch.randn(tokens, experts, device=device, generator=g).softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, (weights / weights.sum(-1, keepdim=True)).to(dtype), ids


def bench_kernel(shape, tokens: int, device: str, dtype: torch.dtype, smoke: bool) -> dict:
    from fusecc.kernels.fused_moe import choose_block_m, fused_moe
    from fusecc.kernels.fused_moe_decode import DECODE_MAX_TOKENS
    from fusecc.kernels.moe_align import moe_align_block_size

    experts, top_k, hidden, inter = shape
    args = random_moe(shape, tokens, device, dtype)
    x, ids = args[0], args[4]
    fused = fused_moe(*args)  # autotunes (FUSECC_AUTOTUNE, default on) before the timing
    loop = per_expert_loop(*args)
    err = (fused.float() - loop.float()).abs().max().item() / loop.float().abs().max().item()
    active = len(ids.unique())
    result = {"tokens": tokens, "experts_hit": active, "max_rel_err_vs_loop": err,
              "fused_ms": time_ms(lambda: fused_moe(*args), smoke),
              "loop_ms": time_ms(lambda: per_expert_loop(*args), smoke)}
    result["speedup_vs_loop"] = result["loop_ms"] / result["fused_ms"]
    if tokens <= DECODE_MAX_TOKENS:  # fused_ms ran the matrix-vector kernels; the grouped GEMMs for comparison
        result["fused_path"] = "decode_gemv"
        result["fused_grouped_ms"] = time_ms(lambda: fused_moe(*args, decode=False), smoke)
    block_m = choose_block_m(ids.numel(), experts)  # the sort step alone, inside fused_ms
    result["align_ms"] = time_ms(lambda: moe_align_block_size(ids, block_m, experts), smoke)
    result["block_m"] = block_m
    expert_bytes = active * 3 * hidden * inter * x.element_size()
    result["fused_weight_gb_s"] = expert_bytes / result["fused_ms"] / 1e6
    if hasattr(torch, "_grouped_mm"):
        try:
            grouped = grouped_mm_experts(*args)
            result["grouped_mm_max_rel_err_vs_loop"] = ((grouped.float() - loop.float()).abs().max().item()
                                                        / loop.float().abs().max().item())
            result["grouped_mm_ms"] = time_ms(lambda: grouped_mm_experts(*args), smoke)
            result["speedup_vs_grouped_mm"] = result["grouped_mm_ms"] / result["fused_ms"]
        except Exception as exc:  # no kernel for this device / dtype
            result["grouped_mm_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    else:
        result["grouped_mm_error"] = "torch._grouped_mm does not exist in this torch"
    return result


# ---- 3. quantized experts against bf16 ones ----

def bench_quantized(shape, tokens: int, device: str, dtype: torch.dtype, smoke: bool) -> dict:
    from fusecc.kernels.fused_moe import fused_moe, fused_moe_reference
    from fusecc.kernels.moe_expert_weights import ExpertQuant
    from fusecc.quantization.config import resolve_quantization
    from fusecc.quantization.experts import quantize_expert_weights

    x, w13, w2, weights, ids = random_moe(shape, tokens, device, dtype)
    fused_moe(x, w13, w2, weights, ids)
    result = {"tokens": tokens, "experts_hit": len(ids.unique()),
              "bf16_ms": time_ms(lambda: fused_moe(x, w13, w2, weights, ids), smoke)}
    for method in ("int8", "int4", "fp8"):
        try:
            quant = resolve_quantization(method, None)
            q13, s13, z13 = quantize_expert_weights(w13, quant)
            q2, s2, z2 = quantize_expert_weights(w2, quant)
            kw = dict(w13_quant=ExpertQuant(method, quant.group_size, s13, z13),
                      w2_quant=ExpertQuant(method, quant.group_size, s2, z2))
            out = fused_moe(x, q13, q2, weights, ids, **kw)  # autotunes before the timing
            ref = fused_moe_reference(x.float(), q13, q2, weights, ids, **kw)
            ms = time_ms(lambda: fused_moe(x, q13, q2, weights, ids, **kw), smoke)
            result[method] = {"ms": ms, "speedup_vs_bf16": result["bf16_ms"] / ms,
                              "max_rel_err_vs_loop": ((out.float() - ref).abs().max() / ref.abs().max()).item()}
        except Exception:
            result[method] = {"error": traceback.format_exc(limit=3)}
    return result


# ---- 2. decode through the engine vs the roofline ----

def hf_config(spec: dict):
    import transformers

    return transformers.Qwen3MoeConfig(**spec, architectures=["Qwen3MoeForCausalLM"])


def random_weights(model: torch.nn.Module) -> None:
    """Uninitialised (or transformers-initialised) parameters -> seeded random ones, norms 1: the decode
    engine and the throughput section's transformers model get the same scheme."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)


def copy_bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None  # no roofline on CPU (--smoke only checks that the path runs)
    return measure_copy_bandwidth()


def fitting_layers(spec: dict, dtype: torch.dtype) -> int:
    """Decoder layers whose weights fit in 80% of free GPU memory next to the embeddings and head."""
    per_layer, fixed = layer_bytes(spec, dtype, all_experts=True), 2 * spec["vocab_size"] * spec["hidden_size"] * 2
    free = torch.cuda.mem_get_info()[0]
    return max(1, min(spec["num_hidden_layers"], int((0.8 * free - fixed) // per_layer)))


def layer_bytes(spec: dict, dtype: torch.dtype, all_experts: bool) -> int:
    """Weight bytes of one decoder layer: attention, router, and all experts or the top-k read per token."""
    size = torch.finfo(dtype).bits // 8
    h, hd = spec["hidden_size"], spec["head_dim"]
    q, kv = spec["num_attention_heads"] * hd, spec["num_key_value_heads"] * hd
    attn = h * (q + 2 * kv) + q * h + 2 * hd + 2 * h  # qkv, o, q/k norms, two RMSNorms
    experts = spec["num_experts"] if all_experts else spec["num_experts_per_tok"]
    return size * (attn + spec["num_experts"] * h + experts * 3 * h * spec["moe_intermediate_size"])


def step_bytes(spec: dict, layers: int, dtype: torch.dtype, context: int) -> int:
    size = torch.finfo(dtype).bits // 8
    kv = layers * 2 * spec["num_key_value_heads"] * spec["head_dim"] * context * size
    head = (spec["vocab_size"] * spec["hidden_size"] + 2 * spec["hidden_size"]) * size  # LM head, final norm, 1 row
    return layers * layer_bytes(spec, dtype, all_experts=False) + kv + head


def build_engine(spec: dict, device: str, dtype: torch.dtype, max_model_len: int):
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.qwen_moe import Qwen3MoeForCausalLM

    model = build_model(Qwen3MoeForCausalLM, hf_config(spec), dtype, device, max_model_len, None)
    random_weights(model)
    cfg = EngineConfig(max_model_len=max_model_len, max_num_seqs=4, max_num_batched_tokens=512,
                       num_kv_blocks=max_model_len // 16 * 4)
    return LLMEngine(model, ByteTokenizer(), cfg, device=torch.device(device), model_name="qwen3-moe-random")


def bench_decode(device: str, dtype: torch.dtype, steps: int, smoke: bool, layers: int | None,
                 profile: bool = False) -> dict:
    from fusecc.runtime.sampling_params import SamplingParams

    spec = dict(SMOKE_MODEL if smoke else QWEN3_30B_A3B)
    spec["num_hidden_layers"] = layers or (spec["num_hidden_layers"] if smoke else fitting_layers(spec, dtype))
    start = time.perf_counter()
    engine = build_engine(spec, device, dtype, max_model_len=PROMPT + steps + 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (PROMPT,), generator=g).tolist()  # byte tokenizer ids
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    engine.add_request("warm", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    setup = time.perf_counter() - start
    engine.add_request("decode", prompt, params)
    engine.step()  # the prefill (and first token)
    sync(device)
    start, generated = time.perf_counter(), 1
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated = len(out.outputs[0].token_ids)
    sync(device)
    seconds = time.perf_counter() - start
    tok_s = (generated - 1) / seconds
    bw = copy_bandwidth(device)
    bytes_per_step = step_bytes(spec, spec["num_hidden_layers"], dtype, PROMPT + steps // 2)
    roofline = bw / bytes_per_step if bw else None
    report = {"layers": spec["num_hidden_layers"], "full_layers": QWEN3_30B_A3B["num_hidden_layers"],
              "model": model_shape(spec), "prompt": PROMPT,
              "decode_steps": generated - 1, "tok_s": tok_s, "ms_per_step": 1e3 / tok_s,
              "bytes_per_step": bytes_per_step, "copy_bandwidth_gb_s": bw and bw / 1e9, "roofline_tok_s": roofline,
              "fraction_of_roofline": roofline and tok_s / roofline, "setup_seconds": setup,
              "runner_compiled": engine.runner.forward is not engine.runner.model}
    if profile:  # where a step's time goes, kernel by kernel (after the timed steps)
        from benchmarks.engine_profile import profile_decode

        report["profile"] = profile_decode(engine, prompt, steps=16)
    return report


def model_shape(spec: dict) -> dict:
    return {k: spec[k] for k in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Between sections: the last one's models, engines and KV pools (reference cycles included), so
    the next one sizes itself against the whole card."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- 4. offline throughput: the engine vs transformers compiled with inductor ----

# transformers' experts implementations the baseline may use. grouped_mm (its default) is the one made
# for torch.compile; "eager" loops over the hit experts (data-dependent: graph breaks); "batched_mm"
# gathers one weight matrix per (token, expert) pair, which the eager 64 x 512-token prefill of this
# workload cannot hold (TBs), so it is not tried unless named
HF_EXPERTS = "grouped_mm"
HF_BATCH = 64  # as throughput.py's bench_hf_generate: one static batch of the first 64 requests


def build_hf_moe(spec: dict, device: str, dtype: torch.dtype):
    import transformers

    config = hf_config(spec)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    random_weights(model)
    return model, config


def bench_hf_static(model, prompts, output: int, compiled: bool) -> dict:
    """transformers' generate over one static batch of the first HF_BATCH prompts, left-padded, with a
    static KV cache: with `compiled`, generate runs its decode forward through torch.compile (inductor,
    CUDA graphs: CompileConfig's defaults, passed explicitly); otherwise eagerly (the CPU smoke). The
    warm-up is the identical call: a static cache's shapes are (batch, prompt width + new tokens), so
    any other warm-up would leave the measured call to compile (and record graphs) again."""
    from transformers import CompileConfig

    from benchmarks.throughput import left_padded

    device = model.device
    sub = prompts[:HF_BATCH]
    ids, mask, width = left_padded(sub, device)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=output, min_new_tokens=output,
                  do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
    if compiled:
        kwargs["compile_config"] = CompileConfig(backend="inductor", mode="reduce-overhead")
    else:
        kwargs["disable_compile"] = True
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(**kwargs)
        sync(device.type)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**kwargs)
        sync(device.type)
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - width) * len(sub)
    # generate compiles only where its criteria hold (device, cache): what actually ran
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "batch": len(sub),
            "warmup_seconds": warm, "compiled": hasattr(model, "_compiled_call")}


def bench_hf_baseline(model, prompts, output: int, compiled: bool, experts: list[str]) -> dict:
    """bench_hf_static once per experts implementation; hf_inductor_* = the fastest that ran."""
    runs, entry = {}, {}
    for impl in experts:
        try:
            model.set_experts_implementation(impl)
            runs[impl] = bench_hf_static(model, prompts, output, compiled)
        except Exception as exc:  # e.g. out of memory: the other implementations still run
            runs[impl] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            traceback.print_exc()
        finally:
            # a fresh compile (and CUDA-graph pool) per implementation; freed before fusecc's engine
            model.__dict__.pop("_compiled_call", None)
            torch._dynamo.reset()
            free_memory(model.device.type)
    entry["hf_by_experts_implementation"] = runs
    ran = [impl for impl in runs if "tok_s" in runs[impl]]
    if ran:
        best = max(ran, key=lambda impl: runs[impl]["tok_s"])
        entry.update({f"hf_inductor_{k}": v for k, v in runs[best].items()})
        entry["hf_experts_implementation"] = best
    return entry


def bench_throughput(device: str, dtype: torch.dtype, smoke: bool, layers: int | None,
                     experts: list[str]) -> dict:
    from benchmarks.throughput import (ENGINE_DEFAULTS, MAX_PROMPT, MIN_PROMPT, NUM_REQUESTS, OUTPUT, bench_fusecc,
                                       make_prompts, workload_kv_blocks)
    from fusecc.runtime.models.qwen_moe import Qwen3MoeForCausalLM

    spec = dict(SMOKE_MODEL if smoke else QWEN3_30B_A3B)
    spec["num_hidden_layers"] = layers or (spec["num_hidden_layers"] if smoke else 8)
    requests, output = (6, 8) if smoke else (NUM_REQUESTS, OUTPUT)
    model, config = build_hf_moe(spec, device, dtype)
    prompts = make_prompts(config.vocab_size, requests)
    compiled = not smoke
    entry = {"layers": spec["num_hidden_layers"], "full_layers": QWEN3_30B_A3B["num_hidden_layers"],
             "model": model_shape(spec),
             "workload": {"requests": requests, "prompt_tokens": [MIN_PROMPT, MAX_PROMPT], "output_tokens": output,
                          "greedy": True, "ignore_eos": True, "hf_requests": min(HF_BATCH, requests)},
             "hf_baseline": ("transformers generate, static cache, decode forward compiled with torch.compile "
                             "(inductor, mode reduce-overhead)" if compiled else
                             "transformers generate, static cache, EAGER (smoke on CPU: no inductor)")}
    entry.update(bench_hf_baseline(model, prompts, output, compiled, experts))
    # throughput.py's engine settings, the KV pool sized to the workload's peak demand
    engine_args = argparse.Namespace(**ENGINE_DEFAULTS)
    run = bench_fusecc(model, config, prompts, engine_args, workload_kv_blocks(prompts, output, 16), output=output,
                       device=device, warmup_prompts=make_prompts(config.vocab_size, 4, seed=1),
                       model_cls=Qwen3MoeForCausalLM)
    entry.update({f"fusecc_{k}": v for k, v in run.items()})
    if entry.get("hf_inductor_tok_s"):
        entry["fusecc_vs_hf_inductor"] = entry["fusecc_tok_s"] / entry["hf_inductor_tok_s"]
    entry["note"] = (
        f"Both ran the same weights (one transformers model, its state dict loaded into fusecc's "
        f"Qwen3MoeForCausalLM) and the same {spec['num_hidden_layers']} of the model's "
        f"{QWEN3_30B_A3B['num_hidden_layers']} layers, in {dtype}. fusecc: all {requests} requests through the "
        f"engine (continuous batching, KV pool = the workload's peak demand, no preemption). transformers: one "
        f"static batch of the first {min(HF_BATCH, requests)} requests, left-padded, measured after an identical "
        f"warm-up call; tokens = new tokens x batch. Output tok/s each.")
    return entry


def token_counts(flag: str | None, default: str) -> list[int]:
    return [int(t) for t in (default if flag is None else flag).split(",") if t]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter, fp32)")
    ap.add_argument("--tokens", default=None,
                    help="token counts of the kernel comparison (default 1,64,512; --smoke 1,7; '' skips it)")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the decode model (default: all that fit)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--quant-tokens", default=None,
                    help="token counts of the quantized-experts comparison (default 1,2,16,64,512; --smoke 1,7; "
                         "'' skips it)")
    ap.add_argument("--throughput-layers", type=int, default=None,
                    help="decoder layers of the throughput model (default 8; --smoke: the tiny model's)")
    ap.add_argument("--hf-experts", default=HF_EXPERTS,
                    help="transformers experts implementations the throughput baseline tries (comma-separated; "
                         "the fastest is hf_inductor_*)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--profile", action="store_true", help="a torch profiler table of 16 decode steps in the JSON")
    args = ap.parse_args()
    import transformers
    import triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 is broken in the interpreter
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "dtype": str(dtype), "kernel": {}, "decode": None, "quantized": {}, "throughput": None}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every row: a run stopped by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    tokens = token_counts(args.tokens, "1,7" if args.smoke else "1,64,512")
    for name, shape in (SMOKE_KERNEL_SHAPES if args.smoke else KERNEL_SHAPES).items():
        for n in tokens:
            key = f"{name}/tokens_{n}"
            try:
                result["kernel"][key] = bench_kernel(shape, n, device, dtype, args.smoke)
            except Exception:
                result["kernel"][key] = {"error": traceback.format_exc(limit=3)}
            print(key, json.dumps(result["kernel"][key]), flush=True)
            save()
    quant_tokens = token_counts(args.quant_tokens, "1,7" if args.smoke else "1,2,16,64,512")
    quant_shapes = SMOKE_KERNEL_SHAPES if args.smoke else {"qwen3_30b_a3b": KERNEL_SHAPES["qwen3_30b_a3b"]}
    for name, shape in quant_shapes.items():
        for n in quant_tokens:
            key = f"{name}/tokens_{n}"
            result["quantized"][key] = bench_quantized(shape, n, device, dtype, args.smoke)
            print("quantized", key, json.dumps(result["quantized"][key]), flush=True)
            save()
    free_memory(device)  # the kernel comparisons' weights
    if not args.skip_decode:
        try:
            result["decode"] = bench_decode(device, dtype, 8 if args.smoke else args.decode_steps, args.smoke,
                                            args.layers, args.profile)
        except Exception:
            result["decode"] = {"error": traceback.format_exc(limit=5)}
        print("decode", json.dumps(result["decode"]), flush=True)
        save()
        free_memory(device)
    if not args.skip_throughput:
        try:
            result["throughput"] = bench_throughput(device, dtype, args.smoke, args.throughput_layers,
                                                    [e for e in args.hf_experts.split(",") if e])
        except Exception:
            result["throughput"] = {"error": traceback.format_exc(limit=5)}
        print("throughput", json.dumps(result["throughput"]), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
