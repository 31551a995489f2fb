"""Quantization benchmark (GPU): quantized linears and decode against fusecc bf16, in one run.

1. Per-linear kernel times at Llama-3-8B linear shapes (qkv 6144x4096, o 4096x4096, gate_up
   28672x4096, down 4096x14336) for M = 1, 16, 8192: bf16 `F.linear` (cuBLAS) vs int8 (W8A16,
   per-channel), int4 (W4A16, group 128), fp8 (W8A8, per-channel; and 128-block) through
   `torch.ops.fusecc.*` (the calls the model makes). Each with its ratio to bf16 and its GB/s.
2. The engine on a Llama-3-8B-shape model with random weights (no files), quantized on the fly:
   batch-1 and batch-16 decode tok/s (128-token prompts, 128 greedy steps, decode steps timed) and a
   prefill of one 8192-token prompt in one step (tokens/s), for bf16 / int8 / int4 / fp8, each ratio
   against bf16 measured in the same run.

    python benchmarks/quant.py --out benchmarks/results/quant.json
    python benchmarks/quant.py --smoke --out /tmp/quant_smoke.json   # tiny shapes on CPU (interpreter)
    # in several device calls (each engine run ~1-2 min on an H100), every call with its own bf16 baseline:
    python benchmarks/quant.py --skip-engine --out benchmarks/results/quant.json
    python benchmarks/quant.py --skip-linears --methods bf16,int4,int8 --merge --out benchmarks/results/quant.json
    python benchmarks/quant.py --skip-linears --methods bf16,fp8 --merge --out benchmarks/results/quant.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0])

LINEARS_8B = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
              "down_proj": (4096, 14336)}
LINEARS_SMOKE = {"qkv_proj": (64, 32), "down_proj": (32, 96)}
METHODS = ("int8", "int4", "fp8")


def timeit(fn, device: str, reps: int) -> float:
    """Median seconds of fn(): on CUDA replayed from a CUDA graph (triton's do_bench_cudagraph), as the
    engine's decode steps run, so a few-microsecond kernel is timed without the Python launch cost
    in front of it (plain do_bench if fn cannot be captured); a wall-clock loop on CPU."""
    if device == "cuda":
        import triton.testing

        fn()  # autotuning and compilation before capture
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
        except RuntimeError as exc:
            print(f"not capturable ({str(exc).splitlines()[0][:120]}); timing with launches", flush=True)
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # a smoke run on CPU: compile once, then a wall-clock median
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def quantized_linears(weight: torch.Tensor) -> dict:
    """{name: module} of every benchmarked format for one bf16 weight [N, K]."""
    from fusecc.quantization.config import resolve_quantization
    from fusecc.quantization.linear import Fp8Linear, quantize_linear
    from fusecc.quantization.packing import quantize_fp8

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    out = {m: quantize_linear(linear, resolve_quantization(m, object())) for m in METHODS}
    if weight.shape[1] % 128 == 0:  # block-scaled fp8: the per-channel scale repeated per 128-block
        block = Fp8Linear(weight.shape[1], weight.shape[0], False, 128, weight.dtype, weight.device)
        w8, scale = quantize_fp8(weight)
        block.weight.data.copy_(w8)
        block.weight_scale.data.copy_(scale.expand(-1, weight.shape[1] // 128))
        out["fp8_block128"] = block
    return out


def decode_max_rows() -> int:
    # imported late: --smoke sets TRITON_INTERPRET before any kernel module is imported
    from fusecc.kernels.quant_launch import DECODE_MAX_ROWS

    return DECODE_MAX_ROWS


def autotuned_choice(kernel) -> str | None:
    """The config the autotuner chose for `kernel` at its last launch (int4: PLANES says which form of the
    tile won, kernels/int_unpack.py's constants), or None before any launch."""
    best = getattr(kernel, "best_config", None)
    return None if best is None else str(best)


def crossover_rows(row: dict, method: str, module, x: torch.Tensor, device: str, reps: int) -> None:
    """Each path of a weight-only linear that could take these rows, forced (one row: the GEMV and the
    tiles; past the decode rows: the tiles and dequantize + cuBLAS), to set kernels/quant_matmul.py's
    choice (weight_only_path) from measurements."""
    from fusecc.kernels.quant_matmul import weight_only_matmul

    for path in ("gemv", "tiles") if x.shape[0] == 1 else ("tiles", "dequantize"):
        t = timeit(lambda: weight_only_matmul(x, module.qweight, module.scales, module.zeros, module.bits,
                                              module.group_size, path=path), device, reps)
        row[f"{method}_{path}_us"] = t * 1e6


def bench_linears(shapes: dict, rows: list[int], device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    results = []
    for name, (N, K) in shapes.items():
        torch.manual_seed(0)
        weight = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
        modules = quantized_linears(weight)
        for M in rows:
            x = torch.randn(M, K, device=device).to(dtype)
            row = {"linear": name, "N": N, "K": K, "M": M}
            base = timeit(lambda: torch.nn.functional.linear(x, weight), device, reps)
            row["bf16_us" if dtype == torch.bfloat16 else "float_us"] = base * 1e6
            ref = torch.nn.functional.linear(x.float(), weight.float())
            for method, module in modules.items():
                try:
                    if method in ("int8", "int4") and (M == 1 or M > decode_max_rows()):
                        crossover_rows(row, method, module, x, device, reps)
                    t = timeit(lambda: module(x), device, reps)
                    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
                    row[f"{method}_us"] = t * 1e6
                    row[f"{method}_speedup"] = base / t
                    row[f"{method}_weight_GBps"] = nbytes / t / 1e9
                    row[f"{method}_rel_err"] = ((module(x).float() - ref).norm() / ref.norm()).item()
                    if method in ("int8", "int4") and M <= decode_max_rows():
                        from fusecc.kernels.quant_gemv import _weight_only_gemv
                        from fusecc.kernels.quant_matmul import _decode_kernel

                        row[f"{method}_tiles_config"] = autotuned_choice(_decode_kernel)
                        if M == 1:  # the GEMV ran in crossover_rows
                            row[f"{method}_gemv_config"] = autotuned_choice(_weight_only_gemv)
                except Exception as exc:
                    row[f"{method}_error"] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
            print(json.dumps(row), flush=True)
            results.append(row)
        del modules, weight
        gc.collect()
    return results


def model_config(smoke: bool):
    from transformers import LlamaConfig

    from benchmarks.decode import SHAPES

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=16) if smoke else SHAPES["8b"]
    config = LlamaConfig(**shape, max_position_embeddings=16384, rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    return config


def bench_engine(method: str | None, config, device: str, dtype: torch.dtype, batches: list[int], prefill: int,
                 steps: int, enforce_eager: bool) -> dict:
    """One engine over a random-weight model quantized with `method` (None = unquantized)."""
    from fusecc.quantization import resolve_quantization
    from fusecc.quantization.model import finish_load
    from fusecc.runtime.byte_tokenizer import ByteTokenizer
    from fusecc.runtime.config import EngineConfig
    from fusecc.runtime.engine import LLMEngine
    from fusecc.runtime.loader import build_model
    from fusecc.runtime.models.llama import LlamaForCausalLM
    from fusecc.runtime.sampling_params import SamplingParams

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(LlamaForCausalLM, config, dtype, device, prefill + 256, weights=None)
    finish_load(model, resolve_quantization(method, config))
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(
        max_model_len=prefill + 256, max_num_seqs=max(batches), max_num_batched_tokens=max(prefill, 256),
        num_kv_blocks=None if device == "cuda" else 4 * (prefill + 256) // 16, device=device,
        enforce_eager=enforce_eager), model_name=f"llama-random-{method or 'bf16'}")
    result = {"method": method or ("bf16" if dtype == torch.bfloat16 else "float32"), "weights_gib": weight_gib}
    g = torch.Generator().manual_seed(1)

    def run(batch: int, prompt_len: int, max_tokens: int) -> tuple[float, float, int]:
        """(first step s, seconds of the later steps, tokens they produced)."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"{batch}-{prompt_len}-{i}-{time.perf_counter()}",
                               torch.randint(0, config.vocab_size, (prompt_len,), generator=g).tolist(), params)
        sync(device)
        t0 = time.perf_counter()
        engine.step()  # the prefill step
        sync(device)
        t1 = time.perf_counter()
        later = 0
        while engine.has_unfinished_requests():
            later += 1
            engine.step()
        sync(device)
        return t1 - t0, time.perf_counter() - t1, later * batch

    for batch in batches:  # warm-up: compile, capture graphs, autotune for these batch sizes
        run(batch, 128, 4)
    for batch in batches:
        _, seconds, tokens = run(batch, 128, steps + 1)
        result[f"decode_bs{batch}_tok_s"] = tokens / seconds
    run(1, prefill, 1)
    first, _, _ = run(1, prefill, 1)
    result[f"prefill_{prefill}_tok_s"] = prefill / first
    result["setup_s"] = time.perf_counter() - start
    del engine, model
    # Dynamo's caches hold the compiled graphs and, with freeze=True, the weights as their constants
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter for the kernels)")
    ap.add_argument("--methods", default="bf16,int8,int4,fp8", help="engine runs (bf16 is the baseline)")
    ap.add_argument("--skip-linears", action="store_true")
    ap.add_argument("--linears", default="", help="comma-separated subset of " + ", ".join(LINEARS_8B))
    ap.add_argument("--rows", default="", help="comma-separated M of the linear rows (default 1,16,8192; e.g. "
                    "1,16,64,256,1024,8192 for the weight-only crossover)")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="add to --out instead of replacing it: each run's entries carry their own run header and "
                         "their ratios against that run's bf16 (split a long GPU session into calls)")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import triton

    run = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
           "linear_timer": "triton do_bench_cudagraph, median (CUDA graph replays, as decode runs)"
           if device == "cuda" else "wall-clock median (CPU smoke)",
           "dtype": str(dtype)}
    report = {**run, "linears": [], "engine": []}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            report = {**json.load(f), **run}
    this_run: list[dict] = []

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    if not args.skip_linears:
        shapes = LINEARS_SMOKE if args.smoke else LINEARS_8B
        if args.linears:
            shapes = {name: shapes[name] for name in args.linears.split(",")}
        rows = [int(m) for m in args.rows.split(",")] if args.rows else [1, 3, 17] if args.smoke else [1, 16, 8192]
        rows = bench_linears(shapes, rows, device, dtype, reps=3 if args.smoke else 0)
        report["linears"] = [{**row, "run": run} for row in rows]
        save()
    if not args.skip_engine:
        config = model_config(args.smoke)
        for method in args.methods.split(","):
            try:
                entry = bench_engine(None if method == "bf16" else method, config, device, dtype,
                                     batches=[1, 16] if not args.smoke else [1, 2], prefill=64 if args.smoke else 8192,
                                     steps=4 if args.smoke else 128, enforce_eager=args.enforce_eager or args.smoke)
            except Exception as exc:
                entry = {"method": method, "error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            entry["run"] = run
            this_run.append(entry)
            report["engine"].append(entry)
            print(json.dumps(entry), flush=True)
            save()
        base = next((e for e in this_run if e["method"] in ("bf16", "float32") and "error" not in e), None)
        for entry in this_run:
            if base is not None and entry is not base and "error" not in entry:
                entry["vs_bf16"] = {k: entry[k] / base[k] for k in entry if k.endswith("_tok_s") and base.get(k)}
        save()
    return 0


if __name__ == "__main__":
    if "--smoke" in sys.argv and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main())
