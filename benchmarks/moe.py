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

    python benchmarks/moe.py --out benchmarks/results/moe.json
    python benchmarks/moe.py --smoke --out /tmp/moe_smoke.json     # CPU, tiny shapes, Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime
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
    import transformers

    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.qwen_moe import Qwen3MoeForCausalLM

    config = transformers.Qwen3MoeConfig(**spec, architectures=["Qwen3MoeForCausalLM"])
    model = build_model(Qwen3MoeForCausalLM, config, dtype, device, max_model_len, None)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # uninitialised -> random, norms 1
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    cfg = EngineConfig(max_model_len=max_model_len, max_num_seqs=4, max_num_batched_tokens=512,
                       num_kv_blocks=max_model_len // 16 * 4)
    return LLMEngine(model, ByteTokenizer(), cfg, device=torch.device(device), model_name="qwen3-moe-random")


def bench_decode(device: str, dtype: torch.dtype, steps: int, smoke: bool, layers: int | None) -> dict:
    from fusecc.runtime.sampling_params import SamplingParams

    spec = dict(SMOKE_MODEL if smoke else QWEN3_30B_A3B)
    if device == "cuda":
        torch.cuda.empty_cache()  # the kernel comparison's weights
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
    return {"layers": spec["num_hidden_layers"], "full_layers": QWEN3_30B_A3B["num_hidden_layers"],
            "model": {k: spec[k] for k in ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                           "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")},
            "prompt": PROMPT, "decode_steps": generated - 1, "tok_s": tok_s, "ms_per_step": 1e3 / tok_s,
            "bytes_per_step": bytes_per_step, "copy_bandwidth_gb_s": bw and bw / 1e9, "roofline_tok_s": roofline,
            "fraction_of_roofline": roofline and tok_s / roofline, "setup_seconds": setup,
            "runner_compiled": engine.runner.forward is not engine.runner.model}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter, fp32)")
    ap.add_argument("--tokens", default="1,64,512", help="token counts of the kernel comparison")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the decode model (default: all that fit)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--quant-tokens", default="1,2,16,64,512",
                    help="token counts of the quantized-experts comparison ('' skips it)")
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
              "dtype": str(dtype), "kernel": {}, "decode": None, "quantized": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every row: a run stopped by a time limit keeps what it measured
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    tokens = [int(t) for t in args.tokens.split(",")] if not args.smoke else [1, 7]
    for name, shape in (SMOKE_KERNEL_SHAPES if args.smoke else KERNEL_SHAPES).items():
        for n in tokens:
            key = f"{name}/tokens_{n}"
            try:
                result["kernel"][key] = bench_kernel(shape, n, device, dtype, args.smoke)
            except Exception:
                result["kernel"][key] = {"error": traceback.format_exc(limit=3)}
            print(key, json.dumps(result["kernel"][key]), flush=True)
            save()
    quant_tokens = [int(t) for t in args.quant_tokens.split(",") if t] if not args.smoke else [1, 7]
    quant_shapes = SMOKE_KERNEL_SHAPES if args.smoke else {"qwen3_30b_a3b": KERNEL_SHAPES["qwen3_30b_a3b"]}
    for name, shape in quant_shapes.items():
        for n in quant_tokens:
            key = f"{name}/tokens_{n}"
            result["quantized"][key] = bench_quantized(shape, n, device, dtype, args.smoke)
            print("quantized", key, json.dumps(result["quantized"][key]), flush=True)
            save()
    if not args.skip_decode:
        try:
            result["decode"] = bench_decode(device, dtype, 8 if args.smoke else args.decode_steps, args.smoke,
                                            args.layers)
        except Exception:
            result["decode"] = {"error": traceback.format_exc(limit=5)}
        print("decode", json.dumps(result["decode"]), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
